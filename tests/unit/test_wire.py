"""The compiled fast path (http/_wire.c): what it recognises, what it declines, the
bytes it writes, its seeds, its Date line and its buckets."""

from __future__ import annotations

import base64
import email.utils
import os
import re
import time
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.api.metadata import PYTHON_OWNED_HEADERS, PYTHON_OWNED_PREFIXES
from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.message import document_head
from meta169.http.stamp import HDR_CALLER_IP, HDR_NETWORK, HDR_ROUTER
from meta169.render.document import RANDOM_SEED_BYTES, SEED_TEXT_BYTES
from tests.capabilities import require
from tests.http_parse import parse_request
from tests.unit.http_strategies import NAME, TARGET, VALUE

HEAD_200 = document_head("text/plain", 5)
UUID = "0b5a3a52-3c1e-4a8e-9a43-5f0f8c1d2e3f"
# The lists serve passes in (MetadataApp.fast_path), encoded as wire.fast_path does.
OWNED = tuple(sorted(n.encode() for n in PYTHON_OWNED_HEADERS))
PREFIXES = tuple(p.encode() for p in PYTHON_OWNED_PREFIXES)
STAMP_NAMES = (HDR_CALLER_IP.encode(), HDR_NETWORK.encode(), HDR_ROUTER.encode())


@pytest.fixture(scope="module")
def compiled() -> Any:
    require(
        "compiled fast path",
        wire.compiled(),
        "meta169.http._wire was not built (needs gcc and the Python headers; `make venv` builds it)",
    )
    from meta169.http import _wire  # type: ignore[attr-defined]

    return _wire


def _fast(compiled: Any, wire_table: dict[bytes, Any], buckets: dict[str, Any] | None = None) -> Any:
    sites = {"10.0.0.11": (wire_table, UUID)}
    return compiled.FastPath(sites, buckets, 8192, 64, 2048, OWNED, PREFIXES)


def _recognise(
    compiled: Any, data: bytes, max_headers: int = 64, max_url: int = 2048, *, stamped: bool = False
) -> tuple[Any, ...] | None:
    """What the FastPath's recogniser makes of ``data``, with serve's own lists."""
    got = compiled.recognise(data, 8192, max_headers, max_url, OWNED, PREFIXES, STAMP_NAMES if stamped else None)
    if got is None:
        return None
    out = (got["method"], got["path"], got["keep_alive"])
    return (*out, got["caller"], got["scope_kind"], got["scope"]) if stamped else out


def _split(reply: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return lines[0], lines[1:], body


# -- recognising -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", ("GET", b"/", True)),
        (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", ("GET", b"/latest/meta-data/", True)),
        (b"HEAD /latest HTTP/1.1\r\nHost: x\r\n\r\n", ("HEAD", b"/latest", True)),
        (b"GET /a?b=c&d HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", b"/a", True)),
        (b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n", ("GET", b"/a", False)),
        (b"GET /a HTTP/1.1\r\nconnection:  Keep-Alive \t\r\n\r\n", ("GET", b"/a", True)),
        (b"GET /a HTTP/1.1\r\nConnection: CLOSE\r\n\r\n", ("GET", b"/a", False)),
        # python-requests as cloud-init sends it
        (
            b"GET /openstack HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\n"
            b"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
            ("GET", b"/openstack", True),
        ),
        # duplicates of plain headers do not matter
        (b"GET /a HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", ("GET", b"/a", True)),
        (b"GET /a HTTP/1.1\r\nX-Empty:\r\n\r\n", ("GET", b"/a", True)),
        (b"GET /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", ("GET", b"/a", True)),
    ],
)
def test_wire_recognises_simple_requests(compiled: Any, data: bytes, expected: tuple[str, bytes, bool]) -> None:
    assert _recognise(compiled, data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",  # pipelined
        b"GET / HTTP/1.1\r\nHost: x\r\n",  # partial
        b"GET / HTTP/1.1\r\nHost: x\r\n\r",
        b"POST / HTTP/1.1\r\n\r\n",
        b"PUT /latest/api/token HTTP/1.1\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
        b"GET /a%2e HTTP/1.1\r\n\r\n",  # percent-decoding is the Python path's
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET /\x80 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 \r\n\r\n",
        b"GET / HTTP/1.1\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close, upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection:\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-aws-ec2-metadata-token: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nx-AWS-ec2-METADATA-token: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-aws-ec2-metadata-token:\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Meta169-Caller-IP: 10.0.0.12\r\n\r\n",
        b"GET / HTTP/1.1\r\nx-meta169-anything: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-META169-:\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n continued\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\nHost: x\r\n\r\n",  # an early end of head
        b"",
        b"\r\n\r\n",
    ],
)
def test_wire_declines_anything_unusual(compiled: Any, data: bytes) -> None:
    assert _recognise(compiled, data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nx-instance-ID: i-1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Tenant-ID: t\r\n\r\n",
    ],
)
def test_wire_keeps_headers_read_only_off_the_fast_path(compiled: Any, data: bytes) -> None:
    # Read only on the token PUT and on Neutron listeners (api.metadata
    # NOT_ON_THE_FAST_PATH): a GET carrying them is still the fast path's, so
    # Neutron's haproxy, which adds X-Forwarded-For to every request, stays on it.
    assert _recognise(compiled, data) is not None


