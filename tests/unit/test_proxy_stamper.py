"""The proxy's compiled stamping writes exactly the upstream request ProxyApp writes
in Python, or declines."""

from __future__ import annotations

from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.api import wire
from meta169.api.http import Limits, Request
from meta169.api.identity import Binding
from meta169.proxy.server import ProxyApp
from meta169.proxy.upstream import Upstream, UpstreamSpec
from tests.conftest import require
from tests.unit.http_strategies import NAME, TARGET, VALUE

PEER = "10.0.0.11"


class _Recorder(Upstream):
    """Keeps what would be sent upstream instead of sending it."""

    def __init__(self) -> None:
        super().__init__(UpstreamSpec())
        self.sent: list[bytes] = []
        self.pipelined: list[bool] = []

    def request(self, payload: bytes, convert: Any, sink: Any, *, pipeline: bool = False) -> None:
        self.sent.append(payload)
        self.pipelined.append(pipeline)


@pytest.fixture(scope="module", params=[Binding("network", "net-a"), Binding("router", "router-1")], ids=str)
def app(request: pytest.FixtureRequest) -> tuple[ProxyApp, _Recorder, Any]:
    require("compiled fast path", wire.COMPILED, "meta169.api._wire was not built (needs gcc and Python headers)")
    upstream = _Recorder()
    proxy = ProxyApp(request.param, upstream, None)
    fast = proxy.fast_path(Limits())
    assert fast is not None
    return proxy, upstream, fast


class _Capture:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip(" \t")
        self.headers[key] = self.headers[key] + "," + text if key in self.headers else text

    def on_message_complete(self) -> None:
        self.done = True


def _python_payload(app: tuple[ProxyApp, _Recorder, Any], data: bytes) -> bytes:
    """What ProxyApp sends for ``data`` parsed as HTTPProtocol parses it."""
    proxy, upstream, _ = app
    cap = _Capture()
    parser = httptools.HttpRequestParser(cap)
    parser.feed_data(data)
    assert cap.done
    method = parser.get_method().decode()
    proxy(Request(method, cap.url, cap.headers, b"", PEER, True))
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
    assert req is not None and req.forward is not None
    assert (req.method, req.raw_path, req.keep_alive, req.peer_key) == (
        "GET",
        b"/openstack/2018-08-27/meta_data.json",
        True,
        PEER,
    )
    assert req.forward == _python_payload(app, CLOUD_INIT)
    assert req.forward.startswith(b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nuser-agent: Cloud-Init")
    assert b"\r\nhost: metadata\r\nx-meta169-caller-ip: 10.0.0.11\r\nx-meta169-" in req.forward
    assert req.forward.endswith(b"\r\n\r\n") and b"connection" not in req.forward.lower()


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
    assert req is not None and req.forward is not None
    assert req.forward == _python_payload(app, data)


def test_stamper_drops_every_forged_identity(app: tuple[ProxyApp, _Recorder, Any]) -> None:
    data = (
        b"GET / HTTP/1.1\r\nX-Meta169-Caller-IP: 10.0.0.12\r\nX-Forwarded-For: 10.0.0.12\r\n"
        b"X-Neutron-Network-ID: other\r\n\r\n"
    )
    req = _compiled(app, data)
    assert req is not None and req.forward is not None
    assert b"10.0.0.12" not in req.forward and b"other" not in req.forward
    assert req.forward.count(b"x-meta169-caller-ip: ") == 1
    assert b"X-Meta169-Guest-Forwarded: 1\r\n" in req.forward


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
    data = (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode(
        "latin-1"
    )
    req = _compiled(app, data)
    if req is None:
        return  # declining is always allowed: the Python path stamps it
    assert req.forward == _python_payload(app, data), data
    assert req.raw_path == target.encode() and req.method == method
