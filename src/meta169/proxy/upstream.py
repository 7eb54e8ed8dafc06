"""The proxy's side of the proxy-to-server hop: a keep-alive connection pool.

Replies from ``serve`` are small (user data is at most 64 KiB) and always carry
Content-Length, so a reply is read whole, bounded, and relayed verbatim. Failures
map to what the guest should see, and a guest never hangs: cannot connect -> 502,
pool exhausted -> 503, no reply in time -> 504.

The steady state costs no task, no coroutine and no timer per request: a pooled
connection is an asyncio protocol; :meth:`Upstream.request` writes to it, and its
``data_received`` hands the converted reply straight to the request's sink; one
sweep a fraction of the reply timeout long finds requests past their deadline.
Only opening a new connection awaits. GETs that arrive together are pipelined on
one connection (see :class:`Upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

from meta169.errors import HTTPError
from meta169.http import wire
from meta169.http.grammar import TOKEN, TOKEN_RE
from meta169.metrics.instruments import ProxyMetrics

MAX_REPLY = 1 << 20
MAX_HEAD = 64 << 10
# GETs sharing one upstream connection at most; serve queues up to 32 per connection.
PIPELINE_DEPTH = 8
T = TypeVar("T")

# serve's replies always frame by Content-Length (http.message.encode_response).
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,9})[ \t]*(?=\r\n|$)", re.IGNORECASE)
_UNUSUAL_RE = re.compile(rb"\r\n(?:transfer-encoding|connection|x-meta169-)", re.IGNORECASE)
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: .*)?", re.DOTALL)

_NAME_RE = TOKEN_RE
_FIELDS_RE = re.compile(rb"(?:\r\n" + TOKEN + rb":[^\r\n]*)*")


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

    __slots__ = ("convert", "deadline", "done", "payload", "pipeline", "retried", "sink", "started")

    def __init__(
        self,
        payload: bytes,
        convert: Callable[[Reply], T],
        sink: Sink[T],
        deadline: float,
        pipeline: bool,
        started: float = 0.0,
    ) -> None:
        self.started = started  # perf_counter() when sent, for the latency metric
        self.payload = payload
        self.convert = convert
        self.sink = sink
        self.deadline = deadline
        self.pipeline = pipeline
        self.retried = False
        self.done = False


class _Conn(asyncio.Protocol):
    """One connection to serve. It carries one request at a time, or a pipeline of
    GETs that reached the proxy in the same loop iteration (see Upstream); replies
    come back in order (RFC 9112 9.3.2)."""

    __slots__ = ("_buf", "_pool", "_queued", "closed", "pending", "reusable", "transport", "used")

    def __init__(self, pool: Upstream) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Pending[object]] = deque()
        self.closed = False
        self.reusable = True  # False once closing, or once serve said it will close
        self.used = False  # has carried a reply before: may be a stale keep-alive
        self._buf = b""  # the start of a reply not yet complete
        self._queued: list[bytes] = []  # a pipeline being filled, written by flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, pending: _Pending[object]) -> None:
        # Through the queue: requests leave in the order their replies are expected.
        self.queue(pending)
        self.flush()

    def queue(self, pending: _Pending[object]) -> None:
        """Add to the pipeline being filled; flush() writes it all at once."""
        self.pending.append(pending)
        self._queued.append(pending.payload)

    def flush(self) -> None:
        if self.transport is None and not self.closed:
            return  # still connecting: written once connected
        queued, self._queued = self._queued, []
        if queued and self.transport is not None and not self.closed and self.reusable:
            # One write, so serve wakes once and reads the whole pipeline in one go.
            self.transport.write(b"".join(queued) if len(queued) > 1 else queued[0])
        # else: the connection is going away; connection_lost sends its requests on.

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        if not pending:  # nothing asked: a protocol error on the server's side
            self._close()
            return
        buf = self._buf + data if self._buf else data
        size = len(buf)
        off = 0
        done: list[tuple[_Pending[object], Reply]] = []
        while pending and off < size:
            got = _reply_frame(buf, off)
            if got == 0:
                break
            if isinstance(got, tuple):
                status, end = got
                headers: dict[str, str] = {}
            else:
                try:
                    framed = _frame(buf, off)
                except ValueError as exc:
                    self._deliver(done)
                    self._broken(f"metadata server sent a bad reply: {exc}")
                    return
                if framed is None:
                    break
                status, end, headers, keep = framed
                if not keep:
                    # serve closes after this reply: what is queued behind it was not
                    # answered and goes to a fresh connection (connection_lost).
                    self.reusable = False
            done.append((pending.popleft(), Reply(status, buf if off == 0 and end == size else buf[off:end], headers)))
            off = end
            self.used = True
            if not self.reusable:
                break
        rest = self._buf = buf[off:] if off else buf
        if not self.reusable:
            self._close()
        elif rest and not pending:
            self._close()  # bytes nobody asked for
        elif len(rest) > MAX_REPLY:
            self._deliver(done)
            self._broken("metadata server sent a reply larger than 1 MiB")
            return
        elif not pending:
            self._pool.release(self)
        self._deliver(done)

    def _deliver(self, done: list[tuple[_Pending[object], Reply]]) -> None:
        for pending, reply in done:
            self._pool.succeed(pending, reply)

    def _broken(self, reason: str) -> None:
        """The reply at the head cannot be read: 502 for it, the rest go elsewhere."""
        self._close()
        if self.pending:
            self._pool.fail(self.pending.popleft(), HTTPError(502, reason))
        self._buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._pool.forget(self)
        pending = list(self.pending)
        self.pending.clear()
        partial = bool(self._buf)
        self._buf = b""
        for i, p in enumerate(pending):
            # A reused keep-alive connection the server had already closed, or a
            # request queued behind another one: one retry on a fresh connection, as
            # every HTTP client does. A reply cut off midway is not retried.
            self._pool.lost(p, retry=(self.used and not partial) if i == 0 else True)

    def _close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()


def _py_reply_frame(data: bytes, offset: int) -> tuple[int, int] | int:
    """``(status, end)`` of the reply at ``data[offset:]`` if it is a complete plain
    reply as serve writes them (HTTP/1.1, "token: value" header lines, one
    Content-Length, no Connection, Transfer-Encoding or X-Meta169-* header); 0 while
    more bytes are needed to tell;
    -1 for anything else, which :func:`_frame` reads. ``_wire.reply_frame`` is the
    compiled twin."""
    if len(data) - offset < 13:
        return 0
    if not data.startswith(b"HTTP/1.1 ", offset):
        return -1
    status = data[offset + 9 : offset + 12]
    if not (status.isdigit() and data[offset + 12 : offset + 13] in (b" ", b"\r")):
        return -1
    end = data.find(b"\r\n\r\n", offset)
    if end < 0:
        return 0
    head = data[offset:end]
    lengths = _LENGTH_RE.findall(head)
    if len(lengths) != 1 or _UNUSUAL_RE.search(head) or not _FIELDS_RE.fullmatch(head, head.find(b"\r\n")):
        return -1
    total = end + 4 + int(lengths[0])
    return (int(status), total) if total <= len(data) else 0


_reply_frame: Callable[[bytes, int], tuple[int, int] | int] = wire.reply_frame or _py_reply_frame


def _frame(data: bytes, offset: int) -> tuple[int, int, dict[str, str], bool] | None:
    """Any reply at ``data[offset:]`` framed by one Content-Length: ``(status, end,
    headers, keep_alive)``, or None while incomplete. Raises ValueError for a reply
    it cannot frame; serve never writes one (every reply has a Content-Length)."""
    end = data.find(b"\r\n\r\n", offset)
    if end < 0:
        if len(data) - offset > MAX_HEAD:
            raise ValueError("reply head too large")
        return None
    lines = data[offset:end].split(b"\r\n")
    status_line = _STATUS_LINE_RE.fullmatch(lines[0])
    if status_line is None:
        raise ValueError("bad status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _NAME_RE.fullmatch(name):
            raise ValueError("bad header line")
        key = name.decode("latin-1").lower()
        if key == "content-length" and key in headers:
            raise ValueError("repeated Content-Length")
        headers[key] = value.decode("latin-1").strip(" \t")
    length = headers.get("content-length", "")
    if "transfer-encoding" in headers or not (length.isdigit() and len(length) <= 9):
        raise ValueError("not framed by Content-Length")
    total = end + 4 + int(length)
    if total > len(data):
        return None
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "close" not in tokens if status_line.group(1) == b"1" else "keep-alive" in tokens
    return int(status_line.group(2)), total, headers, keep


class Upstream:
    """A pool of connections to serve.

    GETs that reach the proxy in the same loop iteration share one connection, up to
    PIPELINE_DEPTH of them: they leave in one write and serve reads them in one go,
    instead of one wake-up of serve (and, on a shared CPU, one preemption of the
    proxy) per request (docs/benchmarks.md, finding 13). Anything else (a token PUT,
    a POST) has a connection to itself.
    """

    def __init__(self, spec: UpstreamSpec, *, metrics: ProxyMetrics | None = None) -> None:
        self.spec = spec
        # Counts errors by status and the time to each reply, when given.
        self._metrics = metrics
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._connecting = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch: _Conn | None = None  # this iteration's pipeline, if any
        self._batch_ends = False

    def request(self, payload: bytes, convert: Callable[[Reply], T], sink: Sink[T], *, pipeline: bool = False) -> None:
        """Send one complete request; ``sink`` gets ``convert(reply)`` or an HTTPError.
        ``pipeline``: a GET without body, which may share a connection."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.reply_timeout
        started = time.perf_counter() if self._metrics is not None else 0.0
        pending = cast("_Pending[object]", _Pending(payload, convert, sink, deadline, pipeline, started))
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        self._dispatch(pending)

    @property
    def _sweep_every(self) -> float:
        # A reply is declared late at most a tenth of the timeout after its deadline.
        return max(0.05, self.spec.reply_timeout / 10)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = False
        for conn in list(self._open):
            for pending in list(conn.pending):
                if pending.done:
                    continue
                if pending.deadline <= now:
                    self._timeout(pending, conn)
                else:
                    busy = True
        if busy or self._connecting:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def _dispatch(self, pending: _Pending[object], *, fresh: bool = False) -> None:
        """On this iteration's pipeline, an idle connection, or a new one. ``fresh``
        (a retry): only on a connection that has not carried a reply yet."""
        if pending.pipeline:
            batch = self._batch
            if (
                batch is not None
                and batch.reusable
                and len(batch.pending) < PIPELINE_DEPTH
                and not (fresh and batch.used)
            ):
                batch.queue(pending)
                return
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.reusable:
                if pending.pipeline:
                    conn.queue(pending)
                    self._open_batch(conn)
                else:
                    conn.send(pending)
                return
        if len(self._open) + self._connecting >= self.spec.max_connections:
            self.fail(pending, HTTPError(503, "metadata proxy busy"))
            return
        conn = _Conn(self)
        conn.queue(pending)  # written once connected
        if pending.pipeline:
            self._open_batch(conn)
        self._connecting += 1
        task = asyncio.get_running_loop().create_task(self._connect(conn))
        task.add_done_callback(_ignore)

    def _open_batch(self, conn: _Conn) -> None:
        if self._batch is not None:
            self._batch.flush()  # full: it goes now, the next one fills
        self._batch = conn
        if not self._batch_ends:
            self._batch_ends = True
            # Runs once this iteration's callbacks are done, before the loop polls
            # again: a pipeline never outlives the iteration that filled it.
            asyncio.get_running_loop().call_soon(self._end_batch)

    def _end_batch(self) -> None:
        batch, self._batch = self._batch, None
        self._batch_ends = False
        if batch is not None:
            batch.flush()

    async def _connect(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.connect_timeout
        pause = 0.005
        try:
            while True:
                if self.spec.unix_path is not None:
                    coro = loop.create_unix_connection(lambda: conn, str(self.spec.unix_path))
                else:
                    coro = loop.create_connection(lambda: conn, self.spec.host, self.spec.port)
                try:
                    await asyncio.wait_for(coro, max(0.001, deadline - loop.time()))
                    break
                except BlockingIOError:
                    # A Unix listener's queue is full (serve is behind on accepting a
                    # burst of connections): it drains, so wait a little and retry.
                    if loop.time() + pause >= deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.1)
        except (TimeoutError, OSError) as exc:
            conn.closed = True
            conn.reusable = False
            if self._batch is conn:
                self._batch = None
            error = HTTPError(502, f"metadata server unreachable at {self.spec}: {exc}")
            while conn.pending:
                self.fail(conn.pending.popleft(), error)
            return
        finally:
            self._connecting -= 1
        if conn.closed:  # lost at once: connection_lost has sent its requests on
            return
        self._open.add(conn)
        conn.flush()

    # -- called by connections ---------------------------------------------------------------
    def release(self, conn: _Conn) -> None:
        if conn.reusable and not conn.pending:
            self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        if self._batch is conn:
            self._batch = None

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def succeed(self, pending: _Pending[object], reply: Reply) -> None:
        if pending.done:
            return
        pending.done = True
        if self._metrics is not None:
            self._metrics.upstream_duration.observe(time.perf_counter() - pending.started)
        try:
            value = pending.convert(reply)
        except Exception as exc:  # a converter bug must not hang the guest
            pending.sink.fail(exc)
            return
        pending.sink.deliver(value)

    def fail(self, pending: _Pending[object], error: HTTPError) -> None:
        if not pending.done:
            pending.done = True
            if self._metrics is not None:
                self._metrics.upstream_errors.inc((str(error.status),))
            pending.sink.fail(error)

    def lost(self, pending: _Pending[object], *, retry: bool) -> None:
        if retry and not pending.retried and not pending.done:
            pending.retried = True
            self._dispatch(pending, fresh=True)
            return
        self.fail(pending, HTTPError(502, "metadata server closed the connection"))

    def _timeout(self, pending: _Pending[object], conn: _Conn) -> None:
        self.fail(pending, HTTPError(504, "metadata server did not answer in time"))
        # The connection would deliver the late reply to the next request in line: it
        # is closed rather than reused, and what waits behind goes elsewhere. A late
        # request further back stays in line; its reply is read and dropped.
        if conn.pending and conn.pending[0] is pending:
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
