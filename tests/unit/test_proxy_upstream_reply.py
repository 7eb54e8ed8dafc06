"""The proxy's framing of serve's replies: plain replies by hand (compiled and Python
twins), anything framed by one Content-Length in Python, and pipelined replies one
after another out of one buffer."""

from __future__ import annotations

from collections.abc import Callable

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.http import wire
from meta169.proxy.upstream import _frame, _py_reply_frame
from tests.capabilities import require

Framer = Callable[[bytes, int], "tuple[int, int] | int"]


@pytest.fixture(scope="module", params=["python", "compiled"])
def reply_frame(request: pytest.FixtureRequest) -> Framer:
    if request.param == "python":
        return _py_reply_frame
    compiled = wire.reply_frame
    require(
        "compiled fast path", compiled is not None, "meta169.http._wire was not built (needs gcc and Python headers)"
    )
    assert compiled is not None
    return compiled


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PLAIN = _head("HTTP/1.1 200 OK", "Server: meta169", "Content-Type: text/plain", "Content-Length: 5") + b"hello"
NOT_FOUND = _head("HTTP/1.1 404 Not Found", "content-length:  2 ") + b"no"


def _httptools_ends(data: bytes) -> list[int]:
    """Status of every message httptools reads out of ``data``."""
    seen: list[int] = []

    class Cap:
        def on_message_complete(self) -> None:
            seen.append(parser.get_status_code())

    parser = httptools.HttpResponseParser(Cap())
    parser.feed_data(data)
    return seen


@pytest.mark.parametrize(
    ("data", "status"),
    [(PLAIN, 200), (NOT_FOUND, 404), (_head("HTTP/1.1 200 OK", "Content-Length: 0"), 200)],
)
def test_upstream_frames_plain_replies(reply_frame: Framer, data: bytes, status: int) -> None:
    assert reply_frame(data, 0) == (status, len(data))
    assert _httptools_ends(data) == [status]


def test_upstream_frames_pipelined_replies_one_by_one(reply_frame: Framer) -> None:
    data = PLAIN + NOT_FOUND + PLAIN
    first = reply_frame(data, 0)
    assert first == (200, len(PLAIN))
    second = reply_frame(data, len(PLAIN))
    assert second == (404, len(PLAIN) + len(NOT_FOUND))
    assert reply_frame(data, len(PLAIN) + len(NOT_FOUND)) == (200, len(data))
    assert _httptools_ends(data) == [200, 404, 200]
    # the second reply not all here yet
    assert reply_frame(PLAIN + NOT_FOUND[:-1], len(PLAIN)) == 0


@pytest.mark.parametrize(
    "data",
    [
        PLAIN[:-1],  # body not all here yet
        PLAIN[: PLAIN.index(b"\r\n\r\n")],  # head not complete
        b"HTTP/1.1 20",  # too short to tell
        b"",
    ],
)
def test_upstream_waits_for_more_bytes(reply_frame: Framer, data: bytes) -> None:
    assert reply_frame(data, 0) == 0


UNUSUAL = [
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
    b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n",
]


@pytest.mark.parametrize("data", UNUSUAL)
def test_upstream_leaves_anything_else_to_python_framing(reply_frame: Framer, data: bytes) -> None:
    assert reply_frame(data, 0) == -1
    assert reply_frame(PLAIN + data, len(PLAIN)) == -1


def test_upstream_python_framing_reads_what_serve_may_send() -> None:
    closing = _head("HTTP/1.1 400 Bad Request", "Content-Length: 4", "Connection: close") + b"bad\n"
    assert _frame(closing + PLAIN, 0) == (400, len(closing), {"content-length": "4", "connection": "close"}, False)
    hop = _head("HTTP/1.1 200 OK", "X-Meta169-Hop-Limit: 1", "Content-Length: 5") + b"token"
    status, end, headers, keep = _frame(PLAIN + hop, len(PLAIN)) or (0, 0, {}, False)
    assert (status, end, keep) == (200, len(PLAIN) + len(hop), True)
    assert headers["x-meta169-hop-limit"] == "1"
    old = _head("HTTP/1.0 200 OK", "Content-Length: 5") + b"hello"
    assert _frame(old, 0) == (200, len(old), {"content-length": "5"}, False)
    kept = _head("HTTP/1.0 200 OK", "Connection: Keep-Alive", "Content-Length: 5") + b"hello"
    assert (_frame(kept, 0) or (0, 0, {}, False))[3] is True
    assert _frame(closing[:-1], 0) is None
    assert _frame(closing[:20], 0) is None
    assert _frame(PLAIN, 0) == (
        200,
        len(PLAIN),
        {"server": "meta169", "content-type": "text/plain", "content-length": "5"},
        True,
    )


@pytest.mark.parametrize(
    "data",
    [
        _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
        _head("HTTP/1.1 200 OK") + b"hello",
        _head("HTTP/1.1 200 OK", "Content-Length: 5", "content-length: 5") + b"hello",
        _head("HTTP/1.1 200 OK", "Content-Length: 5x") + b"hello",
        _head("HTTP/1.1 2x0 OK", "Content-Length: 5") + b"hello",
        _head("HTTP/1.1 200 OK", "bad header", "Content-Length: 5") + b"hello",
        b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * (70 << 10),  # a head that never ends
    ],
)
def test_upstream_python_framing_refuses_what_it_cannot_frame(data: bytes) -> None:
    with pytest.raises(ValueError):
        _frame(data, 0)


LINE = st.sampled_from(
    [
        "Content-Length: 5",
        "content-length:5",
        "Content-Length: 4",
        "Connection: close",
        "X-Meta169-Hop-Limit: 1",
        "Server: meta169",
        "Content-Type: text/plain",
        "Transfer-Encoding: chunked",
        "X: y",
        "Content-Length : 5",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    status=st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found", "HTTP/1.0 200 OK", "HTTP/1.1 20 OK"]),
    lines=st.lists(LINE, max_size=5),
    body=st.sampled_from([b"hello", b"", b"hell", b"hello!"]),
    before=st.sampled_from([b"", PLAIN]),
    cut=st.integers(min_value=0, max_value=8),
)
def test_upstream_framers_agree(
    reply_frame: Framer, status: str, lines: list[str], body: bytes, before: bytes, cut: int
) -> None:
    data = before + _head(status, *lines) + body
    data = data[: len(data) - cut] if cut else data
    got = reply_frame(data, len(before))
    assert got == _py_reply_frame(data, len(before)), data
    if isinstance(got, tuple):
        # a plain reply is framed the same way by the Python framing of any reply
        framed = _frame(data, len(before))
        assert framed is not None and framed[:2] == got and framed[3] is True