def test_wire_owned_lists_come_from_the_caller(compiled: Any) -> None:
    # The C code holds no header names of its own: with empty lists the token header
    # passes, and exactly what the lists name is declined, in any case on the wire.
    token = b"GET /a HTTP/1.1\r\nx-AWS-ec2-Metadata-Token: t\r\n\r\n"
    ttl = b"GET /a HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\n\r\n"
    stamp = b"GET /a HTTP/1.1\r\nX-Meta169-Caller-IP: 10.0.0.12\r\n\r\n"

    def seen(data: bytes, owned: tuple[bytes, ...], prefixes: tuple[bytes, ...] = ()) -> bool:
        return compiled.recognise(data, 8192, 64, 2048, owned, prefixes) is not None

    assert seen(token, ()) and seen(ttl, ()) and seen(stamp, ())
    # an exact name is exact: the token header does not own the TTL header
    assert not seen(token, (b"x-aws-ec2-metadata-token",)) and seen(ttl, (b"x-aws-ec2-metadata-token",))
    # a prefix owns every name it starts, itself included
    assert not seen(ttl, (), (b"x-aws-ec2-metadata-token",)) and not seen(token, (), (b"x-aws-",))
    assert not seen(stamp, (), (b"x-meta169-",)) and seen(stamp, (), (b"x-meta169-caller-ip-",))
    # the proxy's stamp names are read only where they are given
    stamped = b"GET /a HTTP/1.1\r\nX-Meta169-Caller-IP: 1\r\nX-Meta169-Network-ID: n\r\n\r\n"
    assert compiled.recognise(stamped, 8192, 64, 2048, (), (b"x-meta169-",), STAMP_NAMES) is not None
    other = (b"x-a", b"x-b", b"x-c")
    assert compiled.recognise(stamped, 8192, 64, 2048, (), (b"x-meta169-",), other) is None


@pytest.mark.parametrize(
    ("owned", "prefixes", "stamp", "error", "match"),
    [
        ([b"x-a"], (), None, TypeError, "tuple of bytes"),
        (("x-a",), (), None, TypeError, "tuple of bytes"),
        ((b"x-a",), [b"x-"], None, TypeError, "tuple of bytes"),
        ((b"X-Upper",), (), None, ValueError, "lower-case"),
        ((b"x-a",), (b"X-",), None, ValueError, "lower-case"),
        ((b"x a",), (), None, ValueError, "lower-case"),
        ((b"x:a",), (), None, ValueError, "lower-case"),
        ((b"",), (), None, ValueError, "empty"),
        (tuple(b"x-%d" % i for i in range(33)), (), None, ValueError, "more than 32"),
        ((), tuple(b"x-%d-" % i for i in range(33)), None, ValueError, "more than 32"),
        ((), (), (b"x-a", b"x-b"), ValueError, "caller IP, network id and router id"),
        ((), (), [b"x-a", b"x-b", b"x-c"], TypeError, "tuple of bytes"),
        ((), (), (b"x-a", b"x-b", b"X-C"), ValueError, "lower-case"),
    ],
)
def test_wire_validates_the_lists_it_is_given(
    compiled: Any, owned: Any, prefixes: Any, stamp: Any, error: type[Exception], match: str
) -> None:
    routers: dict[str, Any] | None = None if stamp is None else {}
    with pytest.raises(error, match=match):
        compiled.FastPath({}, None, 8192, 64, 2048, owned, prefixes, routers, stamp)
    with pytest.raises(error, match=match):
        compiled.recognise(b"GET / HTTP/1.1\r\n\r\n", 8192, 64, 2048, owned, prefixes, stamp)


def test_wire_fast_path_arguments_are_checked(compiled: Any) -> None:
    with pytest.raises(TypeError):
        compiled.FastPath({}, None, 8192, 64, 2048)  # the owned lists are required
    with pytest.raises(TypeError, match="routers and stamp"):
        compiled.FastPath({}, None, 8192, 64, 2048, OWNED, PREFIXES, {})
    with pytest.raises(TypeError, match="routers and stamp"):
        compiled.FastPath({}, None, 8192, 64, 2048, OWNED, PREFIXES, None, STAMP_NAMES)
    with pytest.raises(ValueError, match=">= 0"):
        compiled.FastPath({}, None, 8192, -1, 2048, OWNED, PREFIXES)
    with pytest.raises(TypeError, match="go with owned"):
        compiled.recognise(b"GET / HTTP/1.1\r\n\r\n", 8192, 64, 2048, None, PREFIXES)
    fast = compiled.FastPath({}, None, 8192, 64, 2048, OWNED, PREFIXES, {}, STAMP_NAMES)
    assert (fast.owned, fast.owned_prefixes, fast.stamp) == (OWNED, PREFIXES, STAMP_NAMES)


