"""The boot storm's recorded cloud-init sequences (bench/cloudinit_sequences.json) are
what cloud-init 22.4.2 sends to meta169 today.

Each datasource runs for real (``bench/cloudinit_record.py`` over the cloud-init
harness) against a ``meta169 serve`` of its own, through a loopback relay that logs
every request as it arrives on the wire: which TCP connection, method, path, every
header line, and serve's status. The recording is compared with the checked-in
fixture; a difference fails, naming the first request that differs. To re-record
after a deliberate change: ``META169_STORM_RECORD=1 .venv/bin/python -m pytest
tests/integration/test_storm_sequence.py`` (the fixture is rewritten, then compared).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from bench import sequences
from bench.sequences import Recording, Step

from tests.harness.cloudinit import driver_command
from tests.integration.serving import ServeProcess, imported_registry, start_serve

pytestmark = pytest.mark.cloudinit

RECORD_ENV = "META169_STORM_RECORD"
RECORDER = Path(sequences.__file__).resolve().with_name("cloudinit_record.py")
NETWORK = "rec-net"
# cloud-init's own defaults for each datasource (sources/__init__.py DataSource.url_*,
# DataSourceEc2.url_max_wait/url_timeout): the harness's faster test defaults would
# record other timeouts than a guest uses.
DEFAULTS: dict[str, list[str]] = {
    "openstack": ["--timeout", "10", "--retries", "5"],
    "ec2": ["--timeout", "50", "--retries", "5", "--max-wait", "120"],
    "ec2-imdsv2": ["--timeout", "50", "--retries", "5", "--max-wait", "120"],
}


@dataclass
class Seen:
    connection: int
    method: str
    path: str
    headers: list[tuple[str, str]]
    status: int
    body: bytes


@dataclass
class Relay:
    """Logs every request between cloud-init and serve; one entry per request."""

    upstream: tuple[str, int]
    seen: list[Seen] = field(default_factory=list)
    connections: dict[tuple[str, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def _handler(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive as serve offers it: reuse would show

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            conn = http.client.HTTPConnection(*relay.upstream, timeout=10)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    conn.putheader(name, value)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                headers = resp.getheaders()
            finally:
                conn.close()
            with relay.lock:
                index = relay.connections.setdefault(self.client_address, len(relay.connections))
                relay.seen.append(Seen(index, self.command, self.path, list(self.headers.items()), resp.status, data))
            self.send_response_only(resp.status, resp.reason)
            for name, value in headers:
                if name.lower() not in ("date", "server"):
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = _forward
        do_PUT = _forward

    return Handler


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("storm-seq")
    url = imported_registry(tmp, json.dumps(sequences.recording_inventory(NETWORK)), name="inv.json")
    srv = start_serve(url, [f"127.0.0.1:0=network:{NETWORK}"])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def relay(serve: ServeProcess) -> Iterator[Relay]:
    relay = Relay(upstream=serve.addresses[0])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(relay))
    relay.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_recorder(cloudinit_pkg: Path, kind: str, url: str) -> dict[str, Any]:
    source = "openstack" if kind == "openstack" else "ec2"
    argv = driver_command(source, url, cloudinit_dir=cloudinit_pkg, imdsv2=kind == "ec2-imdsv2", deadline=50)
    # driver_command runs tests/harness/ci_driver.py; the recorder takes the same arguments.
    argv = [sys.executable, str(RECORDER), *argv[2:], *DEFAULTS[kind]]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, f"recorder exited {done.returncode}:\n{done.stderr[-6000:]}"
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def steps_from(kind: str, relay: Relay, report: dict[str, Any]) -> tuple[Step, ...]:
    """Join the wire log and the driver's attempts into the fixture's steps."""
    attempts, policies = report["requests"], report["policies"]
    assert len(attempts) == len(policies) == len(relay.seen), (len(attempts), len(policies), len(relay.seen))
    # cloud-init opens a new connection for every request and reuses none.
    assert [s.connection for s in relay.seen] == list(range(len(relay.seen))), [s.connection for s in relay.seen]
    token = ""
    steps = []
    for seen, attempt, policy in zip(relay.seen, attempts, policies, strict=True):
        assert (attempt["method"], attempt["url"]) == (seen.method, relay.url + seen.path)
        assert attempt["status"] == seen.status
        headers = []
        for name, sent in seen.headers:
            value = sent
            if name.lower() == "host":
                value = "{host}"
            elif name.lower() == sequences.TOKEN_HEADER.lower():
                assert sent == token, "the token sent is the one the PUT returned"
                value = "{token}"
            headers.append((name, value))
        if seen.method == "PUT":
            token = seen.body.decode()
        steps.append(
            Step(
                method=seen.method,
                path=seen.path.replace(sequences.RECORD_MAC, "{mac}"),
                headers=tuple(headers),
                status=seen.status,
                timeout=policy["timeout"],
                tries=policy["tries"],
                sleep=policy["sleep"],
                retry_on=policy["retry_on"],
                max_wait=policy["max_wait"],
                site=policy["site"],
            )
        )
    return tuple(steps)


def environment() -> dict[str, str]:
    import requests
    import urllib3

    return {"requests": requests.__version__, "urllib3": urllib3.__version__, "python": sys.version.split()[0]}


def _first_difference(kind: str, recorded: tuple[Step, ...], fixture: tuple[Step, ...]) -> str:
    for i, (a, b) in enumerate(zip(recorded, fixture, strict=False)):
        if a != b:
            return f"{kind} request {i}: recorded now {a.to_json()}\n  fixture has {b.to_json()}"
    return f"{kind}: {len(recorded)} requests recorded now, {len(fixture)} in the fixture"


@pytest.mark.parametrize("kind", sequences.KINDS)
def test_sequence_matches_fixture(kind: str, cloudinit_pkg: Path, relay: Relay) -> None:
    report = run_recorder(cloudinit_pkg, kind, relay.url)
    assert report["ok"] is True, report["errors"]
    assert report["instance_id"] == sequences.RECORD_UUID
    assert report["retries"]["count"] == 0, report["retries"]
    steps = steps_from(kind, relay, report)
    # What the storm counts as success: every request of the recording answered 200.
    assert [s.status for s in steps if s.status != 200] == [], [s.to_json() for s in steps if s.status != 200]
    if os.environ.get(RECORD_ENV) == "1":
        known = dict(sequences.load().sequences) if sequences.FIXTURE.exists() else {}
        known[kind] = steps
        sequences.FIXTURE.write_text(Recording(known, environment()).dumps())
    fixture = sequences.load().sequences[kind]
    assert steps == fixture, _first_difference(kind, steps, fixture)


def test_fixture_shape() -> None:
    """What the storm relies on, checked on the file itself (no cloud-init needed)."""
    rec = sequences.load()
    assert set(rec.sequences) == set(sequences.KINDS)
    os_steps = rec.sequences["openstack"]
    assert [s.path for s in os_steps[:2]] == ["/openstack", "/openstack"]
    assert os_steps[0].probe and os_steps[0].max_wait is not None and os_steps[0].max_wait <= 0
    assert any(s.path == "/latest/meta-data/" for s in os_steps), "the EC2 crawl OpenStack always does"
    v2 = rec.sequences["ec2-imdsv2"]
    assert v2[0].is_token_put and (sequences.TTL_HEADER, "21600") in v2[0].headers
    assert all(s.uses_token for s in v2[1:])
    assert not any(s.uses_token or s.is_token_put for s in rec.sequences["ec2"])
