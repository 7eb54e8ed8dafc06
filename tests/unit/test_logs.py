"""Log lines (meta169.logs): JSON objects with their fields, the journal's text
without a time of ours, the access log's sampling."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.logs import ACCESS_LOGGER, AccessLog, JsonFormatter, TextFormatter, journal_stream, setup


@pytest.fixture
def target() -> Iterator[logging.Logger]:
    """A logger of the test's own to set up (the root logger is pytest's)."""
    logger = logging.Logger("meta169-test-root")
    try:
        yield logger
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            handler.close()


def _record(level: int = logging.WARNING, msg: str = "no instance for %s", **extra: object) -> logging.LogRecord:
    args = ("10.0.0.5",) if "%s" in msg else ()
    record = logging.LogRecord("meta169.api", level, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_logs_json_lines_parse_and_carry_the_fields() -> None:
    fields = {"caller": "10.0.0.5", "status": 404, "via": "python"}
    line = JsonFormatter().format(_record(fields=fields))
    assert "\n" not in line
    got = json.loads(line)
    assert got["level"] == "warning" and got["logger"] == "meta169.api"
    assert got["message"] == "no instance for 10.0.0.5"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got["time"])
    assert {k: got[k] for k in fields} == fields


def test_logs_json_carries_a_traceback_on_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record(logging.ERROR, "failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exc"]


def test_logs_text_for_the_journal_has_no_time_of_ours() -> None:
    record = _record()
    plain = TextFormatter().format(record)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING meta169.api: no instance for 10.0.0.5$", plain)
    # sd-daemon(3) priority instead of a time: journald stamps the line itself
    assert TextFormatter(journal=True).format(record) == "<4>meta169.api: no instance for 10.0.0.5"
    assert TextFormatter(journal=True).format(_record(logging.INFO, "ok")).startswith("<6>")


def test_logs_journal_stream_must_name_our_stream(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream:
        st = os.fstat(stream.fileno())
        assert journal_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # a child's stderr redirected elsewhere inherits the variable: not the journal
        assert not journal_stream(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal_stream(stream, {})
        assert not journal_stream(stream, {"JOURNAL_STREAM": "garbage"})
    assert not journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_logs_setup_under_journal_stream_drops_the_time(tmp_path: Path, target: logging.Logger) -> None:
    with open(tmp_path / "err", "w+") as stream:
        st = os.fstat(stream.fileno())
        journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert setup(logging.INFO, "text", stream=stream, environ=journal, logger=target) is not None
        target.info("listening on %s", "127.0.0.1:8775")
        # again (a reload): the handler is replaced, not added to
        setup(logging.INFO, "text", stream=stream, environ={}, logger=target)
        target.info("again")
        assert len(target.handlers) == 1
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<6>meta169-test-root: listening on 127.0.0.1:8775"
    assert re.match(r"\d{4}-\d\d-\d\d .* INFO meta169-test-root: again$", lines[1])


def test_logs_setup_leaves_foreign_handlers_alone(target: logging.Logger) -> None:
    foreign = logging.NullHandler()
    target.addHandler(foreign)
    assert setup(logging.DEBUG, "json", stream=io.StringIO(), logger=target) is None
    assert target.handlers == [foreign]


def test_logs_access_log_ignores_the_level_and_samples(caplog: pytest.LogCaptureFixture) -> None:
    # The loggers' level says WARNING; the handler takes everything that reaches it.
    caplog.set_level(logging.WARNING)
    caplog.handler.setLevel(logging.NOTSET)
    every = AccessLog(1.0)
    never = AccessLog(0.0)
    assert all(every.sampled() for _ in range(200)) and not any(never.sampled() for _ in range(200))
    draws = iter([0.2, 0.7, 0.29, 0.31])
    share = AccessLog(0.3, rand=lambda: next(draws))
    assert [share.sampled() for _ in range(4)] == [True, False, True, False]
    every.emit(
        caller="10.0.0.5",
        network="net-a",
        router="",
        instance="u-1",
        method="GET",
        path="/latest/meta-data/",
        status=200,
        size=120,
        duration=0.000042,
        via="fast",
    )
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]  # logged although the level is WARNING
    got = json.loads(JsonFormatter().format(record))
    assert got["logger"] == ACCESS_LOGGER and got["level"] == "info"
    assert (got["caller"], got["network"], got["instance"], got["status"], got["bytes"], got["via"]) == (
        "10.0.0.5",
        "net-a",
        "u-1",
        200,
        120,
        "fast",
    )
    assert got["message"] == "10.0.0.5 network=net-a instance=u-1 GET /latest/meta-data/ 200 120 0.042ms fast"
    with pytest.raises(ValueError):
        AccessLog(1.5)


def test_logs_lifecycle_lines_show_at_the_default_level() -> None:
    # A fresh process (the root logger is pytest's here): at WARNING, the default,
    # start/stop/reload lines still show and ordinary INFO lines do not.
    import subprocess

    code = (
        "import logging; from meta169.logs import setup, LIFECYCLE_LOGGER\n"
        "setup(logging.WARNING, 'text', environ={})\n"
        "logging.getLogger(LIFECYCLE_LOGGER).info('stopping: draining 3 connections')\n"
        "logging.getLogger('meta169.serve').info('an ordinary detail')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "stopping: draining 3 connections" in out.stderr
    assert "an ordinary detail" not in out.stderr
