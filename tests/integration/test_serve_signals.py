"""Signals of the long-running commands, as real processes on loopback: SIGHUP
reloads without dropping a connection (and never kills), SIGTERM drains the
requests in flight, then exits 0; systemd hears RELOADING=1, READY=1, STOPPING=1."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.serving import meta169_argv, run_cli

INVENTORY = """
networks:
  - id: net-a
    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254}]
instances:
  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [127.0.0.5]}]
  - uuid: 22222222-2222-4222-8222-222222222222
    name: beta
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0b", ips: [127.0.0.6]}]
"""
TOKEN = "admin-token-0123456789abcdef"
SLOW = 1.0


@dataclass
class Daemon:
    """A meta169 process whose stderr is read as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str] | None = None) -> Daemon:
        proc = subprocess.Popen(
            argv,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        daemon = cls(proc)
        daemon._reader = threading.Thread(target=daemon._read, daemon=True)
        daemon._reader.start()
        return daemon

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                found = re.search(pattern, line)
                if found:
                    return found
            if self.proc.poll() is not None and self._reader is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.log}")

    def signal(self, sig: int) -> int:
        """Send ``sig``; the number of log lines before it (for wait_for(after=))."""
        mark = len(self.lines)
        self.proc.send_signal(sig)
        return mark

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"did not stop on SIGTERM:\n{self.log}") from None
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    url = f"sqlite://{tmp_path / 'registry.db'}"
    run_cli(url, "import", str(tmp_path / "inventory.yaml"))
    return url


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A stand-in for systemd's notification socket; yields its path and what it heard."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    heard: list[str] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                heard.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        yield path, heard
    finally:
        done.set()
        thread.join(2)
        sock.close()


