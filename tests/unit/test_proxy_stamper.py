"""The proxy's compiled stamping writes exactly the upstream request ProxyApp writes
in Python, or declines."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.listen import Binding
from meta169.http.message import Request
from meta169.proxy.server import ProxyApp
from meta169.proxy.upstream import Upstream, UpstreamSpec
from tests.capabilities import require
from tests.http_parse import parse_request
from tests.unit.http_strategies import NAME, TARGET, VALUE

PEER = "10.0.0.11"


class _Recorder(Upstream):
    """Keeps what would be sent upstream instead of sending it."""

    def __init__(self) -> None:
        super().__init__(UpstreamSpec())
        self.sent: list[bytes] = []
        self.pipelined: list[bool] = []
        self.affinity: list[int | None] = []

    def request(
        self,
        payload: bytes,
        convert: Any,
        sink: Any,
        *,
        pipeline: bool = False,
        idempotent: bool = True,
        affinity: int | None = None,
    ) -> None:
        self.sent.append(payload)
        self.pipelined.append(pipeline)
        self.affinity.append(affinity)


@pytest.fixture(scope="module", params=[Binding("network", "net-a"), Binding("router", "router-1")], ids=str)
def app(request: pytest.FixtureRequest) -> tuple[ProxyApp, _Recorder, Any]:
    require("compiled fast path", wire.compiled(), "meta169.http._wire was not built (needs gcc and Python headers)")
    upstream = _Recorder()
    proxy = ProxyApp(request.param, upstream, None)
    fast = proxy.fast_path(Limits())
    assert fast is not None
    return proxy, upstream, fast


def _python_payload(app: tuple[ProxyApp, _Recorder, Any], data: bytes) -> bytes:
    """What ProxyApp sends for ``data`` parsed by serve's one parse path (HTTPProtocol)."""
    proxy, upstream, _ = app
    req = parse_request(data, PEER)
    assert req is not None
    proxy(req)
    return upstream.sent.pop()


def _compiled(app: tuple[ProxyApp, _Recorder, Any], data: bytes) -> Request | None:
    req = app[2](data, PEER)
    assert req is None or isinstance(req, Request)
    return req


CLOUD_INIT = (
    b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"User-Agent: Cloud-Init/22.4.2\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\n"
    b"Connection: keep-alive\r\n\r\n"
)


