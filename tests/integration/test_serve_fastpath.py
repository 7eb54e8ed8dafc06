"""The compiled fast path inside serve: it repeats exactly what the Python path
answered, for every document of a real site, and stops the moment it must."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import re
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meta169.api import tokens
from meta169.api.cache import SiteCache
from meta169.api.config import ServeConfig
from meta169.api.metadata import MetadataApp
from meta169.api.ratelimit import Buckets, RateLimit
from meta169.api.server import RunningServer, start
from meta169.api.tokens import KeyRing
from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.http.message import Request, Response, date_line
from meta169.model import Instance, MetadataOptions, Network, Port, SSHKey, Subnet, parse_ip, parse_network
from meta169.proxy.upstream import Upstream, UpstreamSpec
from meta169.registry.memory import MemoryRegistry
from meta169.render import RenderOptions
from tests.capabilities import require
from tests.http_parse import parse_request
from tests.integration.serving import get, in_process, metrics_after_first_poll, proxy_in_process
from tests.scrape import scrape, total

UUID = "5e0c2d9a-8d8c-4f6e-9c1a-0d9c2b7f1a11"
OTHER_UUID = "7a1f3c22-2b4d-4e8f-8a0b-6c5d4e3f2a10"
PEER = "10.0.0.11"


@pytest.fixture(autouse=True)
def _compiled() -> None:
    require("compiled fast path", wire.compiled(), "meta169.http._wire was not built (needs gcc and Python headers)")


def _registry(options: MetadataOptions | None = None) -> MemoryRegistry:
    reg = MemoryRegistry()
    reg.put_network(
        Network(
            id="net-a",
            project_id="proj-a",
            subnets=(
                Subnet(cidr=parse_network("10.0.0.0/24"), gateway=parse_ip("10.0.0.1")),
                Subnet(cidr=parse_network("127.0.0.0/24"), gateway=parse_ip("127.0.0.254")),
            ),
        )
    )
    reg.put_instance(
        Instance(
            uuid=UUID,
            name="web-1",
            project_id="proj-a",
            availability_zone="az-1",
            metadata={"role": "web", "tier": "front"},
            keys=(SSHKey(name="ops", data="ssh-ed25519 AAAAC3Nz ops@example"),),
            user_data=b"#cloud-config\nhostname: web-1\n",
            vendor_data={"motd": "hello"},
            tags={"team": "blue"},
            ports=(
                Port(
                    network_id="net-a",
                    mac="fa:16:3e:00:00:05",
                    ips=(parse_ip(PEER), parse_ip("127.0.0.1")),
                ),
            ),
            metadata_options=options,
        )
    )
    return reg


def _network_config(rate_limit: RateLimit | None = None) -> ServeConfig:
    return ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),),
        rate_limit=rate_limit,
    )


def _request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nAccept: */*\r\n{extra}\r\n".encode()


async def _python_answer(app: MetadataApp, data: bytes) -> bytes:
    req = parse_request(data, PEER)
    assert req is not None
    return await _answer_of(app, req)


async def _answer_of(app: MetadataApp, req: Request) -> bytes:
    """The reply the Python path gives ``req`` (the status line only, if not a document)."""
    result: Any = app(req)
    if isinstance(result, Awaitable):
        result = await result
    if isinstance(result, Response):
        return b"HTTP/1.1 %d" % result.status
    head, body = result
    return b"".join((head, date_line(), b"\r\n", body))


def _without_date(reply: bytes) -> bytes:
    head, _, body = reply.partition(b"\r\n\r\n")
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Date: ")) + b"\r\n\r\n" + body


def _without_seed(reply: bytes) -> bytes:
    start = reply.find(b'"random_seed": "')
    if start < 0:
        return reply
    start += len(b'"random_seed": "')
    return reply[:start] + reply[reply.index(b'"', start) :]


def _tokens_required_app() -> tuple[MetadataApp, wire.Answer, SiteCache, KeyRing]:
    """An app on a network listener for an instance that requires IMDSv2 tokens."""
    cache = SiteCache(_registry(MetadataOptions(http_tokens="required")), RenderOptions())
    ring = KeyRing.generate()
    app = MetadataApp(cache, Binding("network", "net-a"), token_keys=ring)
    fast = app.fast_path(Limits())
    assert fast is not None
    return app, fast, cache, ring


@pytest.fixture
def app_and_fast() -> Iterator[tuple[MetadataApp, wire.Answer, SiteCache, MemoryRegistry]]:
    registry = _registry()
    cache = SiteCache(registry, RenderOptions())
    app = MetadataApp(cache, Binding("network", "net-a"))
    fast = app.fast_path(Limits())
    assert fast is not None
    try:
        yield app, fast, cache, registry
    finally:
        cache.close()


def test_fastpath_repeats_every_document_byte_for_byte(
    app_and_fast: tuple[MetadataApp, wire.Answer, SiteCache, MemoryRegistry],
) -> None:
    app, fast, cache, _ = app_and_fast

    async def crawl() -> int:
        first = await _python_answer(app, _request("/"))  # resolves the caller
        assert first.startswith(b"HTTP/1.1 200")
        site = cache.by_caller[("net-a", "", PEER)]
        paths = [p for p in site.documents if p]  # type: ignore[union-attr]
        assert len(paths) > 100
        compared = 0
        for path in paths + [p + "/" for p in paths]:
            for query in ("", "?x=1"):
                data = _request(path + query)
                python = await _python_answer(app, data)
                compiled = fast(data, PEER)
                assert compiled is not None, path
                reply, keep = compiled
                assert keep is True
                assert _without_seed(_without_date(reply)) == _without_seed(_without_date(python)), path
                assert reply.count(b"Date: ") == 1
                compared += 1
        return compared

    assert asyncio.run(crawl()) > 200


@pytest.mark.parametrize(
    "first",
    ["/2009-04-04/meta-data/instance-id", "/latest/meta-data/", "/openstack/2018-08-27/meta_data.json", "/"],
)
def test_fastpath_answers_a_whole_version_after_its_first_document(
    app_and_fast: tuple[MetadataApp, wire.Answer, SiteCache, MemoryRegistry], first: str
) -> None:
    """A guest's crawl asks each document once: after the Python path answered the
    first document of a version, the fast path answers every other one of it (and
    each listing with its slash) exactly as the Python path would, and nothing of
    the versions not asked yet."""
    from meta169.render.site import section_of

    app, fast, cache, _ = app_and_fast

    async def crawl() -> int:
        assert (await _python_answer(app, _request(first))).startswith(b"HTTP/1.1 200")
        site = cache.by_caller[("net-a", "", PEER)]
        section = section_of(first)
        assert section is not None
        keys = [k for k in site.documents if section_of(k) == section]  # type: ignore[union-attr]
        listings = {k.rsplit("/", 1)[0] for k in keys}
        answered = 0
        for path in keys + [k + "/" for k in keys if k in listings and k != "/"]:
            compiled = fast(_request(path), PEER)
            assert compiled is not None, path
            python = await _python_answer(app, _request(path))
            assert _without_seed(_without_date(compiled[0])) == _without_seed(_without_date(python)), path
            answered += 1
        others = [k for k in site.documents if section_of(k) not in (section, None)]  # type: ignore[union-attr]
        assert others and all(fast(_request(k), PEER) is None for k in others)
        return answered

    assert asyncio.run(crawl()) >= (1 if first == "/" else 4)


def test_fastpath_takes_a_token_from_its_first_use() -> None:
    """A token serve just issued is known to the fast path: the guest's first request
    with it is not a trip through the Python path."""
    app, fast, cache, _ = _tokens_required_app()
    try:

        async def issue() -> str:
            put = b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
            req = parse_request(put, PEER)
            assert req is not None
            issued = app(req)
            if isinstance(issued, Awaitable):
                issued = await issued
            assert isinstance(issued, Response) and issued.status == 200
            return f"X-aws-ec2-metadata-token: {issued.body.decode()}\r\n"

        async def run() -> None:
            # The caller's first request is the Python path's (it is resolved there).
            assert (await _python_answer(app, _request("/latest/meta-data/", await issue()))).startswith(
                b"HTTP/1.1 200"
            )
            fresh = await issue()
            compiled = fast(_request("/latest/meta-data/instance-id", fresh), PEER)
            assert compiled is not None and compiled[0].endswith(UUID.encode())
            forged = f"X-aws-ec2-metadata-token: {tokens.issue(KeyRing.generate(), UUID, 60)}\r\n"
            assert fast(_request("/latest/meta-data/instance-id", forged), PEER) is None

        asyncio.run(run())
    finally:
        cache.close()


def test_fastpath_declines_what_the_python_path_must_judge(
    app_and_fast: tuple[MetadataApp, wire.Answer, SiteCache, MemoryRegistry],
) -> None:
    app, fast, cache, registry = app_and_fast

    async def run() -> None:
        path = "/latest/meta-data/instance-id"
        assert (await _python_answer(app, _request(path))).endswith(UUID.encode())
        assert fast(_request(path), PEER) is not None
        # A token must be checked, identity headers refused, unknown paths 404'd,
        # another peer resolved: none of that is the fast path's to answer.
        assert fast(_request(path, "X-aws-ec2-metadata-token: forged\r\n"), PEER) is None
        assert fast(_request(path, "X-Meta169-Caller-IP: 10.0.0.12\r\n"), PEER) is None
        assert fast(_request("/latest/meta-data/nothing"), PEER) is None
        assert fast(_request(path), "10.0.0.12") is None
        assert (await _python_answer(app, _request(path, "X-aws-ec2-metadata-token: forged\r\n"))) == b"HTTP/1.1 401"
        # A registry change drops the caller's table with its site.
        registry.put_instance(
            Instance(uuid=UUID, name="web-1", project_id="proj-a", ports=registry.get_instance(UUID).ports)
        )
        await cache.poll_once()
        assert fast(_request(path), PEER) is None
        assert (await _python_answer(app, _request(path))).endswith(UUID.encode())
        assert fast(_request(path), PEER) is not None

    async def main() -> None:
        await cache.poll_once()
        await run()

    asyncio.run(main())


def test_fastpath_with_tokens_required_answers_only_valid_tokens() -> None:
    app, fast, cache, ring = _tokens_required_app()
    try:

        async def run() -> None:
            path = "/latest/meta-data/instance-id"
            token = tokens.issue(ring, UUID, 60)
            with_token = _request(path, f"X-aws-ec2-metadata-token: {token}\r\n")
            assert await _python_answer(app, _request(path)) == b"HTTP/1.1 401"
            assert fast(with_token, PEER) is None  # not checked yet: the Python path checks the seal
            python = await _python_answer(app, with_token)
            assert python.endswith(UUID.encode())
            for _ in range(3):
                compiled = fast(with_token, PEER)
                assert compiled is not None and _without_date(compiled[0]) == _without_date(python)
                # A tokenless repeat, a forged or another instance's token: still the Python path's 401.
                assert fast(_request(path), PEER) is None
                assert await _python_answer(app, _request(path)) == b"HTTP/1.1 401"
                forged = _request(path, f"X-aws-ec2-metadata-token: {tokens.issue(KeyRing.generate(), UUID, 60)}\r\n")
                assert fast(forged, PEER) is None
                assert await _python_answer(app, forged) == b"HTTP/1.1 401"
            other = _request(path, f"X-aws-ec2-metadata-token: {tokens.issue(ring, OTHER_UUID, 60)}\r\n")
            assert fast(other, PEER) is None and await _python_answer(app, other) == b"HTTP/1.1 401"
            # The caller's table says tokens are required, so it outlives no option change:
            # a registry change drops it with the site.
            assert cache.wire_sites("net-a", "")[PEER][-1] is True

        asyncio.run(run())
    finally:
        cache.close()


def test_fastpath_token_table_stays_bounded_under_a_flood() -> None:
    # Forged tokens are refused by the Python path and never recorded; a guest
    # minting valid tokens in a loop keeps only its newest few.
    registry = _registry()
    cache = SiteCache(registry, RenderOptions())
    ring = KeyRing.generate()
    validated = tokens.Validated(max_tokens=64, per_instance=4)
    app = MetadataApp(cache, Binding("network", "net-a"), token_keys=ring, validated_tokens=validated)
    try:

        async def run() -> None:
            path = "/latest/meta-data/instance-id"
            for _ in range(200):
                forged = tokens.issue(KeyRing.generate(), UUID, 60)
                assert await _python_answer(app, _request(path, f"X-aws-ec2-metadata-token: {forged}\r\n")) == (
                    b"HTTP/1.1 401"
                )
            assert len(validated) == 0
            minted = [tokens.issue(ring, UUID, 60) for _ in range(50)]
            for token in minted:
                reply = await _python_answer(app, _request(path, f"X-aws-ec2-metadata-token: {token}\r\n"))
                assert reply.endswith(UUID.encode())
            assert set(validated.table) == {t.encode() for t in minted[-4:]}

        asyncio.run(run())
    finally:
        cache.close()


def test_fastpath_shares_the_instance_rate_limit(tmp_path: Path) -> None:
    registry = _registry()
    config = _network_config(RateLimit(rate=0.01, burst=6))
    with in_process(config, registry) as addresses:
        address = (addresses[0].host, addresses[0].port)
        statuses = [get(address, "/latest/meta-data/instance-id")[0] for _ in range(6)]
        assert statuses == [200] * 6  # the first from Python, the rest compiled
        status, headers, _ = get(address, "/latest/meta-data/instance-id")
        assert status == 429 and int(headers["retry-after"]) >= 1


def test_fastpath_rate_limit_counts_both_paths() -> None:
    buckets = Buckets(RateLimit(rate=0.01, burst=4))
    registry = _registry()
    cache = SiteCache(registry, RenderOptions())
    app = MetadataApp(cache, Binding("network", "net-a"), buckets=buckets)
    fast = app.fast_path(Limits())
    assert fast is not None
    try:

        async def run() -> None:
            path = "/latest/meta-data/instance-id"
            assert (await _python_answer(app, _request(path))).endswith(UUID.encode())  # 1 (Python)
            assert fast(_request(path), PEER) is not None  # 2 (compiled)
            assert (await _python_answer(app, _request("/latest/meta-data/"))).startswith(b"HTTP/1.1 200")  # 3
            assert fast(_request(path), PEER) is not None  # 4
            assert fast(_request(path), PEER) is None  # empty: declined...
            assert await _python_answer(app, _request(path)) == b"HTTP/1.1 429"  # ...and refused by Python

        asyncio.run(run())
    finally:
        cache.close()


def test_fastpath_used_by_serve_connections_keeps_keepalive_and_close(tmp_path: Path) -> None:
    import http.client

    registry = _registry()
    config = _network_config(RateLimit())
    with in_process(config, registry) as addresses:
        conn = http.client.HTTPConnection(addresses[0].host, addresses[0].port, timeout=5)
        try:
            bodies = []
            for _ in range(5):  # one socket: the first answer from Python, then compiled
                conn.request("GET", "/openstack/latest/meta_data.json")
                resp = conn.getresponse()
                assert resp.status == 200 and resp.getheader("Connection") is None
                bodies.append(resp.read())
            seeds = {b[b.index(b'"random_seed"') :][:60] for b in bodies}
            assert len(seeds) == 5
            conn.request("GET", "/latest/meta-data/instance-id", headers={"Connection": "close"})
            resp = conn.getresponse()
            assert resp.getheader("Connection") == "close" and resp.read() == UUID.encode()
            assert resp.will_close
        finally:
            conn.close()
        t0 = time.monotonic()
        assert get((addresses[0].host, addresses[0].port), "/latest/meta-data/instance-id")[2] == UUID.encode()
        assert time.monotonic() - t0 < 2


def test_fastpath_absent_where_python_must_check_every_request() -> None:
    cache = SiteCache(_registry(), RenderOptions())
    try:
        # A proxy over TCP signs every request (HMAC, nonce); Neutron signs the instance id.
        assert MetadataApp(cache, Binding("proxy"), proxy_secret=b"s" * 32).fast_path(Limits()) is None
        assert MetadataApp(cache, Binding("neutron"), neutron_secret=b"s").fast_path(Limits()) is None
        assert MetadataApp(cache, Binding("proxy")).fast_path(Limits()) is not None
    finally:
        cache.close()


def _stamped(path: str, ip: str = PEER, scope: str = "X-Meta169-Network-ID: net-a", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nhost: metadata\r\naccept: */*\r\nX-Meta169-Caller-IP: {ip}\r\n{scope}\r\n"
        f"content-length: 0\r\n{extra}\r\n"
    ).encode()


async def _python_proxy_answer(app: MetadataApp, data: bytes) -> bytes:
    cap = _parse(data)
    return await _answer_of(app, Request("GET", cap[0], cap[1], b"", "", True, True))


def _parse(data: bytes) -> tuple[bytes, dict[str, str]]:
    lines = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.decode().strip()
    return lines[0].split(b" ")[1], headers


def test_fastpath_on_the_proxy_socket_keys_by_the_stamp() -> None:
    registry = _registry()
    cache = SiteCache(registry, RenderOptions())
    app = MetadataApp(cache, Binding("proxy"))
    fast = app.fast_path(Limits())
    assert fast is not None
    try:

        async def run() -> None:
            await cache.poll_once()
            site_paths = ["/latest/meta-data/instance-id", "/openstack/latest/meta_data.json", "/latest/meta-data/"]
            for path in site_paths:
                python = await _python_proxy_answer(app, _stamped(path))
                assert python.startswith(b"HTTP/1.1 200 OK"), python
                compiled = fast(_stamped(path), "")
                assert compiled is not None, path
                assert _without_seed(_without_date(compiled[0])) == _without_seed(_without_date(python))
            path = site_paths[0]
            # Another caller, another scope kind, an unknown network: not remembered.
            assert fast(_stamped(path, ip="10.0.0.12"), "") is None
            assert fast(_stamped(path, scope="X-Meta169-Router-ID: net-a"), "") is None
            assert fast(_stamped(path, scope="X-Meta169-Network-ID: net-b"), "") is None
            # The same caller spelled with an extra identity header or a token: Python's.
            assert fast(_stamped(path, extra="X-Meta169-Guest-Forwarded: 1\r\n"), "") is None
            assert fast(_stamped(path, extra="X-aws-ec2-metadata-token: t\r\n"), "") is None
            # A registry change drops the slot.
            registry.put_instance(
                Instance(uuid=UUID, name="web-2", project_id="proj-a", ports=registry.get_instance(UUID).ports)
            )
            await cache.poll_once()
            assert fast(_stamped(path), "") is None

        asyncio.run(run())
    finally:
        cache.close()


def test_fastpath_request_type_unchanged() -> None:
    # The Python path still builds Requests the same way for what the fast path declines.
    req = parse_request(_request("/x", "X-aws-ec2-metadata-token: t\r\n"), PEER)
    assert isinstance(req, Request) and req.headers["x-aws-ec2-metadata-token"] == "t"


def test_fastpath_remembers_only_the_site_the_cache_holds(
    app_and_fast: tuple[MetadataApp, wire.Answer, SiteCache, MemoryRegistry],
) -> None:
    app, fast, cache, _ = app_and_fast

    async def run() -> None:
        await _python_answer(app, _request("/"))
        key = ("net-a", "", PEER)
        held = cache.by_caller[key]
        stale = dataclasses.replace(held)  # e.g. a site loaded across a registry change
        cache.remember_wire(key, PEER, stale, [(b"/stale", (b"HTTP/1.1 200 OK\r\n", b"old"))])
        assert fast(_request("/stale"), PEER) is None
        cache.remember_wire(key, PEER, held, [(b"/fresh", (b"HTTP/1.1 200 OK\r\n", b"new"))])
        assert fast(_request("/fresh"), PEER) is not None

    asyncio.run(run())


def test_serve_without_the_extension_answers_the_same(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As on a machine where the C extension could not be built: every request
    # takes the Python path, with the same answers, and serve says so at start.
    monkeypatch.setattr(wire, "_wire", None)
    cache = SiteCache(_registry(), RenderOptions())
    try:
        assert MetadataApp(cache, Binding("network", "net-a")).fast_path(Limits()) is None
    finally:
        cache.close()
    config = _network_config(RateLimit(rate=0.01, burst=3))
    with in_process(config, _registry()) as addresses:
        address = (addresses[0].host, addresses[0].port)
        assert [get(address, "/latest/meta-data/instance-id")[2] for _ in range(3)] == [UUID.encode()] * 3
        assert get(address, "/latest/meta-data/instance-id")[0] == 429
    assert "compiled fast path not built" in caplog.text


def _read_replies(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` replies off ``sock``, framed by Content-Length, as (status, body)."""
    data = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            length = int(re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", data[:end]).group(1))  # type: ignore[union-attr]
            if len(data) >= end + 4 + length:
                out.append((int(data[9:12]), data[end + 4 : end + 4 + length]))
                data = data[end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"serve closed after {len(out)} replies"
        data += chunk
    return out


def test_serve_answers_a_proxy_pipeline_in_order(tmp_path: Path) -> None:
    """The proxy pipelines the GETs that reach it together: serve answers them in order
    whichever path answers each (compiled for what it remembers, Python for the rest)."""
    registry = _registry()
    path = tmp_path / "serve.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress(unix_path=path), Binding("proxy")),),
    )
    with in_process(config, registry), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        known = "/latest/meta-data/instance-id"
        sock.sendall(_stamped(known))  # answered by Python once: remembered from now on
        assert _read_replies(sock, 1) == [(200, UUID.encode())]
        pipeline = [
            _stamped(known),  # compiled
            _stamped(known),  # compiled
            _stamped("/latest/meta-data/hostname"),  # of the version remembered: compiled
            _stamped(known, extra="X-aws-ec2-metadata-token: bogus\r\n"),  # a token: Python (401)
            _stamped("/nope"),  # Python: 404
            _stamped(known),  # compiled again, after the Python ones
        ]
        for _ in range(3):  # and once more, now that more is remembered
            sock.sendall(b"".join(pipeline))
            replies = _read_replies(sock, len(pipeline))
            assert [status for status, _ in replies] == [200, 200, 200, 401, 404, 200]
            assert replies[0][1] == replies[1][1] == replies[5][1] == UUID.encode()
            assert replies[2][1] == b"web-1"


def test_serve_pipeline_goes_back_to_the_compiled_path_after_a_python_request(tmp_path: Path) -> None:
    """In a boot storm most of the proxy's pipelines hold one request the Python path
    must answer (a caller not yet cached, a token PUT) among remembered ones: the
    remembered requests after it are still the compiled path's, not parsed in
    Python for the rest of the read."""
    path = tmp_path / "serve.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress(unix_path=path), Binding("proxy")),),
        poll_interval=0.05,
        rate_limit=None,
        metrics_listen=ListenAddress("127.0.0.1", 0),
    )
    known = "/latest/meta-data/instance-id"
    with _running(config, _registry()) as running, socket.socket(socket.AF_UNIX) as sock:
        metrics = metrics_after_first_poll(running)
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(_stamped(known))
        assert _read_replies(sock, 1) == [(200, UUID.encode())]
        before = total(scrape(metrics), "meta169_serve_requests_total", path="fast")
        pipeline = [_stamped(known), _stamped("/nope"), _stamped(known), _stamped("/nope"), _stamped(known)]
        sock.sendall(b"".join(pipeline))
        assert [status for status, _ in _read_replies(sock, len(pipeline))] == [200, 404, 200, 404, 200]
        assert total(scrape(metrics), "meta169_serve_requests_total", path="fast") - before == 3


