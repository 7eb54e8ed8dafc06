"""The proxy's hand reader for serve's replies: whole, plain replies only."""

from __future__ import annotations

import httptools
import pytest

from meta169.proxy.upstream import _whole_reply


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
def test_upstream_reads_whole_plain_replies(data: bytes, status: int) -> None:
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
    ],
)
def test_upstream_leaves_anything_else_to_httptools(data: bytes) -> None:
    assert _whole_reply(data) == 0