@pytest.mark.parametrize(
    ("drop", "prefixes", "marker_for", "error"),
    [
        ((b"X-Forwarded-For",), (), b"x-forwarded-for", ValueError),
        ((b"x-forwarded-for",), (b"X-Meta169-",), b"x-forwarded-for", ValueError),
        ((b"x-forwarded-for",), (), b"X-Forwarded-For", ValueError),
        ([b"x-forwarded-for"], (), b"x-forwarded-for", TypeError),
        (tuple(b"x-%d" % i for i in range(257)), (), b"x-1", ValueError),
    ],
)
def test_wire_stamper_validates_its_lists(
    compiled: Any, drop: Any, prefixes: Any, marker_for: bytes, error: type[Exception]
) -> None:
    # An upper-case name would never match the lower-cased wire name: the header would be forwarded.
    with pytest.raises(error):
        compiled.Stamper(drop, prefixes, marker_for, b"m: 1", b"host: x\r\n", b"\r\n\r\n", 8192, 64, 2048)


STAMP = b"X-Meta169-Caller-IP: 10.0.0.11\r\nX-Meta169-Network-ID: net-a\r\n"


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (STAMP, (b"10.0.0.11", "network", b"net-a")),
        (b"x-meta169-caller-ip:  fd00::11 \r\nx-meta169-router-id: r-1\r\n", (b"fd00::11", "router", b"r-1")),
    ],
)
def test_wire_reads_the_proxy_stamp_on_a_proxy_socket(
    compiled: Any, stamp: bytes, expected: tuple[bytes, str, bytes]
) -> None:
    data = b"GET /a HTTP/1.1\r\nhost: metadata\r\n" + stamp + b"content-length: 0\r\n\r\n"
    assert _recognise(compiled, data, stamped=True) == ("GET", b"/a", True, *expected)
    assert _recognise(compiled, data) is None  # never on a direct listener


@pytest.mark.parametrize(
    "stamp",
    [
        b"",
        b"X-Meta169-Caller-IP: 10.0.0.11\r\n",
        b"X-Meta169-Network-ID: net-a\r\n",
        STAMP + b"X-Meta169-Router-ID: r-1\r\n",
        STAMP + b"X-Meta169-Caller-IP: 10.0.0.12\r\n",
        STAMP + b"X-Meta169-Network-ID: net-b\r\n",
        STAMP + b"X-Meta169-Signature: abc\r\n",
        STAMP + b"X-Meta169-Guest-Forwarded: 1\r\n",
        b"X-Meta169-Caller-IP:\r\nX-Meta169-Network-ID: net-a\r\n",
        STAMP + b"X-aws-ec2-metadata-token: t\r\n",
    ],
)
def test_wire_declines_incomplete_or_extra_stamps(compiled: Any, stamp: bytes) -> None:
    data = b"GET /a HTTP/1.1\r\n" + stamp + b"\r\n"
    assert _recognise(compiled, data, stamped=True) is None


def test_wire_proxy_answer_looks_up_scope_then_caller(compiled: Any) -> None:
    table = {b"/a": (HEAD_200, b"hello")}
    networks = {"net-a": {"10.0.0.11": (table, UUID)}}
    routers = {"r-1": {"10.0.0.12": (table, UUID)}}
    fast = compiled.FastPath(networks, None, 8192, 64, 2048, OWNED, PREFIXES, routers, STAMP_NAMES)
    assert fast.answer(b"GET /a HTTP/1.1\r\n" + STAMP + b"\r\n", "")[0].endswith(b"hello")
    by_router = b"X-Meta169-Caller-IP: 10.0.0.12\r\nX-Meta169-Router-ID: r-1\r\n"
    assert fast.answer(b"GET /a HTTP/1.1\r\n" + by_router + b"\r\n", "")[0].endswith(b"hello")
    swapped = b"X-Meta169-Caller-IP: 10.0.0.11\r\nX-Meta169-Router-ID: r-1\r\n"
    assert fast.answer(b"GET /a HTTP/1.1\r\n" + swapped + b"\r\n", "") is None
    assert fast.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.11") is None  # the TCP peer means nothing here


def test_wire_respects_header_count_and_url_limits(compiled: Any) -> None:
    data = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(10)) + b"\r\n"
    assert _recognise(compiled, data, 9) is None
    assert _recognise(compiled, data, 10) is not None
    long = b"GET /" + b"a" * 99 + b" HTTP/1.1\r\n\r\n"
    assert _recognise(compiled, long, 64, 99) is None
    assert _recognise(compiled, long, 64, 100) is not None


