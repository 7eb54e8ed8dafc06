"""The hand parser for simple GETs agrees with httptools, or steps aside (returns None)."""

from __future__ import annotations

import asyncio

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.api.http import Request, _simple_get


class _Capture:
    """httptools callbacks collecting what HTTPProtocol would build."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.done = False
        self.duplicate = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self.duplicate |= key in self.headers
        # As HTTPProtocol.on_header: optional whitespace around the value dropped.
        self.headers[key] = value.decode("latin-1").strip(" \t")

    def on_message_complete(self) -> None:
        self.done = True


def _httptools(data: bytes) -> _Capture | None:
    cap = _Capture()
    parser = httptools.HttpRequestParser(cap)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return None
    return cap if cap.done else None


@pytest.mark.parametrize(
    "data",
    [
        b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /openstack HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\n"
        b"Accept-Encoding: gzip, deflate\r\n\r\n",
        b"GET /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token:  abc \r\n\r\n",
    ],
)
def test_simple_get_parses_common_requests(data: bytes) -> None:
    req = _simple_get(data, "10.0.0.11", 64, 2048)
    assert req is not None
    cap = _httptools(data)
    assert cap is not None
    assert (req.method, req.raw_path, req.headers) == ("GET", cap.url, cap.headers)
    assert req.keep_alive and req.peer_key == "10.0.0.11"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",  # HTTP/1.0 keep-alive rules
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",  # pipelined
        b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",  # a body
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close, upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # duplicate
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
        b"GET nothing HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
    ],
)
def test_simple_get_steps_aside_for_anything_unusual(data: bytes) -> None:
    assert _simple_get(data, "10.0.0.11", 64, 2048) is None


@pytest.mark.parametrize(
    ("value", "keep"), [(b"close", False), (b"Close", False), (b"keep-alive", True), (b"Keep-Alive", True)]
)
def test_simple_get_connection_header(value: bytes, keep: bool) -> None:
    data = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: " + value + b"\r\n\r\n"
    req = _simple_get(data, "", 64, 2048)
    assert req is not None and req.keep_alive is keep
    # httptools agrees (it answers should_keep_alive() truthfully only in the callback).
    seen: list[bool] = []

    class Keep(_Capture):
        def on_message_complete(self) -> None:
            seen.append(bool(parser.should_keep_alive()))

    parser = httptools.HttpRequestParser(Keep())
    parser.feed_data(data)
    assert seen == [keep]


def test_simple_get_flags_identity_headers() -> None:
    req = _simple_get(b"GET / HTTP/1.1\r\nX-Meta169-Caller-IP: 10.0.0.12\r\n\r\n", "10.0.0.11", 64, 2048)
    assert req is not None and req.identity_header


def test_simple_get_respects_header_count_limit() -> None:
    data = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(10)) + b"\r\n"
    assert _simple_get(data, "", 9, 2048) is None
    assert _simple_get(data, "", 10, 2048) is not None


NAME = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20
)
VALUE = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=30)
TARGET = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(lambda t: "/" + t)


@settings(max_examples=400, deadline=None)
@given(target=TARGET, headers=st.lists(st.tuples(NAME, VALUE), max_size=8))
def test_simple_get_agrees_with_httptools(target: str, headers: list[tuple[str, str]]) -> None:
    data = (f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
    fast = _simple_get(data, "", 64, 2048)
    slow = _httptools(data)
    if fast is None:
        return  # stepping aside is always allowed: httptools handles it
    # Whatever the fast path accepts, httptools accepts and reads the same way.
    assert slow is not None, data
    assert not slow.duplicate
    assert (fast.raw_path, fast.headers) == (slow.url, slow.headers)


def test_simple_get_request_is_a_request() -> None:
    assert isinstance(_simple_get(b"GET / HTTP/1.1\r\n\r\n", "", 8, 2048), Request)
    assert asyncio.iscoroutinefunction(_simple_get) is False
