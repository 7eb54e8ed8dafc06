"""The proxy's side of the proxy-to-server hop: a keep-alive connection pool.

Replies from ``serve`` are small (user data is at most 64 KiB) and always carry
Content-Length, so a reply is read whole, bounded, and relayed verbatim. Failures
map to what the guest should see (BRIEF: never hang): cannot connect -> 502,
pool exhausted -> 503, no reply in time -> 504.

The steady state costs no task, no coroutine and no timer per request: a pooled
connection is an asyncio protocol; :meth:`Upstream.request` writes to it, and its
``data_received`` hands the converted reply straight to the request's sink; one
sweep a fraction of the reply timeout long finds requests past their deadline.
Only opening a new connection awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

import httptools

from meta169.api import wire
from meta169.errors import HTTPError

MAX_REPLY = 1 << 20
T = TypeVar("T")

# serve's replies always frame by Content-Length; anything else is httptools' to read.
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,9})[ \t]*(?=\r\n|$)", re.IGNORECASE)
_UNUSUAL_RE = re.compile(rb"\r\n(?:transfer-encoding|connection|x-meta169-)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    unix_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    connect_timeout: float = 2.0
    reply_timeout: float = 10.0
    max_connections: int = 256

    @property
    def is_tcp(self) -> bool:
        return self.unix_path is None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path is not None else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    raw: bytes
    headers: dict[str, str]


T_contra = TypeVar("T_contra", contravariant=True)


class Sink(Protocol[T_contra]):
    """Where a request's outcome goes: exactly one of the two calls, once."""

    def deliver(self, value: T_contra) -> None: ...
    def fail(self, error: BaseException) -> None: ...


class _Pending(Generic[T]):
    """One request in flight: where its converted reply goes, and by when."""

    __slots__ = ("convert", "deadline", "done", "payload", "retried", "sink")

    def __init__(self, payload: bytes, convert: Callable[[Reply], T], sink: Sink[T], deadline: float) -> None:
        self.payload = payload
        self.convert = convert
        self.sink = sink
        self.deadline = deadline
        self.retried = False
        self.done = False