@pytest.fixture
def slow_target() -> Iterator[tuple[str, threading.Event]]:
    """A vendordata_dynamic target that answers after SLOW seconds; the event is set
    when a request for beta (127.0.0.6) arrives."""
    asked = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if b"22222222-2222-4222-8222-222222222222" in body:
                asked.set()
            time.sleep(SLOW)
            reply = json.dumps({"slow": True}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", asked
    finally:
        server.shutdown()
        server.server_close()


def _serve(registry_url: str, *args: str, env: dict[str, str] | None = None) -> tuple[Daemon, tuple[str, int]]:
    daemon = Daemon.start(
        meta169_argv("-v", "--registry", registry_url, "serve", "--listen", "127.0.0.1:0=network:net-a", *args), env
    )
    # Printed once serve is ready: its signal handlers are in place.
    # Printed once serve is ready (a stop asked while it starts finds nothing in flight yet).
    found = daemon.wait_for(r"meta169 serve: listening on 127\.0\.0\.1:(\d+) ")
    return daemon, ("127.0.0.1", int(found.group(1)))


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def _local_port(conn: http.client.HTTPConnection) -> int:
    assert conn.sock is not None
    return int(conn.sock.getsockname()[1])


def test_serve_signals_sighup_reloads_rate_limit_and_vendor_data_on_an_open_connection(
    registry_url: str, tmp_path: Path, notify: tuple[str, list[str]]
) -> None:
    config = tmp_path / "meta169.toml"
    vendor = tmp_path / "vendor.json"
    vendor.write_text('{"site": "one"}')
    config.write_text('[serve]\nrate-limit = "1000/1000"\n')
    notify_path, heard = notify
    daemon, address = _serve(
        registry_url, "--vendor-data", str(vendor), env={"META169_CONFIG": str(config), "NOTIFY_SOCKET": notify_path}
    )
    conn = http.client.HTTPConnection(*address, timeout=5, source_address=("127.0.0.5", 0))
    try:
        for _ in range(5):
            assert _get(conn, "/latest/meta-data/instance-id")[0] == 200
        port = _local_port(conn)
        assert json.loads(_get(conn, "/openstack/latest/vendor_data.json")[1]) == {"site": "one"}

        # A reload that fails keeps everything as it was, and the process.
        config.write_text('[serve]\nrate-limit = "fast"\n')
        mark = daemon.signal(signal.SIGHUP)
        daemon.wait_for("reload failed, keeping the running configuration", after=mark)
        for _ in range(5):
            assert _get(conn, "/latest/meta-data/instance-id")[0] == 200

        config.write_text('[serve]\nrate-limit = "0.5/3"\n')
        vendor.write_text('{"site": "two"}')
        mark = daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_for("reloaded: (.*)", after=mark).group(1)
        assert "rate limit 1000/1000 -> 0.5/3" in reloaded
        assert "static vendor data" in reloaded
        statuses = [_get(conn, "/latest/meta-data/instance-id")[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        assert _local_port(conn) == port, "the keep-alive connection was dropped by the reload"
    finally:
        conn.close()
    conn = http.client.HTTPConnection(*address, timeout=5, source_address=("127.0.0.6", 0))
    try:
        assert json.loads(_get(conn, "/openstack/latest/vendor_data.json")[1]) == {"site": "two"}
    finally:
        conn.close()
    assert daemon.stop() == 0
    assert daemon.proc.poll() == 0
    sequence = [m.split("\n")[0] for m in heard if m.split("\n")[0] in ("READY=1", "RELOADING=1", "STOPPING=1")]
    assert sequence == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_serve_signals_sigterm_drains_a_slow_request_then_exits_0(
    registry_url: str, slow_target: tuple[str, threading.Event]
) -> None:
    url, asked = slow_target
    daemon, address = _serve(registry_url, "--vendordata-dynamic", f"slow={url}", "--vendordata-timeout", "5")
    idle = socket.create_connection(address, timeout=5)  # a keep-alive client between requests
    result: dict[str, object] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection(*address, timeout=10, source_address=("127.0.0.6", 0))
        try:
            result["reply"] = _get(conn, "/openstack/latest/vendor_data2.json")
        finally:
            conn.close()

    client = threading.Thread(target=slow_request)
    client.start()
    try:
        assert asked.wait(5), daemon.log
        sent = time.monotonic()
        mark = daemon.signal(signal.SIGTERM)
        daemon.wait_for(r"stopping: draining 1 connections", after=mark)
        assert idle.recv(1) == b"", "an idle connection stays open during a drain"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
    finally:
        client.join(10)
        idle.close()
    status, body = result["reply"]  # type: ignore[misc]
    assert status == 200
    assert json.loads(body)["slow"] == {"slow": True}
    assert daemon.stop() == 0
    assert time.monotonic() - sent < SLOW + 5
    daemon.wait_for(r"stopped after \d+\.\d s")


def test_serve_signals_workers_pass_signals_on_and_stop(registry_url: str) -> None:
    daemon, address = _serve(registry_url, "--workers", "2")
    # Each process says it listens once its signal handlers are in place.
    deadline = time.monotonic() + 10
    while sum("meta169 serve: listening" in line for line in daemon.lines) < 2:
        assert time.monotonic() < deadline, daemon.log
        time.sleep(0.02)
    mark = daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum("reloaded:" in line for line in daemon.lines[mark:]) < 2:
        assert time.monotonic() < deadline, daemon.log
        time.sleep(0.02)
    conn = http.client.HTTPConnection(*address, timeout=5, source_address=("127.0.0.5", 0))
    try:
        assert _get(conn, "/latest/meta-data/instance-id")[0] == 200
    finally:
        conn.close()
    assert daemon.stop() == 0
    assert sum("stopping: draining" in line for line in daemon.lines) == 2


def test_serve_signals_proxy_drains_and_reloads(
    registry_url: str, tmp_path: Path, slow_target: tuple[str, threading.Event]
) -> None:
    url, asked = slow_target
    sock = tmp_path / "serve.sock"
    serve = Daemon.start(
        meta169_argv(
            "-v", "--registry", registry_url, "serve", "--listen", f"unix:{sock}=proxy",
            "--vendordata-dynamic", f"slow={url}", "--vendordata-timeout", "5",
        )
    )  # fmt: skip
    serve.wait_for("listening on")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    listeners = tmp_path / "listeners.json"
    listeners.write_text(json.dumps({"listeners": [{"address": "127.0.0.1", "port": port, "network": "net-a"}]}))
    proxy = Daemon.start(meta169_argv("-v", "proxy", "--upstream", f"unix:{sock}", "--listeners", str(listeners)))
    try:
        proxy.wait_for("1 listeners up")
        mark = proxy.signal(signal.SIGHUP)
        assert "listener sources read again" in proxy.wait_for("reloaded: (.*)", after=mark).group(1)
        result: dict[str, object] = {}

        def slow_request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=("127.0.0.6", 0))
            try:
                result["reply"] = _get(conn, "/openstack/latest/vendor_data2.json")
            finally:
                conn.close()

        client = threading.Thread(target=slow_request)
        client.start()
        try:
            assert asked.wait(5), proxy.log + serve.log
            mark = proxy.signal(signal.SIGTERM)
            proxy.wait_for(r"stopping: draining 1 connections", after=mark)
        finally:
            client.join(10)
        status, body = result["reply"]  # type: ignore[misc]
        assert status == 200, body
        assert json.loads(body)["slow"] == {"slow": True}
        assert proxy.stop() == 0
        proxy.wait_for(r"stopped after \d+\.\d s")
    finally:
        proxy.stop()
        serve.stop()


def test_serve_signals_admin_reloads_its_token_and_stops(tmp_path: Path, registry_url: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    daemon = Daemon.start(
        meta169_argv(
            "-v", "--registry", registry_url, "admin", "--listen", "127.0.0.1:0", "--token-file", str(token_file)
        )
    )
    found = daemon.wait_for(r"listening on (\S+):(\d+)")
    conn = http.client.HTTPConnection(found.group(1), int(found.group(2)), timeout=5)

    def status(token: str) -> int:
        conn.request("GET", "/v1/networks", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status

    try:
        assert status(TOKEN) == 200
        port = _local_port(conn)
        rotated = TOKEN[::-1]
        token_file.write_text(rotated + "\n")
        mark = daemon.signal(signal.SIGHUP)
        assert "token" in daemon.wait_for("reloaded: (.*)", after=mark).group(1)
        assert (status(TOKEN), status(rotated)) == (401, 200)
        assert _local_port(conn) == port
    finally:
        conn.close()
    assert daemon.stop() == 0
    daemon.wait_for(r"stopped after")