def test_stamper_writes_cloud_init_request_like_python(app: tuple[ProxyApp, _Recorder, Any]) -> None:
    req = _compiled(app, CLOUD_INIT)
    assert req is not None and req.prepared is not None
    assert (req.method, req.raw_path, req.keep_alive, req.peer_key) == (
        "GET",
        b"/openstack/2018-08-27/meta_data.json",
        True,
        PEER,
    )
    assert req.prepared == _python_payload(app, CLOUD_INIT)
    assert req.prepared.startswith(b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nuser-agent: Cloud-Init")
    assert b"\r\nhost: metadata\r\nx-meta169-caller-ip: 10.0.0.11\r\nx-meta169-" in req.prepared
    assert req.prepared.endswith(b"\r\n\r\n") and b"connection" not in req.prepared.lower()


def test_proxy_pipelines_only_bodiless_gets_upstream(app: tuple[ProxyApp, _Recorder, Any]) -> None:
    proxy, upstream, _ = app
    req = _compiled(app, CLOUD_INIT)
    assert req is not None
    proxy(req)  # stamped by the compiled path
    proxy(Request("HEAD", b"/latest/meta-data/", {}, b"", PEER, True))  # asked upstream as GET
    proxy(Request("GET", b"/latest/meta-data/", {"x-aws-ec2-metadata-token": "t"}, b"", PEER, True))
    proxy(Request("PUT", b"/latest/api/token", {"x-aws-ec2-metadata-token-ttl-seconds": "60"}, b"", PEER, True))
    proxy(Request("POST", b"/openstack/latest/password", {}, b"secret", PEER, True))
    assert upstream.pipelined[-5:] == [True, True, True, False, False]
    assert [p.split(b" ", 1)[0] for p in upstream.sent[-5:]] == [b"GET", b"GET", b"GET", b"PUT", b"POST"]
    # Whichever path stamped them, one guest's requests name one caller to the upstream
    # (its node when there are several), and another guest another.
    assert len(set(upstream.affinity[-5:])) == 1 and upstream.affinity[-1] is not None
    proxy(Request("GET", b"/latest/meta-data/", {"x-aws-ec2-metadata-token": "t"}, b"", "10.0.0.12", True))
    assert upstream.affinity[-1] != upstream.affinity[-2]


@pytest.mark.parametrize(
    "data",
    [
        b"HEAD /latest/meta-data/?a=b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: AQAE-token\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.99\r\nAccept: */*\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Meta169-Caller-IP: 10.0.0.12\r\nX-Meta169-Network-ID: other\r\n"
        b"X-Neutron-Router-ID: r\r\nX-OVN-Network-ID: n\r\nX-Instance-ID: i\r\nForwarded: for=1.2.3.4\r\n"
        b"X-Real-IP: 1.2.3.4\r\nTrue-Client-IP: 1.2.3.4\r\nx-tenant-id: t\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Proxy-Connection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nX-Empty:\r\nX-Spaces: \t a b \t\r\n\r\n",
    ],
)
def test_stamper_matches_python_on_the_edges(app: tuple[ProxyApp, _Recorder, Any], data: bytes) -> None:
    req = _compiled(app, data)
    assert req is not None and req.prepared is not None
    assert req.prepared == _python_payload(app, data)


def test_stamper_drops_every_forged_identity(app: tuple[ProxyApp, _Recorder, Any]) -> None:
    data = (
        b"GET / HTTP/1.1\r\nX-Meta169-Caller-IP: 10.0.0.12\r\nX-Forwarded-For: 10.0.0.12\r\n"
        b"X-Neutron-Network-ID: other\r\n\r\n"
    )
    req = _compiled(app, data)
    assert req is not None and req.prepared is not None
    assert b"10.0.0.12" not in req.prepared and b"other" not in req.prepared
    assert req.prepared.count(b"x-meta169-caller-ip: ") == 1
    assert b"X-Meta169-Guest-Forwarded: 1\r\n" in req.prepared


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # repeats are joined in Python
        b"GET / HTTP/1.1\r\nX-Forwarded-For: a\r\nx-forwarded-for: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
        b"POST /openstack/latest/password HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"GET /a%20b HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
    ],
)
def test_stamper_declines_what_python_must_handle(app: tuple[ProxyApp, _Recorder, Any], data: bytes) -> None:
    assert _compiled(app, data) is None


def test_stamper_needs_a_peer(app: tuple[ProxyApp, _Recorder, Any]) -> None:
    assert app[2](CLOUD_INIT, "") is None


def test_stamper_absent_with_a_tcp_secret() -> None:
    assert ProxyApp(Binding("network", "net-a"), _Recorder(), b"s" * 32).fast_path(Limits()) is None


