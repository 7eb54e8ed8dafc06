"""The proxy's hand reader for serve's replies: whole, plain replies only."""

from __future__ import annotations

from collections.abc import Callable

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.api import wire
from meta169.proxy.upstream import _py_whole_reply

READERS: list[Callable[[bytes], int]] = [_py_whole_reply] + ([wire.whole_reply] if wire.whole_reply else [])


@pytest.fixture(params=READERS, ids=lambda f: f.__module__ or "compiled")
def _whole_reply(request: pytest.FixtureRequest) -> Callable[[bytes], int]:
    return request.param  # type: ignore[no-any-return]


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PLAIN = _head("HTTP/1.1 200 OK", "Server: meta169", "Content-Type: text/plain", "Content-Length: 5") + b"hello"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (PLAIN, 200),
        (_head("HTTP/1.1 404 Not Found", "content-length:  2 ") + b"no", 404),
        (_head("HTTP/1.1 200 OK", "Content-Length: 0"), 200),
    ],
)
def test_upstream_reads_whole_plain_replies(_whole_reply: Callable[[bytes], int], data: bytes, status: int) -> None:
    assert _whole_reply(data) == status
    # httptools reads the same message, ending exactly where the data ends.
    seen: list[int] = []

    class Cap:
        def on_message_complete(self) -> None:
            seen.append(parser.get_status_code())

    parser = httptools.HttpResponseParser(Cap())
    parser.feed_data(data)
    assert seen == [status]


@pytest.mark.parametrize(
    "data",
    [
        PLAIN[:-1],  # body not all here yet
        PLAIN + b"HTTP/1.1",  # more than one reply
        PLAIN[: PLAIN.index(b"\r\n\r\n")],  # head only
        _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
        _head("HTTP/1.1 200 OK", "Connection: close", "Content-Length: 5") + b"hello",
        _head("HTTP/1.1 200 OK", "X-Meta169-Hop-Limit: 1", "Content-Length: 5") + b"hello",
        _head("HTTP/1.0 200 OK", "Content-Length: 5") + b"hello",
        _head("HTTP/1.1 2x0 OK", "Content-Length: 5") + b"hello",
        _head("HTTP/1.1 200 OK", "Content-Length: 5x") + b"hello",
        _head("HTTP/1.1 200 OK") + b"hello",
        _head("HTTP/1.1 200 OK", "Content-Length: 5", "content-length: 5") + b"hello",
        _head("HTTP/1.1 200 OK", "Connection-Extra: x", "Content-Length: 5") + b"hello",
        _head("HTTP/1.1 200 OK", "Content-Length: 1234567890") + b"hello",
    ],
)
def test_upstream_leaves_anything_else_to_httptools(_whole_reply: Callable[[bytes], int], data: bytes) -> None:
    assert _whole_reply(data) == 0


LINE = st.sampled_from(
    ["Content-Length: 5", "content-length:5", "Content-Length: 4", "Connection: close", "X-Meta169-Hop-Limit: 1",
     "Server: meta169", "Content-Type: text/plain", "Transfer-Encoding: chunked", "X: y", "Content-Length : 5"]
)


@settings(max_examples=400, deadline=None)
@given(
    status=st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found", "HTTP/1.0 200 OK", "HTTP/1.1 20 OK"]),
    lines=st.lists(LINE, max_size=5),
    body=st.sampled_from([b"hello", b"", b"hell", b"hello!"]),
)
def test_upstream_readers_agree(status: str, lines: list[str], body: bytes) -> None:
    data = _head(status, *lines) + body
    assert len({reader(data) for reader in READERS}) == 1, data