def _at_header_bytes(limit: int, extra: int, *, headers: int = 40) -> bytes:
    """A request whose headers HTTPProtocol counts as ``limit + extra`` bytes (name +
    value as httptools hands it + 4 each); written without spaces after the colons,
    the head itself is shorter than that count."""
    names = [b"h%02d" % i for i in range(headers)]
    # h01..: "hNN:v" counts 3 + 1 + 4; h00's value pads the total to the count wanted
    pad = limit + extra - (len(names) - 1) * (3 + 1 + 4) - (3 + 4)
    lines = [b"h00:" + b"v" * pad] + [n + b":v" for n in names[1:]]
    return b"GET / HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@pytest.mark.parametrize("extra", [0, 1])
def test_wire_counts_header_bytes_as_serve_does(compiled: Any, extra: int) -> None:
    # serve's 431 counts each header's name and value + 4 (http.protocol on_header),
    # which can exceed the head's own length: at the limit both accept, one byte
    # over both refuse, though the head is still far shorter than the limit.
    limits = Limits(max_header_bytes=2000)
    data = _at_header_bytes(limits.max_header_bytes, extra)
    assert len(data) < limits.max_header_bytes
    python = parse_request(data, limits=limits)
    got = compiled.recognise(data, limits.max_header_bytes, limits.max_headers, limits.max_url_bytes, OWNED, PREFIXES)
    assert (python is not None) is (got is not None) is (extra == 0)
    # trailing whitespace counts (httptools keeps it), leading whitespace does not
    trailing = data.replace(b"v\r\nh01:", b"v \r\nh01:", 1)
    leading = data.replace(b"h01:v", b"h01: v", 1)
    if extra == 0:
        assert parse_request(trailing, limits=limits) is None
        assert compiled.recognise(trailing, limits.max_header_bytes, 64, 2048, OWNED, PREFIXES) is None
        assert parse_request(leading, limits=limits) is not None
        assert compiled.recognise(leading, limits.max_header_bytes, 64, 2048, OWNED, PREFIXES) is not None


def _agrees_with_serve(compiled: Any, data: bytes, owned: Any, prefixes: Any = None) -> bool:
    """Whatever the recogniser accepts, serve's one parse path (HTTPProtocol over
    httptools) parses to the same method, target, keep-alive and headers."""
    args = () if owned is None else (owned, prefixes)
    got = compiled.recognise(data, Limits().max_header_bytes, Limits().max_headers, Limits().max_url_bytes, *args)
    if got is None:
        return False  # declining is always allowed: the Python path answers
    req = parse_request(data)
    assert req is not None, data
    assert (got["method"], got["target"], got["keep_alive"]) == (req.method, req.raw_path, req.keep_alive), data
    assert got["path"] == req.raw_path.partition(b"?")[0]
    joined: dict[str, str] = {}
    for name, value in got["headers"]:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        joined[key] = joined[key] + "," + text if key in joined else text
    assert joined == req.headers, data
    # ...and it carries nothing that frames a body or changes the protocol...
    assert not {"transfer-encoding", "upgrade", "expect"} & req.headers.keys()
    assert req.headers.get("content-length", "0") == "0"
    if owned is not None:
        # ...nor, for the fast path, anything whose meaning the Python path owns.
        assert not [k for k in req.headers if k in PYTHON_OWNED_HEADERS or k.startswith(PYTHON_OWNED_PREFIXES)]
    return True


