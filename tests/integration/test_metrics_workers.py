"""``meta169 serve --workers 2 --metrics-listen`` as a real process: one scrape counts
both workers' requests; its log is JSON lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.integration.serving import get, imported_registry, meta169_argv
from tests.integration.test_serve_process import TWO_TENANTS
from tests.scrape import Samples, scrape, total, value


def _wait_for(lines: list[str], pattern: str, proc: subprocess.Popen[str], timeout: float = 15.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            match = re.search(pattern, line)
            if match:
                return match
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in serve's log:\n" + "\n".join(lines))


def test_metrics_workers_one_scrape_covers_every_worker(tmp_path: Path) -> None:
    url = imported_registry(tmp_path, TWO_TENANTS)
    argv = meta169_argv(
        "--log-format",
        "json",
        "-v",
        "--registry",
        url,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--network",
        "net-a",
        "--workers",
        "2",
        "--rate-limit",
        "0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--poll-interval",
        "0.1",
    )
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stderr or ()), daemon=True)
    reader.start()
    try:
        serve_port = int(_wait_for(lines, r"listening on 127\.0\.0\.1:(\d+) \(network net-a\)", proc).group(1))
        metrics_port = int(_wait_for(lines, r"metrics on http://127\.0\.0\.1:(\d+)/metrics", proc).group(1))
        # Both workers counted, and each past its first registry poll (a lookup that
        # overlaps the first poll is served but not cached, and would miss twice).
        samples = _until(
            metrics_port,
            lambda s: (
                value(s, "meta169_metrics_processes") == 2
                and value(s, "meta169_serve_registry_polls_total", result="ok") >= 4
            ),
        )
        assert total(samples, "meta169_serve_requests_total") == 0
        # Each worker has a site cache of its own: two misses for one caller means
        # both workers answered some of the requests.
        asked = 0
        while asked < 400:
            assert get(("127.0.0.1", serve_port), "/latest/meta-data/instance-id", source="127.0.0.5")[0] == 200
            asked += 1
            if (
                asked % 10 == 0
                and value(scrape(metrics_port), "meta169_serve_site_cache_lookups_total", result="miss") == 2
            ):
                break
        samples = scrape(metrics_port)
        assert value(samples, "meta169_serve_site_cache_lookups_total", result="miss") == 2, (
            "one worker took every connection"
        )
        assert value(samples, "meta169_metrics_processes") == 2
        assert total(samples, "meta169_serve_requests_total") == asked
        assert total(samples, "meta169_serve_request_duration_seconds_count") == asked
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        reader.join(5)
        proc.stderr.close()
    logged = [line for line in lines if line.startswith("{")]
    assert logged, lines
    for line in logged:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), line
    assert any(json.loads(line)["logger"] == "meta169.metrics" for line in logged)


def _until(port: int, ready: object, timeout: float = 10.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if callable(ready) and ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got there: {sorted(samples.items())}")
        time.sleep(0.1)
