"""The HTTP plane over real loopback sockets: methods, limits, keep-alive, passwords."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meta169.api.config import ServeConfig
from meta169.api.server import RunningServer, start
from meta169.http.limits import Limits
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.model import Instance, Network, Port, SSHKey, Subnet, parse_ip, parse_network
from meta169.registry.memory import MemoryRegistry
from tests.integration.serving import get, in_process

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"


@dataclass
class InProcess:
    address: tuple[str, int]
    unix: Path | None
    registry: MemoryRegistry
    loop: asyncio.AbstractEventLoop


def _registry() -> MemoryRegistry:
    reg = MemoryRegistry()
    reg.put_network(
        Network(
            id="net-a",
            project_id="proj-a",
            subnets=(Subnet(cidr=parse_network("127.0.0.0/24"), gateway=parse_ip("127.0.0.254")),),
        )
    )
    reg.put_instance(
        Instance(
            uuid=UUID,
            name="web-1",
            project_id="proj-a",
            keys=(SSHKey(name="ops", data="ssh-ed25519 AAAAC3Nz ops@example"),),
            user_data=b"#cloud-config\nhostname: web-1\n",
            ports=(Port(network_id="net-a", mac="fa:16:3e:00:00:05", ips=(parse_ip("127.0.0.1"),)),),
        )
    )
    return reg


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[InProcess]:
    registry = _registry()
    unix = tmp_path / "proxy.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(
            ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),
            ListenerSpec(ListenAddress(unix_path=unix), Binding("proxy")),
        ),
        limits=Limits(request_timeout=0.5, keepalive_timeout=1.0, max_header_bytes=4096, max_body_bytes=2048),
        poll_interval=0.05,
    )
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, RunningServer] = {}

    def runner() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            holder["srv"] = await start(config, registry=registry)
            ready.set()

        loop.run_until_complete(boot())
        loop.run_forever()

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    assert ready.wait(5)
    running = holder["srv"]
    addr = running.addresses[0]
    try:
        yield InProcess((addr.host, addr.port), unix, registry, loop)
    finally:
        asyncio.run_coroutine_threadsafe(running.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _raw(address: tuple[str, int], payload: bytes, *, read_for: float = 2.0) -> bytes:
    with socket.create_connection(address, timeout=read_for) as sock:
        sock.sendall(payload)
        chunks = []
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_serve_head_has_length_and_no_body(srv: InProcess) -> None:
    status, headers, body = get(srv.address, "/latest/meta-data/instance-id", method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["content-length"] == str(len(UUID))


def test_serve_wrong_method_is_405_with_allow(srv: InProcess) -> None:
    status, headers, _ = get(srv.address, "/latest/meta-data/instance-id", method="DELETE")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_serve_unknown_path_is_404(srv: InProcess) -> None:
    assert get(srv.address, "/latest/meta-data/no-such-key")[0] == 404
    assert get(srv.address, "/openstack/1999-01-01/meta_data.json")[0] == 404
    assert get(srv.address, "/../etc/passwd")[0] == 404


def test_serve_query_string_is_ignored(srv: InProcess) -> None:
    assert get(srv.address, "/latest/meta-data/instance-id?x=1")[2] == UUID.encode()


def test_serve_content_types(srv: InProcess) -> None:
    assert get(srv.address, "/openstack/latest/meta_data.json")[1]["content-type"].startswith("application/json")
    assert get(srv.address, "/latest/meta-data/")[1]["content-type"].startswith("text/plain")
    assert get(srv.address, "/latest/user-data")[2] == b"#cloud-config\nhostname: web-1\n"


def test_serve_keepalive_and_pipelining_keep_order(srv: InProcess) -> None:
    req = (
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /latest/meta-data/no-such HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /latest/meta-data/hostname HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    data = _raw(srv.address, req, read_for=0.5)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"404", b"200"]
    assert data.rstrip().endswith(b"web-1")


def test_serve_http10_closes(srv: InProcess) -> None:
    data = _raw(srv.address, b"GET /latest/meta-data/hostname HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in data


def test_serve_malformed_request_is_400(srv: InProcess) -> None:
    assert _raw(srv.address, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_serve_oversized_headers_are_431(srv: InProcess) -> None:
    big = b"X-Pad: " + b"a" * 5000 + b"\r\n"
    assert _raw(srv.address, b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n").startswith(b"HTTP/1.1 431")


def test_serve_oversized_body_is_413(srv: InProcess) -> None:
    head = b"POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    assert _raw(srv.address, head).startswith(b"HTTP/1.1 413")


def test_serve_slow_client_gets_408(srv: InProcess) -> None:
    data = _raw(srv.address, b"GET /latest/meta-data/ HTTP/1.1\r\nHost", read_for=2.0)
    assert data.startswith(b"HTTP/1.1 408")


def test_serve_idle_keepalive_is_closed(srv: InProcess) -> None:
    with socket.create_connection(srv.address, timeout=3) as sock:
        t0 = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - t0 < 2.5


def test_serve_identity_headers_refused_on_direct_listener(srv: InProcess) -> None:
    status, _, body = get(srv.address, "/latest/meta-data/instance-id", headers={"X-Meta169-Caller-IP": "127.0.0.9"})
    assert status == 403
    assert UUID.encode() not in body


def test_serve_password_post_get_and_conflict(srv: InProcess) -> None:
    path = "/openstack/latest/password"
    status, _, body = get(srv.address, path)
    assert (status, body) == (200, b"")
    assert get(srv.address, path, method="POST", body=b"x" * 1021)[0] == 400
    assert get(srv.address, path, method="PUT", body=b"secret")[0] == 400
    assert get(srv.address, path, method="POST", body=b"encrypted-blob")[0] == 200
    assert get(srv.address, path)[2] == b"encrypted-blob"
    assert get(srv.address, path, method="POST", body=b"other")[0] == 409
    assert get(srv.address, "/openstack/2012-08-10/password")[0] == 404


def _unix_get(path: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(str(path))
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_serve_proxy_listener_reads_stamped_identity(srv: InProcess) -> None:
    assert srv.unix is not None
    ok = _unix_get(
        srv.unix,
        b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Meta169-Caller-IP: 127.0.0.1\r\nX-Meta169-Network-ID: net-a\r\n\r\n",
    )
    assert ok.startswith(b"HTTP/1.1 200")
    assert json.loads(ok.split(b"\r\n\r\n", 1)[1])["uuid"] == UUID
    missing = _unix_get(srv.unix, b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 400")
    unknown = _unix_get(
        srv.unix,
        b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Meta169-Caller-IP: 127.0.0.1\r\nX-Meta169-Network-ID: net-b\r\n\r\n",
    )
    assert unknown.startswith(b"HTTP/1.1 404")


def test_serve_registry_change_invalidates_cache(srv: InProcess) -> None:
    assert get(srv.address, "/latest/meta-data/hostname")[2] == b"web-1"
    old = srv.registry.get_instance(UUID)
    srv.registry.put_instance(Instance(uuid=old.uuid, name=old.name, hostname="web-2", ports=old.ports, keys=old.keys))
    t0 = time.monotonic()
    while get(srv.address, "/latest/meta-data/hostname")[2] != b"web-2":
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.02)


TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


def _token(srv: InProcess, ttl: str = "60") -> str:
    status, headers, body = get(srv.address, "/latest/api/token", method="PUT", headers={TTL: ttl})
    assert status == 200, body
    assert headers[TTL.lower()] == ttl
    return body.decode()


def test_serve_imdsv2_token_round_trip(srv: InProcess) -> None:
    token = _token(srv)
    status, _, body = get(srv.address, "/latest/meta-data/instance-id", headers={TOKEN: token})
    assert (status, body) == (200, UUID.encode())


@pytest.mark.parametrize("ttl", [None, "0", "21601", "abc", "-1"])
def test_serve_imdsv2_bad_ttl_is_400(srv: InProcess, ttl: str | None) -> None:
    headers = {} if ttl is None else {TTL: ttl}
    assert get(srv.address, "/latest/api/token", method="PUT", headers=headers)[0] == 400


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_serve_imdsv2_token_path_wrong_method_is_405(srv: InProcess, method: str) -> None:
    assert get(srv.address, "/latest/api/token", method=method, headers={TTL: "60"})[0] == 405


def test_serve_imdsv2_dated_version_put_is_403(srv: InProcess) -> None:
    assert get(srv.address, "/2021-03-23/api/token", method="PUT", headers={TTL: "60"})[0] == 403


def test_serve_imdsv2_put_with_forwarded_for_is_403(srv: InProcess) -> None:
    headers = {TTL: "60", "X-Forwarded-For": "172.17.0.2"}
    assert get(srv.address, "/latest/api/token", method="PUT", headers=headers)[0] == 403


@pytest.mark.parametrize("bad", ["garbage", "A" * 62])
def test_serve_imdsv2_invalid_token_is_401(srv: InProcess, bad: str) -> None:
    status, _, body = get(srv.address, "/latest/meta-data/instance-id", headers={TOKEN: bad})
    assert status == 401
    assert UUID.encode() not in body


def test_serve_imdsv2_required_refuses_v1_on_both_trees(srv: InProcess) -> None:
    from meta169.model import MetadataOptions

    old = srv.registry.get_instance(UUID)
    srv.registry.put_instance(
        Instance(
            uuid=old.uuid,
            name=old.name,
            ports=old.ports,
            keys=old.keys,
            user_data=old.user_data,
            metadata_options=MetadataOptions(http_tokens="required"),
        )
    )
    t0 = time.monotonic()
    while get(srv.address, "/latest/meta-data/instance-id")[0] != 401:
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.02)
    assert get(srv.address, "/openstack/latest/meta_data.json")[0] == 401
    token = _token(srv)
    assert get(srv.address, "/openstack/latest/meta_data.json", headers={TOKEN: token})[0] == 200
    assert get(srv.address, "/latest/user-data", headers={TOKEN: token})[0] == 200


def test_serve_imdsv2_disabled_endpoint_is_403(srv: InProcess) -> None:
    from meta169.model import MetadataOptions

    old = srv.registry.get_instance(UUID)
    srv.registry.put_instance(
        Instance(
            uuid=old.uuid, name=old.name, ports=old.ports, metadata_options=MetadataOptions(http_endpoint="disabled")
        )
    )
    t0 = time.monotonic()
    while get(srv.address, "/latest/meta-data/instance-id")[0] != 403:
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.02)
    assert get(srv.address, "/latest/api/token", method="PUT", headers={TTL: "60"})[0] == 403


def test_serve_connection_limit_per_ip_answers_503() -> None:
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),),
        limits=Limits(max_connections_per_ip=3),
    )
    with in_process(config, _registry()) as addresses:
        addr = (addresses[0].host, addresses[0].port)
        held = [socket.create_connection(addr, timeout=2) for _ in range(3)]
        try:
            time.sleep(0.1)
            # The refusal is written at accept time, before any request is read.
            with socket.create_connection(addr, timeout=2) as extra:
                assert extra.recv(100).startswith(b"HTTP/1.1 503")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.1)
        assert get(addr, "/latest/meta-data/instance-id")[0] == 200


def test_serve_non_utf8_percent_path_is_400(srv: InProcess) -> None:
    # Found by the fuzz suite: percent-decoding to invalid UTF-8 used to answer 500.
    assert get(srv.address, "/%ff%fe")[0] == 400