def test_serve_pipeline_split_anywhere_answers_every_request_in_order(tmp_path: Path) -> None:
    """Pipelines of remembered, new, token-carrying and unknown requests, cut into
    reads at random places: serve answers each exactly once, in order, whichever
    path takes it and wherever a read ends (the compiled path hands the Python path
    the rest of a read, the Python path hands the next read back)."""
    import random

    registry = _registry()
    path = tmp_path / "serve.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress(unix_path=path), Binding("proxy")),),
        rate_limit=None,
    )
    kinds = {
        "known": (_stamped("/latest/meta-data/instance-id"), 200, UUID.encode()),
        "hostname": (_stamped("/latest/meta-data/hostname"), 200, b"web-1"),
        "token": (_stamped("/latest/meta-data/instance-id", extra="X-aws-ec2-metadata-token: x\r\n"), 401, None),
        "forwarded": (
            _stamped("/latest/meta-data/instance-id", extra="X-Meta169-Guest-Forwarded: 1\r\n"),
            200,
            UUID.encode(),
        ),
        "missing": (_stamped("/nope"), 404, None),
    }
    rng = random.Random(169)
    with in_process(config, registry), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        for _ in range(60):
            chosen = [rng.choice(list(kinds)) for _ in range(rng.randint(1, 8))]
            data = b"".join(kinds[k][0] for k in chosen)
            cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 3))))
            for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
                sock.sendall(data[start:end])
                time.sleep(rng.choice([0, 0, 0.002]))
            replies = _read_replies(sock, len(chosen))
            for kind, (status, body) in zip(chosen, replies, strict=True):
                assert status == kinds[kind][1], (chosen, replies)
                assert kinds[kind][2] is None or body == kinds[kind][2], (chosen, replies)


