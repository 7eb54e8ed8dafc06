#!/usr/bin/env python3
"""Run cloud-init's datasource through ``tests/harness/ci_driver.py`` and also report,
for every HTTP attempt, the retry policy cloud-init's own code applied to it.

    python bench/cloudinit_record.py CI_DRIVER_ARGS...

Takes ci_driver's arguments and prints its JSON report with one more key,
``policies``: one entry per entry of ``requests``, in the same order, read from the
arguments of ``cloudinit.url_helper.readurl`` (timeout, retries, sec_between,
exception_cb) and of the enclosing ``wait_for_url`` (max_wait), and the datasource
function that made the call. ``tests/integration/test_storm_sequence.py`` runs it to
record ``bench/cloudinit_sequences.json``.

The exception callbacks are classified by name (``RETRY_CLASSES``); a callback this
table does not know ends the run with exit code 4, so a cloud-init whose retry rules
changed cannot be recorded with the old meaning.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "harness" / "ci_driver.py"
EXIT_UNKNOWN_CALLBACK = 4

# What each of cloud-init 22.4.2's exception callbacks lets readurl/wait_for_url retry:
# - openstack.MetadataReader._path_read's should_retry_cb: False for a status >= 400
#   (sources/helpers/openstack.py), so only transport errors are retried;
# - ec2.skip_retry_on_codes(SKIP_USERDATA_CODES): no retry on 404 (helpers/ec2.py);
# - DataSourceEc2._refresh_stale_aws_token_cb: always retry (a 401 drops the token
#   first, so the retry asks for a new one);
# - DataSourceEc2._skip_or_refresh_stale_aws_token_cb: the two above combined;
# - DataSourceEc2._imds_exception_cb (wait_for_url): raises on a status >= 400, which
#   ends the wait; transport errors go round again.
RETRY_CLASSES = {
    None: "any",
    "MetadataReader._path_read.<locals>.should_retry_cb": "transport",
    "skip_retry_on_codes(404)": "any-but-404",
    "DataSourceEc2._refresh_stale_aws_token_cb": "any",
    "DataSourceEc2._skip_or_refresh_stale_aws_token_cb": "any-but-404",
    "DataSourceEc2._imds_exception_cb": "transport",
}


def _load_driver() -> Any:
    spec = importlib.util.spec_from_file_location("ci_driver", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_driver"] = module
    spec.loader.exec_module(module)
    return module


def callback_name(cb: Any) -> str | None:
    if cb is None:
        return None
    if isinstance(cb, functools.partial):
        args = ",".join(_plain(a) for a in cb.args)
        return f"{cb.func.__qualname__}({args})"
    return str(getattr(cb, "__qualname__", repr(cb)))


def _plain(value: Any) -> str:
    if isinstance(value, frozenset | set | list | tuple):
        return ",".join(sorted(_plain(v) for v in value))
    return str(int(value)) if isinstance(value, int) else str(value)


def classify(cb: Any) -> str:
    name = callback_name(cb)
    if name not in RETRY_CLASSES:
        sys.stderr.write(f"cloudinit_record: unknown exception callback {name!r}; classify it in RETRY_CLASSES\n")
        sys.stderr.flush()
        os._exit(EXIT_UNKNOWN_CALLBACK)
    return RETRY_CLASSES[name]


class PolicyTap:
    """Wraps url_helper.readurl and wait_for_url; one policy per Session.request."""

    def __init__(self) -> None:
        self.policies: list[dict[str, Any]] = []
        # Global, not thread-local: wait_for_url may run its request in a worker
        # thread (dual_stack), and cloud-init crawls one request at a time.
        self._wait: dict[str, Any] | None = None
        self._read: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def install(self, url_helper: Any, requests: Any) -> None:
        real_readurl = url_helper.readurl
        real_wait = url_helper.wait_for_url
        read_sig = inspect.signature(real_readurl)
        wait_sig = inspect.signature(real_wait)
        tap = self

        def readurl(*args: Any, **kwargs: Any) -> Any:
            bound = read_sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            retries = int(a["retries"] or 0)
            tap._read = {
                "timeout": None if a["timeout"] is None else float(a["timeout"]),
                "tries": max(retries + 1, 1),
                "sleep": float(a["sec_between"]) if a["sec_between"] is not None else 0.0,
                "retry_on": classify(a["exception_cb"]),
                "site": _site(),
            }
            return real_readurl(*args, **kwargs)

        def wait_for_url(*args: Any, **kwargs: Any) -> Any:
            bound = wait_sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            tap._wait = {
                "max_wait": None if a["max_wait"] is None else float(a["max_wait"]),
                "retry_on": classify(a["exception_cb"]),
                "site": _site(),
            }
            try:
                return real_wait(*args, **kwargs)
            finally:
                tap._wait = None

        url_helper.readurl = readurl
        url_helper.wait_for_url = wait_for_url

        session_cls = requests.Session
        real_request = session_cls.request

        def request(self: Any, *args: Any, **kwargs: Any) -> Any:
            read, wait = tap._read or {}, tap._wait
            policy = dict(read)
            if wait is not None:
                # wait_for_url calls readurl with check_status=False and no retries;
                # its own loop decides, by max_wait and its callback.
                policy.update(max_wait=wait["max_wait"], retry_on=wait["retry_on"], tries=1, site=wait["site"])
            else:
                policy["max_wait"] = None
            with tap._lock:
                tap.policies.append(policy)
            return real_request(self, *args, **kwargs)

        session_cls.request = request


def _site() -> str:
    """The first caller outside url_helper: the datasource code that asked."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if "/cloudinit/" in filename and not filename.endswith("url_helper.py"):
            rel = filename.split("/cloudinit/", 1)[1]
            return f"cloudinit/{rel}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def main(argv: list[str]) -> int:
    driver = _load_driver()
    tap = PolicyTap()
    base = driver.Recorder

    class Recorder(base):  # type: ignore[misc,valid-type]
        def hook_requests(self, requests: Any) -> None:
            super().hook_requests(requests)
            # After the driver's hook, so the policy tap sees every attempt it records;
            # url_helper is loaded by then (CloudInit imported it).
            tap.install(sys.modules["cloudinit.url_helper"], requests)

    driver.Recorder = Recorder
    real_dump = driver.json.dump

    def dump(report: dict[str, Any], fp: Any, **kwargs: Any) -> None:
        report["policies"] = tap.policies
        real_dump(report, fp, **kwargs)

    driver.json = _JsonShim(dump)
    return int(driver.main(argv))


class _JsonShim:
    """ci_driver's ``json`` module with ``dump`` replaced (it prints the report with it)."""

    def __init__(self, dump: Any) -> None:
        self.dump = dump

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