class _Conn(asyncio.Protocol):
    __slots__ = (
        "_chunks",
        "_done",
        "_headers",
        "_keep",
        "_parser",
        "_pool",
        "_size",
        "closed",
        "pending",
        "transport",
        "used",
    )

    def __init__(self, pool: Upstream) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.pending: _Pending[object] | None = None
        self.closed = False
        self.used = False  # has carried a request before: may be a stale keep-alive
        # Made on the first reply the hand reader declines (see _whole_reply).
        self._parser: httptools.HttpResponseParser | None = None
        self._reset()

    def _reset(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._headers: dict[str, str] = {}
        self._done = False
        self._keep = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, pending: _Pending[object]) -> None:
        assert self.transport is not None
        self.pending = pending
        self.transport.write(pending.payload)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_complete(self) -> None:
        self._done = True
        # httptools answers should_keep_alive() truthfully only inside the callback.
        assert self._parser is not None
        self._keep = bool(self._parser.should_keep_alive())

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        if pending is None:  # nothing asked: a protocol error on the server's side
            self._close()
            return
        if not self._chunks:
            status = _whole_reply(data)
            if status:
                self._complete(pending, Reply(status, data, {}), keep=True)
                return
        self._size += len(data)
        self._chunks.append(data)
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(self)
        try:
            if self._size > MAX_REPLY:
                raise httptools.HttpParserError("reply too large")
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._close()
            self._pool.fail(pending, HTTPError(502, f"metadata server sent a bad reply: {exc}"))
            return
        if self._done:
            self._complete(pending, Reply(parser.get_status_code(), b"".join(self._chunks), self._headers), self._keep)

    def _complete(self, pending: _Pending[object], reply: Reply, keep: bool) -> None:
        self.pending = None
        self.used = True
        self._reset()
        if keep:
            self._pool.release(self)
        else:
            self._close()
            # The parser holds this connection as its callback target; let both go.
            self._parser = None
        self._pool.succeed(pending, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser = None
        self._pool.forget(self)
        pending = self.pending
        self.pending = None
        if pending is not None:
            # A reused keep-alive connection the server had already closed: one retry
            # on a fresh connection, as every HTTP client does.
            stale = self.used and not self._chunks
            self._pool.lost(pending, stale=stale)

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


def _py_whole_reply(data: bytes) -> int:
    """The status of ``data`` if it is exactly one complete, plain keep-alive reply
    as serve writes them (HTTP/1.1, one Content-Length, no Connection, Transfer-Encoding
    or X-Meta169-* header), else 0 and httptools reads it. ``_wire.whole_reply`` is
    the compiled twin."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data.startswith(b"HTTP/1.1 "):
        return 0
    head = data[:end]
    lengths = _LENGTH_RE.findall(head)
    if len(lengths) != 1 or end + 4 + int(lengths[0]) != len(data) or _UNUSUAL_RE.search(head):
        return 0
    status = data[9:12]
    return int(status) if status.isdigit() and data[12:13] in (b" ", b"\r") else 0


_whole_reply: Callable[[bytes], int] = wire.whole_reply or _py_whole_reply


class Upstream:
    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._connecting = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request(self, payload: bytes, convert: Callable[[Reply], T], sink: Sink[T]) -> None:
        """Send one complete request; ``sink`` gets ``convert(reply)`` or an HTTPError."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = cast("_Pending[object]", _Pending(payload, convert, sink, loop.time() + self.spec.reply_timeout))
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        self._dispatch(pending)

    @property
    def _sweep_every(self) -> float:
        # A reply is declared late at most a tenth of the timeout after its deadline.
        return max(0.05, self.spec.reply_timeout / 10)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        busy = False
        for conn in list(self._open):
            pending = conn.pending
            if pending is None:
                continue
            if pending.deadline <= now:
                self._timeout(pending)
            else:
                busy = True
        if busy or self._connecting:
            self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)

    def _dispatch(self, pending: _Pending[object], *, fresh: bool = False) -> None:
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.closed:
                conn.send(pending)
                return
        if len(self._open) + self._connecting >= self.spec.max_connections:
            self.fail(pending, HTTPError(503, "metadata proxy busy"))
            return
        self._connecting += 1
        task = asyncio.get_running_loop().create_task(self._connect_and_send(pending))
        task.add_done_callback(_ignore)

    async def _connect_and_send(self, pending: _Pending[object]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.spec.unix_path is not None:
                coro = loop.create_unix_connection(lambda: _Conn(self), str(self.spec.unix_path))
            else:
                coro = loop.create_connection(lambda: _Conn(self), self.spec.host, self.spec.port)
            _, conn = await asyncio.wait_for(coro, self.spec.connect_timeout)
        except (TimeoutError, OSError) as exc:
            self.fail(pending, HTTPError(502, f"metadata server unreachable at {self.spec}: {exc}"))
            return
        finally:
            self._connecting -= 1
        self._open.add(conn)
        if pending.done:  # timed out meanwhile: keep the connection
            self.release(conn)
            return
        conn.send(pending)

    # -- called by connections ---------------------------------------------------------------
    def release(self, conn: _Conn) -> None:
        if not conn.closed:
            self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def succeed(self, pending: _Pending[object], reply: Reply) -> None:
        if pending.done:
            return
        pending.done = True
        try:
            value = pending.convert(reply)
        except Exception as exc:  # a converter bug must not hang the guest
            pending.sink.fail(exc)
            return
        pending.sink.deliver(value)

    def fail(self, pending: _Pending[object], error: HTTPError) -> None:
        if not pending.done:
            pending.done = True
            pending.sink.fail(error)

    def lost(self, pending: _Pending[object], *, stale: bool) -> None:
        if stale and not pending.retried and not pending.done:
            pending.retried = True
            self._dispatch(pending, fresh=True)
            return
        self.fail(pending, HTTPError(502, "metadata server closed the connection"))

    def _timeout(self, pending: _Pending[object]) -> None:
        self.fail(pending, HTTPError(504, "metadata server did not answer in time"))
        # The connection carrying it would deliver a late reply to a request already
        # answered: it is closed rather than reused.
        for conn in list(self._open):
            if conn.pending is pending:
                conn.pending = None
                conn._close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn._close()
        self._idle.clear()


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