def test_serve_keeps_its_listen_backlog(tmp_path: Path) -> None:
    """uvloop listens anew with a backlog of its own (100) unless told: a burst of
    per-request connections (Neutron's haproxy, a proxy filling its pool) would then
    be refused with EAGAIN while serve accepts one per loop iteration."""
    import shutil
    import subprocess

    from meta169.http.listen import LISTEN_BACKLOG

    ss = shutil.which("ss")
    require("ss (iproute2)", ss is not None, "ss from iproute2 reads the listen backlog")
    assert ss is not None
    path = tmp_path / "serve.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(
            ListenerSpec(ListenAddress(unix_path=path), Binding("proxy")),
            ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),
        ),
    )
    want = min(LISTEN_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    with in_process(config, _registry()) as addresses:
        unix = subprocess.run([ss, "-Hxl"], capture_output=True, text=True, check=True).stdout
        tcp = subprocess.run([ss, "-Hltn"], capture_output=True, text=True, check=True).stdout
    # Send-Q of a listening socket is its backlog
    assert any(str(path) in line and line.split()[3] == str(want) for line in unix.splitlines()), unix
    port = addresses[1].port
    assert any(line.split()[3].endswith(f":{port}") and line.split()[2] == str(want) for line in tcp.splitlines()), tcp


@contextlib.contextmanager
def _running(config: ServeConfig, registry: MemoryRegistry) -> Iterator[RunningServer]:
    """``api.server.start`` on a loop in a thread; the running server."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start(config, registry=registry), loop).result(10)
        try:
            yield running
        finally:
            asyncio.run_coroutine_threadsafe(running.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_serve_imdsv2_clients_stay_on_the_fast_path(tmp_path: Path) -> None:
    """An IMDSv2 client (the token PUT, then the token on every GET of one keep-alive
    connection, as botocore and cloud-init send it) straight to a network listener
    and through the proxy, for an instance that requires tokens: the repeats are the
    compiled path's, its counters say so, and refusals stay the Python path's 401."""
    ttl, header, doc, repeats = "X-aws-ec2-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token", "/latest/", 8
    sock_path = tmp_path / "serve.sock"
    config = ServeConfig(
        registry_url="memory://",
        listeners=(
            ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),
            ListenerSpec(ListenAddress(unix_path=sock_path), Binding("proxy")),
        ),
        poll_interval=0.05,
        rate_limit=None,
        metrics_listen=ListenAddress("127.0.0.1", 0),
    )
    with _running(config, _registry(MetadataOptions(http_tokens="required"))) as running:
        metrics = metrics_after_first_poll(running)
        direct = (running.addresses[0].host, running.addresses[0].port)
        with proxy_in_process(Upstream(UpstreamSpec(unix_path=sock_path)), Binding("network", "net-a")) as proxy:
            for address in (direct, proxy):
                status, _, token = get(address, "/latest/api/token", method="PUT", headers={ttl: "60"})
                assert status == 200
                conn = http.client.HTTPConnection(*address, timeout=5)
                try:
                    bodies = set()
                    for _ in range(repeats):
                        conn.request("GET", doc + "meta-data/instance-id", headers={header: token.decode()})
                        resp = conn.getresponse()
                        assert resp.status == 200
                        bodies.add(resp.read())
                    assert bodies == {UUID.encode()}
                    forged = tokens.issue(KeyRing.generate(), UUID, 60)
                    for refused in ({}, {header: forged}, {header: token.decode()[:-1]}):
                        conn.request("GET", doc + "meta-data/instance-id", headers=refused)
                        resp = conn.getresponse()
                        assert (resp.status, resp.read()) == (401, b"Unauthorized\n"), refused
                finally:
                    conn.close()
        samples = scrape(metrics)
    # The first GET with a token on each listener is checked in Python, the rest are repeats.
    assert total(samples, "meta169_serve_requests_total", path="fast") >= 2 * (repeats - 1)
    assert total(samples, "meta169_serve_requests_total", path="python", status="4xx") >= 6
