"""Logging for every role: set up once at the edge, text or JSON lines, and the access log.

:func:`setup` is called by the command line's top-level group (``-v``,
``--log-format``) and nowhere else; modules log through ``logging.getLogger("meta169.<part>")``.

- ``text``: ``TIME LEVEL LOGGER: MESSAGE``. Under systemd, when ``JOURNAL_STREAM``
  names the stream we write to (systemd.exec(5): "device:inode" of the journal
  stream), lines carry no time of our own (journald stamps every line) and start
  with the sd-daemon(3) priority prefix ``<N>`` instead, so ``journalctl -p`` works.
- ``json``: one object per line with ``time`` (RFC 3339, UTC), ``level``,
  ``logger``, ``message``, the record's structured ``fields`` (the access log's) and
  ``exc`` (a traceback) when there is one.

The access log (:class:`AccessLog`) writes one line per sampled request to the logger
``meta169.access`` whatever the level set by ``-v``: it is on when the operator
turned it on (``serve --access-log``).

Must not know about HTTP, metadata or any role: callers pass the fields.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
ACCESS_LOGGER = "meta169.access"

# sd-daemon(3) priorities (syslog's) by logging level.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal systemd connected us to (JOURNAL_STREAM is
    "device:inode" of that stream; systemd.exec(5) says to compare it with the
    stream's own, as a child's redirected stderr inherits the variable too)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, or ``<N>LOGGER: MESSAGE`` for the journal."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if not self._journal:
            return super().format(record)
        text = f"<{_priority(record.levelno)}>{record.name}: {record.getMessage()}"
        if record.exc_info:
            # One journal entry per line: the traceback lines keep the priority.
            trace = self.formatException(record.exc_info).splitlines()
            text += "".join(f"\n<{_priority(record.levelno)}>{line}" for line in trace)
        return text


def _rfc3339(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(
    level: int,
    fmt: LogFormat = "text",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler | None:
    """Send every meta169 log line to ``stream`` (stderr) in ``fmt`` at ``level``.

    Configures ``logger`` (the root logger) once per process, and again when called
    again (a reload may change the format); like ``logging.basicConfig`` it leaves a
    logger alone that has handlers someone else installed (a host application, a
    test runner) and returns None then, else the handler.
    """
    target = logger if logger is not None else logging.getLogger()
    ours = [h for h in target.handlers if getattr(h, _MARK, False)]
    if len(ours) != len(target.handlers):
        return None
    out = stream if stream is not None else sys.stderr
    env = environ if environ is not None else os.environ
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(TextFormatter(journal=journal_stream(out, env)))
    else:
        raise ValueError(f"unknown log format {fmt!r}")
    setattr(handler, _MARK, True)
    for old in ours:
        target.removeHandler(old)
        old.close()
    target.addHandler(handler)
    target.setLevel(level)
    # Start, stop, drain and reload are logged at every level: an operator reading
    # the journal after an outage must see when the service went down and came back.
    logging.getLogger(LIFECYCLE_LOGGER).setLevel(min(level, logging.INFO))
    return handler


LIFECYCLE_LOGGER = "meta169.lifecycle"


# Set on the handlers setup() installs, so it replaces only its own.
_MARK = "_meta169_logs"


class AccessLog:
    """One line per request, for a ``rate`` share of requests chosen at random."""

    __slots__ = ("_logger", "_random", "rate")

    def __init__(self, rate: float, *, rand: Callable[[], float] = random.random) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("the access log sample rate is a share between 0 and 1")
        self.rate = rate
        self._random = rand
        self._logger = logging.getLogger(ACCESS_LOGGER)

    def sampled(self) -> bool:
        """Whether to log the next request."""
        return self.rate >= 1.0 or (self.rate > 0.0 and self._random() < self.rate)

    def emit(
        self,
        *,
        caller: str,
        network: str,
        router: str,
        instance: str,
        method: str,
        path: str,
        status: int,
        size: int,
        duration: float,
        via: str,
    ) -> None:
        """Log one request (sampling is the caller's, by :meth:`sampled`)."""
        fields = {
            "caller": caller,
            "network": network,
            "router": router,
            "instance": instance,
            "method": method,
            "path": path,
            "status": status,
            "bytes": size,
            "duration": round(duration, 6),
            "via": via,
        }
        scope = f"network={network}" if network else f"router={router}" if router else "scope=-"
        message = (
            f"{caller or '-'} {scope} instance={instance or '-'} {method} {path} {status} {size} "
            f"{duration * 1000:.3f}ms {via}"
        )
        logger = self._logger
        # Past the level check on purpose: the operator turned the access log on.
        record = logger.makeRecord(
            logger.name, logging.INFO, "(access)", 0, message, (), None, extra={"fields": fields}
        )
        logger.handle(record)
