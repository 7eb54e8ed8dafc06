"""The compiled path's counters (http/_wire.c): answers per class and their latency in
the FastPath, requests forwarded by the Stamper, read without a call per request."""

from __future__ import annotations

from typing import Any

import pytest

from meta169.http import wire
from meta169.http.message import document_head
from meta169.metrics.core import LATENCY_BUCKETS
from tests.capabilities import require

HEAD = document_head("text/plain", 5)
PEER = "10.0.0.11"
A = b"GET /a HTTP/1.1\r\n\r\n"


@pytest.fixture(scope="module")
def compiled() -> Any:
    require("compiled fast path", wire.compiled(), "meta169.http._wire was not built (`make venv` builds it)")
    from meta169.http import _wire  # type: ignore[attr-defined]

    return _wire


def _fast(compiled: Any, table: dict[bytes, Any], bounds: tuple[float, ...] | None = None) -> Any:
    return compiled.FastPath({PEER: (table, "uuid")}, None, 8192, 64, 2048, (), (), None, None, bounds)


def test_wire_counts_answers_by_the_class_the_entry_carries(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD, b"hello", 3), b"/b": (HEAD, b"hel", b"lo", 7), b"/c": (HEAD, b"hello")})
    replies, keep = fast.answer(A + A + b"GET /b HTTP/1.1\r\n\r\n", PEER)
    assert keep and replies.count(b"HTTP/1.1 200 OK") == 3
    assert fast.answer(b"GET /c HTTP/1.1\r\n\r\n", PEER) is not None
    assert fast.answer(b"GET /missing HTTP/1.1\r\n\r\n", PEER) is None  # declined: not counted
    counts, latency, total = fast.stats()
    expected = [0] * 16
    expected[3], expected[7], expected[15] = 2, 1, 1  # an entry without a class counts in the last slot
    assert list(counts) == expected
    assert (latency, total) == ((), 0.0)  # no bounds: not timed


def test_wire_times_answers_into_the_buckets_it_was_given(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD, b"hello", 0)}, LATENCY_BUCKETS)
    fast.answer(A + A, PEER)  # one call answering two: each waited for the call
    fast.answer(A, PEER)
    _, latency, total = fast.stats()
    assert len(latency) == len(LATENCY_BUCKETS) + 1
    assert sum(latency) == 3 and 0 < total < 1.0
    assert latency[-1] == 0  # nothing took longer than the last bound (10 s)


@pytest.mark.parametrize(
    ("bounds", "error"),
    [
        ((0.5, 0.1), ValueError),
        ((0.0,), ValueError),
        (tuple(float(i + 1) for i in range(33)), TypeError),
        ([0.1], TypeError),
    ],
)
def test_wire_checks_the_latency_bounds(compiled: Any, bounds: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        _fast(compiled, {}, bounds)


def test_wire_refuses_a_class_out_of_range(compiled: Any) -> None:
    fast = _fast(compiled, {b"/a": (HEAD, b"hello", 16)})
    with pytest.raises(ValueError, match="class"):
        fast.answer(A, PEER)


def test_wire_stamper_counts_what_it_forwards(compiled: Any) -> None:
    forward = wire.stamper(
        drop=frozenset({"x-forwarded-for"}),
        prefixes=("x-meta169-",),
        marker_for="x-forwarded-for",
        marker="X-Meta169-Guest-Forwarded: 1",
        before="host: metadata\r\nx-meta169-caller-ip: ",
        after="\r\nx-meta169-network-id: net-a\r\n\r\n",
        max_header_bytes=8192,
        max_headers=64,
        max_url_bytes=2048,
    )
    assert forward is not None
    count = wire.stamped(forward)
    assert count() == 0
    assert forward(A, PEER) is not None
    assert forward(b"POST /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", PEER) is None  # declined: Python's
    assert forward(A, PEER) is not None
    assert count() == 2
