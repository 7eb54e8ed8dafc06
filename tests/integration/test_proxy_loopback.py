"""``meta169 proxy`` in front of ``meta169 serve`` on loopback: identity stamping,
header stripping, Unix and HMAC-over-TCP upstreams, upstream failures."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serving import ServeProcess, get, imported_registry, meta169_argv, run_cli, start_serve
from tests.processes import free_port, stop

INVENTORY = """
networks:
  - id: net-a
    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254}]
  - id: net-b
    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254}]
routers:
  - id: router-a
    networks: [net-a]
instances:
  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    user_data: "alpha-secret-user-data"
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [127.0.0.5]}]
  - uuid: 22222222-2222-4222-8222-222222222222
    name: beta
    user_data: "beta-secret-user-data"
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0b", ips: [127.0.0.6]}]
  - uuid: 33333333-3333-4333-8333-333333333333
    name: gamma
    user_data: "gamma-secret-user-data"
    ports: [{network: net-b, mac: "fa:16:3e:00:00:0c", ips: [127.0.0.5]}]
"""
ALPHA = "11111111-1111-4111-8111-111111111111"


class Proxy:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        self.lines: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            if re.search(r"\d+ listeners up", line):
                return
        self.stop()
        raise AssertionError("proxy did not start: " + "".join(self.lines))

    def stop(self) -> str:
        stop(self.proc)
        assert self.proc.stderr is not None
        if not self.proc.stderr.closed:
            self.lines.append(self.proc.stderr.read())
            self.proc.stderr.close()
        return "".join(self.lines)


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    url = imported_registry(tmp_path, INVENTORY)
    return url


@pytest.fixture
def unix_serve(registry_url: str, tmp_path: Path) -> Iterator[tuple[ServeProcess, Path]]:
    sock = tmp_path / "serve.sock"
    srv = start_serve(registry_url, [f"unix:{sock}=proxy"])
    try:
        yield srv, sock
    finally:
        srv.stop()


@pytest.fixture
def unix_proxy(unix_serve: tuple[ServeProcess, Path], registry_url: str) -> Iterator[tuple[int, int]]:
    _, sock = unix_serve
    port_a, port_b = free_port(), free_port()
    proxy = Proxy(
        meta169_argv(
            "-v",
            "--registry",
            registry_url,
            "proxy",
            "--upstream",
            f"unix:{sock}",
            "--listen",
            f"127.0.0.1:{port_a}=router:router-a",
            "--listen",
            f"127.0.0.1:{port_b}=network:net-b",
        )
    )
    try:
        yield port_a, port_b
    finally:
        proxy.stop()


FORGERIES = [
    {"X-Forwarded-For": "127.0.0.6"},
    {"Forwarded": "for=127.0.0.6"},
    {"X-Real-IP": "127.0.0.6"},
    {"X-Meta169-Caller-IP": "127.0.0.6", "X-Meta169-Router-ID": "router-a"},
    {"X-Meta169-Caller-IP": "127.0.0.5", "X-Meta169-Network-ID": "net-b"},
    {"X-Neutron-Network-ID": "net-b"},
    {"X-Neutron-Router-ID": "router-a"},
    {"X-OVN-Network-ID": "net-b"},
    {"X-Instance-ID": "22222222-2222-4222-8222-222222222222"},
    {"X-Instance-ID-Signature": "00"},
    {"X-Tenant-ID": "other"},
]


@pytest.mark.parametrize("forged", FORGERIES, ids=",".join)
def test_proxy_forged_identity_headers_never_change_caller(unix_proxy: tuple[int, int], forged: dict[str, str]) -> None:
    port_a, _ = unix_proxy
    status, _, body = get(("127.0.0.1", port_a), "/latest/user-data", source="127.0.0.5", headers=forged)
    assert (status, body) == (200, b"alpha-secret-user-data")


def test_proxy_scopes_overlapping_ips_by_listener(unix_proxy: tuple[int, int]) -> None:
    port_a, port_b = unix_proxy
    assert get(("127.0.0.1", port_a), "/latest/user-data", source="127.0.0.5")[2] == b"alpha-secret-user-data"
    assert get(("127.0.0.1", port_b), "/latest/user-data", source="127.0.0.5")[2] == b"gamma-secret-user-data"
    assert get(("127.0.0.1", port_b), "/latest/user-data", source="127.0.0.6")[0] == 404


def test_proxy_head_relays_headers_only(unix_proxy: tuple[int, int]) -> None:
    port_a, _ = unix_proxy
    status, headers, body = get(
        ("127.0.0.1", port_a), "/latest/meta-data/instance-id", source="127.0.0.5", method="HEAD"
    )
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(ALPHA))


def test_proxy_keepalive_many_requests(unix_proxy: tuple[int, int]) -> None:
    import http.client

    port_a, _ = unix_proxy
    conn = http.client.HTTPConnection("127.0.0.1", port_a, timeout=5, source_address=("127.0.0.5", 0))
    try:
        for _ in range(50):
            conn.request("GET", "/openstack/latest/meta_data.json")
            resp = conn.getresponse()
            assert json.loads(resp.read())["uuid"] == ALPHA
    finally:
        conn.close()


def test_proxy_upstream_down_is_502(registry_url: str, tmp_path: Path) -> None:
    port = free_port()
    proxy = Proxy(
        meta169_argv(
            "proxy", "--upstream", f"unix:{tmp_path / 'nothing.sock'}", "--listen", f"127.0.0.1:{port}=network:net-b"
        )
    )
    try:
        t0 = time.monotonic()
        assert get(("127.0.0.1", port), "/latest/meta-data/", source="127.0.0.5")[0] == 502
        assert time.monotonic() - t0 < 3
    finally:
        proxy.stop()


def test_proxy_upstream_silent_is_504(tmp_path: Path) -> None:
    # A Unix socket that accepts and never answers.
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(path))
    silent.listen(8)
    port = free_port()
    env_argv = meta169_argv(
        "proxy", "--upstream", f"unix:{path}", "--upstream-timeout", "1", "--listen", f"127.0.0.1:{port}=network:net-b"
    )
    proxy = Proxy(env_argv)
    try:
        t0 = time.monotonic()
        assert get(("127.0.0.1", port), "/latest/meta-data/", source="127.0.0.5")[0] == 504
        assert time.monotonic() - t0 < 3
    finally:
        proxy.stop()
        silent.close()


def _secret(path: Path, value: bytes) -> Path:
    path.write_bytes(value)
    os.chmod(path, 0o600)
    return path


def test_proxy_tcp_upstream_with_hmac(registry_url: str, tmp_path: Path) -> None:
    secret = _secret(tmp_path / "secret", b"0123456789abcdef0123456789abcdef")
    srv = start_serve(registry_url, ["127.0.0.1:0=proxy"], "--proxy-secret-file", str(secret))
    host, port = srv.addresses[0]
    lport = free_port()
    proxy = Proxy(
        meta169_argv(
            "proxy",
            "--upstream",
            f"{host}:{port}",
            "--secret-file",
            str(secret),
            "--listen",
            f"127.0.0.1:{lport}=router:router-a",
        )
    )
    try:
        assert get(("127.0.0.1", lport), "/latest/user-data", source="127.0.0.6")[2] == b"beta-secret-user-data"
        # Straight to serve's TCP proxy listener with a hand-made stamp: refused.
        status, _, body = get(
            (host, port),
            "/latest/user-data",
            headers={"X-Meta169-Caller-IP": "127.0.0.6", "X-Meta169-Router-ID": "router-a"},
        )
        assert status == 403
        assert b"secret-user-data" not in body
    finally:
        proxy.stop()
        srv.stop()


def test_proxy_wrong_secret_is_refused(registry_url: str, tmp_path: Path) -> None:
    good = _secret(tmp_path / "good", b"0123456789abcdef0123456789abcdef")
    bad = _secret(tmp_path / "bad", b"ffffffffffffffffffffffffffffffff")
    srv = start_serve(registry_url, ["127.0.0.1:0=proxy"], "--proxy-secret-file", str(good))
    host, port = srv.addresses[0]
    lport = free_port()
    proxy = Proxy(
        meta169_argv(
            "proxy",
            "--upstream",
            f"{host}:{port}",
            "--secret-file",
            str(bad),
            "--listen",
            f"127.0.0.1:{lport}=router:router-a",
        )
    )
    try:
        status, _, body = get(("127.0.0.1", lport), "/latest/user-data", source="127.0.0.6")
        assert status == 403
        assert b"secret-user-data" not in body
    finally:
        proxy.stop()
        srv.stop()


def test_proxy_secret_file_must_be_private(registry_url: str, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_bytes(b"0123456789abcdef0123456789abcdef")
    os.chmod(loose, 0o644)
    result = run_cli(
        registry_url,
        "proxy",
        "--upstream",
        "127.0.0.1:1",
        "--secret-file",
        str(loose),
        "--listen",
        "127.0.0.1:1=network:net-a",
        check=False,
    )
    assert result.returncode == 2
    assert "chmod 600" in result.stderr
    assert "0123456789abcdef" not in result.stderr


def test_proxy_tcp_upstream_without_secret_is_refused(registry_url: str) -> None:
    result = run_cli(
        registry_url, "proxy", "--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:1=network:net-a", check=False
    )
    assert result.returncode == 2
    assert "--secret-file" in result.stderr


def test_proxy_pipelined_requests_answered_in_order(unix_proxy: tuple[int, int]) -> None:
    # Each answer is pending on the upstream while the next requests are already
    # read: they wait in order, reading pauses and resumes.
    port_a, _ = unix_proxy
    paths = ["/latest/meta-data/instance-id", "/latest/meta-data/no-such", "/latest/user-data"] * 7
    payload = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
    with socket.create_connection(("127.0.0.1", port_a), timeout=5, source_address=("127.0.0.5", 0)) as sock:
        sock.sendall(payload)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 ") < len(paths) or not data.endswith(b"alpha-secret-user-data"):
            assert time.monotonic() < deadline, data[-300:]
            chunk = sock.recv(65536)
            assert chunk, data[-300:]
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"404", b"200"] * 7
    assert data.count(ALPHA.encode()) == 7 and data.count(b"alpha-secret-user-data") == 7


@pytest.mark.parametrize("extra", ["", "X-Unusual: 1\r\nX-Unusual: 2\r\n"], ids=["compiled", "python"])
def test_proxy_connection_close_relays_then_closes(unix_proxy: tuple[int, int], extra: str) -> None:
    # A repeated header makes the compiled stamping step aside: both paths are covered.
    port_a, _ = unix_proxy
    request = f"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_a), timeout=5, source_address=("127.0.0.5", 0)) as sock:
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):  # ends when the proxy closes
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.count(b"Connection: close") == 1
    assert body == ALPHA.encode()


def test_proxy_pipelined_callers_each_get_their_own(unix_serve: tuple[ServeProcess, Path], registry_url: str) -> None:
    """Callers that arrive together are forwarded together, pipelined on shared
    upstream connections: every one still gets its own instance's data."""
    import asyncio

    _, sock = unix_serve
    port_a, port_b = free_port(), free_port()
    proxy = Proxy(
        meta169_argv(
            "-v",
            "--registry",
            registry_url,
            "proxy",
            "--upstream",
            f"unix:{sock}",
            "--listen",
            f"127.0.0.1:{port_a}=router:router-a",
            "--listen",
            f"127.0.0.1:{port_b}=network:net-b",
        )
    )
    expected = {
        (port_a, "127.0.0.5"): b"alpha-secret-user-data",
        (port_a, "127.0.0.6"): b"beta-secret-user-data",
        (port_b, "127.0.0.5"): b"gamma-secret-user-data",
    }
    callers = list(expected)

    async def ask(port: int, source: str, forged: bool, close: bool) -> tuple[tuple[int, str], bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            extra = "X-Forwarded-For: 127.0.0.6\r\nX-Meta169-Caller-IP: 127.0.0.6\r\n" if forged else ""
            conn = "Connection: close\r\n" if close else ""
            writer.write(f"GET /openstack/latest/user_data HTTP/1.1\r\nHost: x\r\n{extra}{conn}\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            return (port, source), head, await asyncio.wait_for(reader.readexactly(length), 10)
        finally:
            writer.close()

    async def burst() -> list[tuple[tuple[int, str], bytes, bytes]]:
        return await asyncio.gather(*(ask(*callers[i % 3], forged=i % 5 == 0, close=i % 2 == 0) for i in range(300)))

    try:
        answers = asyncio.run(burst())
    finally:
        log = proxy.stop()
    for caller, head, body in answers:
        assert head.startswith(b"HTTP/1.1 200") and body == expected[caller], (caller, head, body, log[-3000:])