@settings(max_examples=500, deadline=None)
@given(method=st.sampled_from(["GET", "HEAD"]), target=TARGET, headers=st.lists(st.tuples(NAME, VALUE), max_size=7))
def test_stamper_agrees_with_python(
    app: tuple[ProxyApp, _Recorder, Any], method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    data = (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
    req = _compiled(app, data)
    if req is None:
        return  # declining is always allowed: the Python path stamps it
    assert req.prepared == _python_payload(app, data), data
    assert req.raw_path == target.encode() and req.method == method


# -- at serve's limits --------------------------------------------------------------------

# The longest identity the stamp can carry: a 128-character network id (model.check_id)
# and the longest text of an IPv6 address (INET6_ADDRSTRLEN - 1).
LONG_ID = "n" * 128
LONG_PEER = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"


def _bounded(limits: Limits) -> tuple[ProxyApp, _Recorder, Any]:
    require("compiled fast path", wire.compiled(), "meta169.http._wire was not built (needs gcc and Python headers)")
    upstream = _Recorder()
    proxy = ProxyApp(Binding("network", LONG_ID), upstream, None)
    return proxy, upstream, proxy.fast_path(limits)


def _widest(limits: Limits, header_bytes: int) -> bytes:
    """The request whose stamped form outgrows it most: ``max_headers`` distinct
    headers written "name:value" (each gains a space), one of them an empty
    X-Forwarded-For (replaced by the longer marker line), and HTTPProtocol's count
    of header bytes (name + value + 4 each) equal to ``header_bytes``."""
    names = ["x-forwarded-for"] + [f"h{i:02d}" for i in range(limits.max_headers - 1)]
    base = sum(len(n) + 4 for n in names)  # every value empty
    pad = header_bytes - base - (limits.max_headers - 2)  # h01.. get "v", h00 the rest
    assert pad >= 0
    lines = ["x-forwarded-for:", "h00:" + "v" * pad] + [f"{n}:v" for n in names[2:]]
    return ("GET / HTTP/1.1\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


def _both(app: tuple[ProxyApp, _Recorder, Any], data: bytes, limits: Limits) -> tuple[bytes | None, bytes | None]:
    """(compiled payload, Python payload); None where that path refused or declined."""
    proxy, upstream, fast = app
    req = fast(data, LONG_PEER)
    parsed = parse_request(data, LONG_PEER, limits)
    python = None
    if parsed is not None:
        proxy(parsed)
        python = upstream.sent.pop()
    return (None if req is None else req.prepared), python


def test_stamper_at_the_header_limits_writes_what_python_writes() -> None:
    limits = Limits()
    app = _bounded(limits)
    data = _widest(limits, limits.max_header_bytes)
    assert len(data) <= limits.max_header_bytes
    compiled, python = _both(app, data, limits)
    # The output outgrows the input by the most it can: the buffer the C code sized
    # for it is checked on every write, and had it been too small, this would decline.
    assert python is not None and compiled == python
    assert len(compiled) > len(data) + limits.max_headers
    assert compiled.endswith(f"x-meta169-caller-ip: {LONG_PEER}\r\nx-meta169-network-id: {LONG_ID}\r\n\r\n".encode())
    # One byte over serve's count: Python answers 431, the compiled path declines.
    assert _both(app, _widest(limits, limits.max_header_bytes + 1), limits) == (None, None)


def test_stamper_at_the_header_count_limit() -> None:
    limits = Limits(max_headers=20)
    app = _bounded(limits)
    lines = [f"h{i}: v" for i in range(limits.max_headers)]
    data = ("GET / HTTP/1.1\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode()
    compiled, python = _both(app, data, limits)
    assert python is not None and compiled == python
    over = data[:-2] + b"h-over: v\r\n\r\n"
    assert _both(app, over, limits) == (None, None)


def test_stamper_at_the_url_limit() -> None:
    limits = Limits()
    app = _bounded(limits)
    target = "/latest/meta-data/" + "a" * (limits.max_url_bytes - len("/latest/meta-data/?q=")) + "?q="
    assert len(target) == limits.max_url_bytes
    data = f"HEAD {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode()
    compiled, python = _both(app, data, limits)
    assert python is not None and compiled == python
    over = data.replace(b"?q=", b"?q=x")
    assert _both(app, over, limits) == (None, None)


def test_stamper_at_the_head_length_limit() -> None:
    # The compiled path also bounds the whole head by max_header_bytes (serve counts
    # only the headers): at the bound it stamps, one byte over it leaves the request
    # to Python, which still stamps it.
    limits = Limits(max_header_bytes=600)
    app = _bounded(limits)
    head = b"GET / HTTP/1.1\r\nuser-agent: " + b"u" * 400 + b"\r\n\r\n"
    data = head.replace(b"u" * 400, b"u" * (400 + limits.max_header_bytes - len(head)))
    assert len(data) == limits.max_header_bytes
    compiled, python = _both(app, data, limits)
    assert python is not None and compiled == python
    compiled, python = _both(app, data.replace(b"uu", b"uuu", 1), limits)
    assert compiled is None and python is not None