@settings(max_examples=600, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD"]),
    target=TARGET,
    headers=st.lists(st.tuples(NAME, VALUE), max_size=6),
)
def test_wire_recognition_agrees_with_serves_parser(
    compiled: Any, method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    data = (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
    _agrees_with_serve(compiled, data, OWNED, PREFIXES)  # the FastPath's view
    _agrees_with_serve(compiled, data, None)  # the Stamper's: no owned lists


def test_wire_agreement_check_is_exercised(compiled: Any) -> None:
    # The property above only checks what is accepted: make sure that is not nothing.
    plain = b"GET /a?b HTTP/1.1\r\nHost: x\r\nA:  1 \r\na: 2\r\nConnection: close\r\n\r\n"
    assert _agrees_with_serve(compiled, plain, OWNED, PREFIXES)
    token = b"GET /a HTTP/1.1\r\nX-aws-ec2-metadata-token: t\r\n\r\n"
    assert not _agrees_with_serve(compiled, token, OWNED, PREFIXES) and _agrees_with_serve(compiled, token, None)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_wire_survives_arbitrary_bytes(compiled: Any, tail: bytes) -> None:
    for data in (tail, b"GET /" + tail, b"GET / HTTP/1.1\r\n" + tail, b"GET / HTTP/1.1\r\n" + tail + b"\r\n\r\n"):
        _agrees_with_serve(compiled, data, OWNED, PREFIXES)
        _agrees_with_serve(compiled, data, None)


# -- answering -------------------------------------------------------------------------


def test_wire_answer_keep_alive_reply_bytes(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")})
    reply, keep = fast.answer(b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", "10.0.0.11")
    assert keep is True
    status, headers, body = _split(reply)
    assert status == b"HTTP/1.1 200 OK"
    assert reply.startswith(HEAD_200)
    assert headers[-1].startswith(b"Date: ") and not any(h.lower().startswith(b"connection") for h in headers)
    assert body == b"hello"


def test_wire_answer_close_and_head(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")})
    reply, keep = fast.answer(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n", "10.0.0.11")
    assert keep is False
    _, headers, body = _split(reply)
    assert headers[-1] == b"Connection: close" and body == b"hello"
    reply, keep = fast.answer(b"HEAD /a HTTP/1.1\r\n\r\n", "10.0.0.11")
    _, headers, body = _split(reply)
    assert keep is True and body == b"" and b"Content-Length: 5" in headers


def _replies(data: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each reply in ``data``, read by httptools."""
    out: list[tuple[bytes, bytes]] = []
    body: list[bytes] = []

    class Cap:
        def on_body(self, chunk: bytes) -> None:
            body.append(chunk)

        def on_message_complete(self) -> None:
            out.append((str(parser.get_status_code()).encode(), b"".join(body)))
            body.clear()

    parser = httptools.HttpResponseParser(Cap())
    parser.feed_data(data)
    return out


def test_wire_answer_pipelined_requests_in_order(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello"), b"/b": (document_head("text/plain", 5), b"world")})
    a, b = b"GET /a HTTP/1.1\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    replies, keep = fast.answer(a + b + a, "10.0.0.11")
    assert keep is True
    assert _replies(replies) == [(b"200", b"hello"), (b"200", b"world"), (b"200", b"hello")]
    # byte for byte the replies the requests get one at a time, bar the clock
    lone = b"".join(fast.answer(r, "10.0.0.11")[0] for r in (a, b, a))
    assert re.sub(rb"Date: [^\r]*", b"", replies) == re.sub(rb"Date: [^\r]*", b"", lone)


def test_wire_answer_pipelined_stops_where_python_goes_on(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")})
    a, miss = b"GET /a HTTP/1.1\r\n\r\n", b"GET /nope HTTP/1.1\r\n\r\n"
    replies, keep, consumed = fast.answer(a + a + miss + a, "10.0.0.11")
    assert (keep, consumed) == (True, 2 * len(a)) and _replies(replies) == [(b"200", b"hello")] * 2
    # a partial request after complete ones: Python waits for the rest of it
    replies, keep, consumed = fast.answer(a + b"GET /a HT", "10.0.0.11")
    assert consumed == len(a) and _replies(replies) == [(b"200", b"hello")]
    # a request with a body, an identity header, garbage: all the Python path's
    for tail in (
        b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        b"GET /a HTTP/1.1\r\nX-Meta169-Caller-IP: 1\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
    ):
        assert fast.answer(a + tail, "10.0.0.11")[2] == len(a)
    # nothing answered at all: the Python path has the whole of it
    assert fast.answer(miss + a, "10.0.0.11") is None


def test_wire_answer_pipelined_close_ends_the_connection(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")})
    a, last = b"GET /a HTTP/1.1\r\n\r\n", b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n"
    # what follows a request that closes is never answered, as in the Python path
    replies, keep = fast.answer(a + last + a + b"junk", "10.0.0.11")
    assert keep is False and len(_replies(replies)) == 2 and replies.endswith(b"Connection: close\r\n\r\nhello")


def test_wire_answer_pipelined_takes_one_token_per_reply(compiled: Any) -> None:
    bucket = wire.Bucket(1.0, 2.0, time.monotonic())
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")}, {UUID: bucket})
    a = b"GET /a HTTP/1.1\r\n\r\n"
    # two tokens: two answered here, the third is the Python path's (429)
    replies, _keep, consumed = fast.answer(a * 3, "10.0.0.11")
    assert consumed == 2 * len(a) and len(_replies(replies)) == 2


def test_wire_answer_declines_unknown_peer_path_or_oversized(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")})
    assert fast.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.12") is None
    assert fast.answer(b"GET /b HTTP/1.1\r\n\r\n", "10.0.0.11") is None
    assert fast.answer(b"GET /a/ HTTP/1.1\r\n\r\n", "10.0.0.11") is None  # only what was remembered
    small = compiled.FastPath({"10.0.0.11": ({b"/a": (HEAD_200, b"hello")}, UUID)}, None, 20, 64, 2048, OWNED, PREFIXES)
    assert small.answer(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", "10.0.0.11") is None


def test_wire_answer_sees_table_changes_in_place(compiled: Any) -> None:
    table: dict[bytes, Any] = {}
    fast = _fast(compiled, table)
    assert fast.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.11") is None
    table[b"/a"] = (HEAD_200, b"hello")
    assert fast.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.11") is not None
    fast.sites.clear()
    assert fast.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.11") is None


@pytest.mark.parametrize("entry", [b"not a tuple", (b"head",), (b"h", "str"), (b"h", b"a", b"b", b"c")])
def test_wire_answer_rejects_malformed_tables(compiled: Any, entry: Any) -> None:
    fast = _fast(compiled, {b"/a": entry})
    with pytest.raises(TypeError):
        fast.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.11")
    bad_slot = compiled.FastPath({"10.0.0.11": ({}, UUID, "extra")}, None, 8192, 64, 2048, OWNED, PREFIXES)
    with pytest.raises(TypeError):
        bad_slot.answer(b"GET /a HTTP/1.1\r\n\r\n", "10.0.0.11")


def _seed_of(reply: bytes) -> bytes:
    body = _split(reply)[2]
    assert body.startswith(b'{"a": 1, "random_seed": "') and body.endswith(b'", "b": 2}')
    return body[len(b'{"a": 1, "random_seed": "') : -len(b'", "b": 2}')]


def test_wire_answer_fresh_seed_per_request(compiled: Any) -> None:
    assert compiled.SEED_BYTES == RANDOM_SEED_BYTES
    prefix, suffix = b'{"a": 1, "random_seed": "', b'", "b": 2}'
    head = document_head("application/json", len(prefix) + SEED_TEXT_BYTES + len(suffix))
    fast = _fast(compiled, {b"/m": (head, prefix, suffix)})
    seeds = set()
    for _ in range(200):  # crosses the 64-seed pool refill several times
        reply, _ = fast.answer(b"GET /m HTTP/1.1\r\n\r\n", "10.0.0.11")
        _, headers, body = _split(reply)
        assert f"Content-Length: {len(body)}".encode() in headers
        seed = _seed_of(reply)
        assert len(base64.b64decode(seed, validate=True)) == RANDOM_SEED_BYTES
        seeds.add(seed)
    assert len(seeds) == 200
    reply, _ = fast.answer(b"HEAD /m HTTP/1.1\r\n\r\n", "10.0.0.11")
    assert _split(reply)[2] == b""


def test_wire_seed_source_must_fill_a_pool(compiled: Any) -> None:
    prefix, suffix = b'{"a": 1, "random_seed": "', b'", "b": 2}'
    head = document_head("application/json", len(prefix) + SEED_TEXT_BYTES + len(suffix))
    fast = _fast(compiled, {b"/m": (head, prefix, suffix)})
    compiled.set_seed_source(lambda: b"too short")
    try:
        with pytest.raises(ValueError, match="SEED_BYTES"):
            fast.answer(b"GET /m HTTP/1.1\r\n\r\n", "10.0.0.11")
        with pytest.raises(TypeError, match="callable"):
            compiled.set_seed_source(42)
        pool = bytes(range(256)) * (compiled.SEED_BYTES * compiled.SEED_POOL // 256)
        compiled.set_seed_source(lambda: pool)
        seed = base64.b64decode(_seed_of(fast.answer(b"GET /m HTTP/1.1\r\n\r\n", "10.0.0.11")[0]))
        assert seed == pool[: compiled.SEED_BYTES]  # the pool is what the source gave
    finally:
        compiled.set_seed_source(None)


def test_wire_forked_child_never_repeats_parent_seeds(compiled: Any) -> None:
    prefix, suffix = b'{"a": 1, "random_seed": "', b'", "b": 2}'
    head = document_head("application/json", len(prefix) + SEED_TEXT_BYTES + len(suffix))
    fast = _fast(compiled, {b"/m": (head, prefix, suffix)})
    request = b"GET /m HTTP/1.1\r\n\r\n"
    fast.answer(request, "10.0.0.11")  # the pool now holds 63 unused seeds
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.write(write_end, _seed_of(fast.answer(request, "10.0.0.11")[0]))
        finally:
            os._exit(0)
    os.close(write_end)
    child_seed = b""
    while chunk := os.read(read_end, 4096):
        child_seed += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_seed = _seed_of(fast.answer(request, "10.0.0.11")[0])
    assert len(child_seed) == SEED_TEXT_BYTES
    assert child_seed != parent_seed


def test_wire_date_line_is_imf_fixdate(compiled: Any) -> None:
    for _ in range(3):  # a second boundary may fall between the two reads
        expected = b"Date: " + email.utils.formatdate(time.time(), usegmt=True).encode() + b"\r\n"
        if compiled.date_line() == expected:
            return
    pytest.fail(f"{compiled.date_line()!r} != {expected!r}")


# -- buckets ---------------------------------------------------------------------------


@pytest.fixture(params=["python", "compiled"])
def make_bucket(request: pytest.FixtureRequest) -> Any:
    if request.param == "python":
        return wire.PyBucket
    return request.getfixturevalue("compiled").Bucket


def test_wire_bucket_burst_refill_and_full(make_bucket: Any) -> None:
    make = make_bucket
    bucket = make(10.0, 3.0, 100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.1)
    assert not bucket.full(100.0)
    assert bucket.take(100.1) == 0.0
    assert bucket.full(101.0)
    with pytest.raises(ValueError, match="rate > 0"):
        make(0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="burst >= 1"):
        make(1.0, 0.5, 0.0)


def test_wire_buckets_agree_step_for_step(compiled: Any) -> None:
    py, c = wire.PyBucket(7.0, 4.0, 0.0), compiled.Bucket(7.0, 4.0, 0.0)
    now = 0.0
    for step in [0.0, 0.01, 0.0, 0.3, 0.05, 0.0, 0.0, 0.0, 2.0, 0.001] * 20:
        now += step
        assert py.take(now) == c.take(now)
        assert (py.tokens, py.last) == (c.tokens, c.last)


def test_wire_answer_takes_from_the_shared_bucket(compiled: Any) -> None:
    buckets: dict[str, Any] = {}
    fast = _fast(compiled, {b"/a": (HEAD_200, b"hello")}, buckets)
    request = b"GET /a HTTP/1.1\r\n\r\n"
    assert fast.answer(request, "10.0.0.11") is None  # no bucket yet: the Python path makes it
    buckets[UUID] = compiled.Bucket(0.001, 2.0, time.monotonic())
    assert fast.answer(request, "10.0.0.11") is not None
    assert fast.answer(request, "10.0.0.11") is not None
    assert fast.answer(request, "10.0.0.11") is None  # empty: the Python path answers 429
    with pytest.raises(TypeError):
        _fast(compiled, {b"/a": (HEAD_200, b"hello")}, {UUID: wire.PyBucket(1.0, 1.0, 0.0)}).answer(
            request, "10.0.0.11"
        )


# -- IMDSv2 tokens ---------------------------------------------------------------------

TOKEN_NAME = b"x-aws-ec2-metadata-token"
TOKEN = b"AQAAAAB-sealed-token-as-the-Python-path-issued-it"


def _with_tokens(compiled: Any, slot: tuple[Any, ...], known: dict[bytes, Any], buckets: Any = None) -> Any:
    return compiled.FastPath(
        {"10.0.0.11": slot}, buckets, 8192, 64, 2048, OWNED, PREFIXES, None, None, None, known, TOKEN_NAME
    )


def _get(extra: bytes = b"") -> bytes:
    return b"GET /a HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"", None),
        (b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n", TOKEN),
        (b"x-AWS-EC2-metadata-TOKEN:\t " + TOKEN + b" \t\r\n", TOKEN),  # trimmed as serve trims it
        (b"X-aws-ec2-metadata-token:\r\n", b""),
    ],
)
def test_wire_reads_the_token_header_where_it_is_given(compiled: Any, line: bytes, expected: bytes | None) -> None:
    data = _get(line)
    got = compiled.recognise(data, 8192, 64, 2048, OWNED, PREFIXES, None, TOKEN_NAME)
    assert got is not None and got["token"] == expected
    # without the name it stays an owned header, declined
    assert (compiled.recognise(data, 8192, 64, 2048, OWNED, PREFIXES) is None) == (expected is not None)


def test_wire_declines_a_repeated_token_header(compiled: Any) -> None:
    # serve joins a repeated header into one value ("a,b"), which is no token: 401.
    twice = _get((b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n") * 2)
    assert compiled.recognise(twice, 8192, 64, 2048, OWNED, PREFIXES, None, TOKEN_NAME) is None
    # the token is read beside the proxy's stamp too
    stamped = _get(STAMP + b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n")
    got = compiled.recognise(stamped, 8192, 64, 2048, OWNED, PREFIXES, STAMP_NAMES, TOKEN_NAME)
    assert got is not None and (got["token"], got["caller"]) == (TOKEN, b"10.0.0.11")


def test_wire_answers_a_token_the_table_vouches_for(compiled: Any) -> None:
    known = {TOKEN: (UUID, int(time.time()) + 60)}
    fast = _with_tokens(compiled, ({b"/a": (HEAD_200, b"hello")}, UUID), known)
    sent = _get(b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n")
    assert fast.answer(sent, "10.0.0.11")[0].endswith(b"hello")
    assert fast.answer(_get(), "10.0.0.11") is not None  # optional: no token is fine too
    for other in (b"forged", TOKEN[:-1], TOKEN + b"x", b""):
        assert fast.answer(_get(b"X-aws-ec2-metadata-token: " + other + b"\r\n"), "10.0.0.11") is None
    # another instance's token, though valid for that one
    known[TOKEN] = ("11111111-1111-4111-8111-111111111111", int(time.time()) + 60)
    assert fast.answer(sent, "10.0.0.11") is None
    # expired by the wall clock: valid while expiry > time.time(), as in api.tokens
    known[TOKEN] = (UUID, int(time.time()))
    assert fast.answer(sent, "10.0.0.11") is None
    known[TOKEN] = (UUID, int(time.time()) + 2)
    assert fast.answer(sent, "10.0.0.11") is not None
    known.clear()  # the table is read in place
    assert fast.answer(sent, "10.0.0.11") is None


def test_wire_required_slot_answers_only_with_a_token(compiled: Any) -> None:
    known = {TOKEN: (UUID, int(time.time()) + 60)}
    sent = _get(b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n")
    required = _with_tokens(compiled, ({b"/a": (HEAD_200, b"hello")}, UUID, True), known)
    assert required.answer(_get(), "10.0.0.11") is None  # the Python path answers 401
    assert required.answer(sent, "10.0.0.11") is not None
    optional = _with_tokens(compiled, ({b"/a": (HEAD_200, b"hello")}, UUID, False), known)
    assert optional.answer(_get(), "10.0.0.11") is not None and optional.answer(sent, "10.0.0.11") is not None


def test_wire_token_is_checked_before_the_bucket(compiled: Any) -> None:
    # A request declined for its token takes nothing from the instance's bucket:
    # the Python path, which answers it, takes its own.
    bucket = compiled.Bucket(0.001, 1.0, time.monotonic())
    fast = _with_tokens(compiled, ({b"/a": (HEAD_200, b"hello")}, UUID, True), {}, {UUID: bucket})
    for _ in range(3):
        assert fast.answer(_get(b"X-aws-ec2-metadata-token: forged\r\n"), "10.0.0.11") is None
        assert fast.answer(_get(), "10.0.0.11") is None
    assert bucket.tokens == 1.0


def test_wire_counts_token_answers_in_their_class(compiled: Any) -> None:
    known = {TOKEN: (UUID, int(time.time()) + 60)}
    fast = _with_tokens(compiled, ({b"/a": (HEAD_200, b"hello", 5)}, UUID), known)
    fast.answer(_get(b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n") * 2 + _get(), "10.0.0.11")
    fast.answer(_get(b"X-aws-ec2-metadata-token: forged\r\n"), "10.0.0.11")  # declined: not counted
    assert fast.stats()[0][5] == 3


def test_wire_proxy_socket_checks_the_token_of_the_stamped_caller(compiled: Any) -> None:
    known = {TOKEN: (UUID, int(time.time()) + 60)}
    networks = {"net-a": {"10.0.0.11": ({b"/a": (HEAD_200, b"hello")}, UUID, True)}}
    fast = compiled.FastPath(networks, None, 8192, 64, 2048, OWNED, PREFIXES, {}, STAMP_NAMES, None, known, TOKEN_NAME)
    assert fast.answer(_get(STAMP + b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n"), "") is not None
    assert fast.answer(_get(STAMP), "") is None
    other = b"X-Meta169-Caller-IP: 10.0.0.12\r\nX-Meta169-Network-ID: net-a\r\n"
    assert fast.answer(_get(other + b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n"), "") is None


def test_wire_token_arguments_are_checked(compiled: Any) -> None:
    def make(known: Any, name: Any) -> Any:
        return compiled.FastPath({}, None, 8192, 64, 2048, OWNED, PREFIXES, None, None, None, known, name)

    with pytest.raises(TypeError, match="together"):
        make({}, None)
    with pytest.raises(TypeError, match="together"):
        make(None, TOKEN_NAME)
    with pytest.raises(TypeError, match="dict"):
        make([], TOKEN_NAME)
    with pytest.raises(ValueError, match="lower-case"):
        make({}, b"X-aws-ec2-metadata-token")
    with pytest.raises(TypeError, match="bytes"):
        make({}, "x-aws-ec2-metadata-token")
    fast = make({}, TOKEN_NAME)
    assert fast.token == TOKEN_NAME and fast.tokens == {}
    sent = _get(b"X-aws-ec2-metadata-token: " + TOKEN + b"\r\n")
    for entry in [UUID, (UUID,), (UUID, "60"), (b"uuid", 60), (UUID, 2**80)]:
        bad = _with_tokens(compiled, ({b"/a": (HEAD_200, b"hello")}, UUID), {TOKEN: entry})
        with pytest.raises((TypeError, OverflowError)):
            bad.answer(sent, "10.0.0.11")


def test_wire_recognise_leaves_shared_bytes_alone(compiled: Any) -> None:
    # CPython shares its one-byte bytes objects: lower-casing a one-letter header
    # name in place once turned b"Z" into b"z" for the whole process (and made an
    # unrelated differential test fail when it ran after this module).
    compiled.recognise(b"GET / HTTP/1.1\r\nZ: x\r\n\r\n", 8192, 64, 2048)
    assert bytes([90])[0] == 90 and bytes([90]).decode() == "Z"
