"""The proxy's side of the proxy-to-server hop: keep-alive connection pools to one
or several ``serve`` nodes, with health checks, failover and a wait queue.

Replies from ``serve`` are small (user data is at most 64 KiB) and always carry
Content-Length, so a reply is read whole, bounded, and relayed verbatim.

The steady state costs no task, no coroutine and no timer per request: a pooled
connection is an asyncio protocol; :meth:`Upstream.request` writes to it, and its
``data_received`` hands the converted reply straight to the request's sink; one
sweep a fraction of the reply timeout long finds requests past their deadline.
Only opening a new connection awaits. GETs that arrive together are pipelined on
one connection (see :class:`Upstream`).

Each upstream (``--upstream``, repeatable) has a pool of its own. A request that
names its caller (``affinity``) goes to that caller's pool among those marked up,
chosen by rendezvous hashing, so that one node holds each caller's cache, its
IMDSv2 tokens and its rate limit, and a node that goes down moves only its own
callers; unless that pool has more than its share of the requests outstanding
(AFFINITY_BALANCE times the mean, bounded loads as in haproxy's
``hash-balance-factor``). Any other request, and one its caller's pool cannot take
now, goes to the pool with the fewest requests outstanding (ties taken in turn), so
a node that answers slowly gets less. What a guest sees when something fails (it
never hangs):

- a connection cannot be opened: its pool is marked down and its requests, never
  sent, go to a pool they have not tried; with none left, 502;
- a connection closes before any byte of a request's reply: the request goes again,
  preferably to another pool, if repeating it is safe: a method RFC 9110 9.2.2 calls
  idempotent (GET, HEAD, the IMDSv2 token PUT). serve's one request that changes
  state, the password POST (Nova's ``password.py``), goes again only if it was never
  written; it never takes an idle keep-alive connection (serve may have closed it
  while idle) but a new one, or one that has just answered. A request that was
  alone on a new connection when serve went away may have been its cause: it goes
  only to a node it has not been sent to. No request is sent more than twice again;
  past that, or with no node left to try, 502;
- every pool has ``max_connections`` busy: the request waits in one FIFO queue, at
  most ``queue_limit`` long, for a connection to free (a freed connection takes up
  to PIPELINE_DEPTH waiting GETs at once); 504 at its deadline, 503 only when the
  queue is full or there is no connection to wait for. A 503 on ``/openstack`` or
  on the token PUT makes cloud-init 22.4.2 give up on the metadata service, where
  haproxy, too, leaves connections beyond ``maxconn`` waiting;
- no reply by the deadline (``reply_timeout`` after the guest's request reached
  the proxy, queueing included): 504, not repeated (the guest's time is spent).

Health: a pool is marked down when a connection to it cannot be opened or its
probe fails, and up again only by a probe that succeeds. With :meth:`Upstream.start_checks`,
every interval each pool that is down, or that answered nothing since the last
look, is probed: a new connection, ``GET /healthz`` without an identity stamp and
with ``Connection: close``, and the status line of the reply. serve answers such a
request from its event loop without the registry (400 on a Unix listener: no
caller; 403 over TCP: no signature), so any HTTP status line shows the node
accepts, parses and answers; the probe costs serve one small request a second,
counted in its ``meta169_serve_requests_total`` as a 4xx of tree ``other``, and
nothing while real replies flow. When every pool is marked down, requests are tried
on them anyway: a node may be back before its next probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

from meta169.errors import HTTPError
from meta169.http import wire
from meta169.http.grammar import TOKEN, TOKEN_RE
from meta169.metrics.instruments import ProxyMetrics

log = logging.getLogger("meta169.proxy")

MAX_REPLY = 1 << 20
MAX_HEAD = 64 << 10
# GETs sharing one upstream connection at most; serve queues up to 32 per connection.
PIPELINE_DEPTH = 8
# Requests waiting for a connection to serve at most, over all upstreams.
QUEUE_LIMIT = 4096
# A caller's pool takes its requests while it has at most this times the mean of the
# requests outstanding (and at least PIPELINE_DEPTH): haproxy's hash-balance-factor 150.
AFFINITY_BALANCE = 1.5
# Seconds between two looks at each upstream's health.
CHECK_INTERVAL = 1.0
# A request is sent again at most this many times after a connection closed under
# it (a stale keep-alive connection, then a node that died); connect failures, where
# nothing was sent, are bounded by the pools instead (each tried once).
MAX_RESENDS = 2
# RFC 9110 9.2.2: repeating these has the effect of sending them once.
IDEMPOTENT = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"))
PROBE = b"GET /healthz HTTP/1.1\r\nhost: metadata\r\nconnection: close\r\n\r\n"
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
    """One request in flight or waiting: where its converted reply goes, by when,
    and what may be done with it when a connection fails."""

    __slots__ = (
        "affinity",
        "convert",
        "deadline",
        "done",
        "fresh",
        "idempotent",
        "payload",
        "pipeline",
        "queued",
        "resends",
        "sink",
        "started",
        "tried",
    )
    # Set when it starts waiting for a connection (the loop's time); read only then.
    queued: float

    def __init__(
        self,
        payload: bytes,
        convert: Callable[[Reply], T],
        sink: Sink[T],
        deadline: float,
        pipeline: bool,
        started: float,
        idempotent: bool,
    ) -> None:
        self.started = started  # perf_counter() when sent, for the latency metric
        self.payload = payload
        self.convert = convert
        self.sink = sink
        self.deadline = deadline
        self.pipeline = pipeline
        self.idempotent = idempotent
        # Only on a connection that has not carried a request yet (see _Pool.send).
        self.fresh = not idempotent
        self.resends = 0
        self.tried = 0  # bit i: placed on pool i once
        self.done = False
        self.affinity: int | None = None  # the caller's hash, when it has a pool of its own


class _Conn(asyncio.Protocol):
    """One connection to serve. It carries one request at a time, or a pipeline of
    GETs that reached the proxy in the same loop iteration (see Upstream); replies
    come back in order (RFC 9112 9.3.2)."""

    __slots__ = ("_buf", "_pool", "_queued", "closed", "pending", "reusable", "transport", "used")

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Pending[object]] = deque()
        self.closed = False
        self.reusable = True  # False once closing, or once serve said it will close
        self.used = False  # has carried a reply before: may be a stale keep-alive
        self._buf = b""  # the start of a reply not yet complete
        self._queued: list[_Pending[object]] = []  # a pipeline being filled, written by flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, pending: _Pending[object]) -> None:
        # Through the queue: requests leave in the order their replies are expected.
        self.queue(pending)
        self.flush()

    def queue(self, pending: _Pending[object]) -> None:
        """Add to the pipeline being filled; flush() writes it all at once."""
        self.pending.append(pending)
        self._queued.append(pending)
        pool = self._pool
        pool.outstanding += 1
        pending.tried |= pool.bit

    def flush(self) -> None:
        if self.transport is None and not self.closed:
            return  # still connecting: written once connected
        queued = self._queued
        transport = self.transport
        if queued and transport is not None and not self.closed and self.reusable:
            self._queued = []
            # One write, so serve wakes once and reads the whole pipeline in one go.
            transport.write(b"".join([p.payload for p in queued]) if len(queued) > 1 else queued[0].payload)
        # else: the connection is going away; what stays in _queued was never written,
        # and connection_lost sends it on.

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
        pool = self._pool
        if done:
            pool.outstanding -= len(done)
            pool.replies += len(done)
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
            upstream = pool.upstream
            if upstream.wait_queue:
                upstream.freed(self)
            else:
                pool.idle.append(self)
        self._deliver(done)

    def _deliver(self, done: list[tuple[_Pending[object], Reply]]) -> None:
        upstream = self._pool.upstream
        for pending, reply in done:
            upstream.succeed(pending, reply)

    def _broken(self, reason: str) -> None:
        """The reply at the head cannot be read: 502 for it, the rest go elsewhere."""
        self._close()
        if self.pending:
            self._pool.outstanding -= 1
            self._pool.upstream.fail(self.pending.popleft(), HTTPError(502, reason))
        self._buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        pool = self._pool
        pool.forget(self)
        pending = list(self.pending)
        self.pending.clear()
        unsent, self._queued = self._queued, []
        pool.outstanding -= len(pending)
        partial = bool(self._buf)
        self._buf = b""
        upstream = pool.upstream
        for i, p in enumerate(pending):
            sent = p not in unsent
            if i == 0:
                # Bytes of its reply had come: it is not sent again. Alone on a
                # connection that never answered: serve may have died of it.
                upstream.lost(p, sent=sent, partial=partial, suspect=not self.used)
            else:
                upstream.lost(p, sent=sent, partial=False, suspect=False)  # queued behind another
        upstream.pump()  # the pool has room for a new connection

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


class _Pool:
    """The connections to one upstream, and what is known of its health."""

    __slots__ = (
        "_batch",
        "_batch_ends",
        "bit",
        "connecting",
        "idle",
        "index",
        "looked_at",
        "name",
        "open",
        "outstanding",
        "probing",
        "replies",
        "spec",
        "up",
        "upstream",
    )

    def __init__(self, upstream: Upstream, spec: UpstreamSpec, index: int) -> None:
        self.upstream = upstream
        self.spec = spec
        self.index = index
        self.bit = 1 << index
        self.name = str(spec)
        self.idle: list[_Conn] = []
        self.open: set[_Conn] = set()
        self.connecting = 0
        self.outstanding = 0  # requests on its connections, replies not read yet
        self.replies = 0  # replies read, ever: traffic that shows it answers
        self.looked_at = 0  # ``replies`` at the last health look
        self.up = True
        self.probing = False
        self._batch: _Conn | None = None  # this iteration's pipeline, if any
        self._batch_ends = False

    def send(self, pending: _Pending[object]) -> bool:
        """On this iteration's pipeline, an idle connection, or a new one; False when
        every connection the pool may have is busy."""
        if pending.pipeline:
            batch = self._batch
            if (
                batch is not None
                and batch.reusable
                and len(batch.pending) < PIPELINE_DEPTH
                and not (pending.fresh and batch.used)
            ):
                batch.queue(pending)
                return True
        idle = self.idle
        if not pending.fresh and self._reuse(pending):
            return True
        if len(self.open) + self.connecting < self.spec.max_connections:
            conn = _Conn(self)
            conn.queue(pending)  # written once connected
            if pending.pipeline:
                self._open_batch(conn)
            self.connecting += 1
            task = asyncio.get_running_loop().create_task(self._connect(conn))
            task.add_done_callback(_ignore)
            return True
        # No room for a new connection: an idle one rather than a wait.
        return bool(idle) and self._reuse(pending)

    def _reuse(self, pending: _Pending[object]) -> bool:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable:
                if pending.pipeline:
                    conn.queue(pending)
                    self._open_batch(conn)
                else:
                    conn.send(pending)
                return True
        return False

    def take(self, conn: _Conn, waiting: deque[_Pending[object]], now: float) -> None:
        """A connection that just freed takes the first waiting request, and with a
        GET the GETs right behind it, as one pipeline."""
        upstream = self.upstream
        head = waiting.popleft()
        upstream.waited(head, now)
        conn.queue(head)
        if head.pipeline:
            while waiting and len(conn.pending) < PIPELINE_DEPTH:
                following = waiting[0]
                if following.done:
                    waiting.popleft()
                    continue
                if not following.pipeline:
                    break
                waiting.popleft()
                upstream.waited(following, now)
                conn.queue(following)
        conn.flush()

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
        spec = self.spec
        deadline = loop.time() + spec.connect_timeout
        pause = 0.005
        try:
            while True:
                if spec.unix_path is not None:
                    coro = loop.create_unix_connection(lambda: conn, str(spec.unix_path))
                else:
                    coro = loop.create_connection(lambda: conn, spec.host, spec.port)
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
            conn._queued = []
            if self._batch is conn:
                self._batch = None
            self.connecting -= 1
            self.upstream.unreachable(self, conn, exc)
            return
        except BaseException:
            self.connecting -= 1
            raise
        self.connecting -= 1
        if conn.closed:  # lost at once: connection_lost has sent its requests on
            return
        self.open.add(conn)
        conn.flush()

    def forget(self, conn: _Conn) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if self._batch is conn:
            self._batch = None

    def mark_down(self, reason: str) -> None:
        if self.up:
            self.up = False
            log.warning("upstream %s is down: %s", self.name, reason)

    def mark_up(self) -> None:
        if not self.up:
            self.up = True
            log.warning("upstream %s is up again", self.name)


class Upstream:
    """Connection pools to one or several serve nodes, as one.

    GETs that reach the proxy in the same loop iteration share one connection of a
    pool, up to PIPELINE_DEPTH of them: they leave in one write and serve reads them
    in one go, instead of one wake-up of serve (and, on a shared CPU, one preemption
    of the proxy) per request (docs/benchmarks.md, finding 13). Anything else (a
    token PUT, a POST) has a connection to itself.
    """

    def __init__(
        self,
        specs: UpstreamSpec | Sequence[UpstreamSpec],
        *,
        metrics: ProxyMetrics | None = None,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        specs = (specs,) if isinstance(specs, UpstreamSpec) else tuple(specs)
        if not specs:
            raise ValueError("an upstream needs at least one address")
        self.specs = specs
        self._pools = [_Pool(self, spec, i) for i, spec in enumerate(specs)]
        # The one pool, when there is only one: its requests skip the choosing.
        self._single = self._pools[0] if len(self._pools) == 1 else None
        self._timeout = min(spec.reply_timeout for spec in specs)
        self._queue_limit = queue_limit
        self.wait_queue: deque[_Pending[object]] = deque()
        # Counts errors by status, retries, waits and the time to each reply, when given.
        self._metrics = metrics
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn = 0  # where the next tie between pools is broken
        self._checker: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._closing = False
        if metrics is not None:
            metrics.watch_upstreams(self.states, self.waiting, self.loads)

    def request(
        self,
        payload: bytes,
        convert: Callable[[Reply], T],
        sink: Sink[T],
        *,
        pipeline: bool = False,
        idempotent: bool = True,
        affinity: int | None = None,
    ) -> None:
        """Send one complete request; ``sink`` gets ``convert(reply)`` or an HTTPError.
        ``pipeline``: a GET without body, which may share a connection.
        ``idempotent``: safe to send again after it was written (not a POST).
        ``affinity``: a hash of the caller, whose requests then go to one node."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        started = time.perf_counter() if self._metrics is not None else 0.0
        pending = cast("_Pending[object]", _Pending(payload, convert, sink, deadline, pipeline, started, idempotent))
        pending.affinity = affinity
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        single = self._single
        if single is None or self._closing or not single.send(pending):
            self._dispatch(pending)

    # -- where a request goes --------------------------------------------------------------
    def _dispatch(self, pending: _Pending[object], *, untried: bool = False, front: bool = False) -> bool:
        """Place ``pending`` on a pool, or queue it; False when no pool may take it
        (``untried``: only pools it was not placed on before)."""
        if self._closing:
            self.fail(pending, HTTPError(503, "metadata proxy stopping"))
            return True
        candidates = self._candidates(pending, untried)
        if not candidates:
            return False
        for pool in candidates:
            if pool.send(pending):
                return True
        self._wait(pending, front)
        return True

    def _candidates(self, pending: _Pending[object], untried: bool) -> Sequence[_Pool]:
        pools = self._pools
        if len(pools) == 1:
            return () if untried and pending.tried else pools
        tried = pending.tried
        usable = [p for p in pools if p.up and not (untried and tried & p.bit)]
        if not usable:
            # Every pool it may go to is marked down: try them anyway.
            usable = [p for p in pools if not (untried and tried & p.bit)]
        if len(usable) > 1:
            count = len(pools)
            turn = self._turn = (self._turn + 1) % count
            usable.sort(key=lambda p: (bool(tried & p.bit), p.outstanding, (p.index - turn) % count))
            affinity = pending.affinity
            if affinity is not None:
                home = max(usable, key=lambda p: hash((affinity, p.index)))
                if home is not usable[0] and not tried & home.bit and home.outstanding < _share(usable):
                    usable.remove(home)
                    usable.insert(0, home)
        return usable

    def _wait(self, pending: _Pending[object], front: bool) -> None:
        waiting = self.wait_queue
        if len(waiting) >= self._queue_limit or not any(p.open or p.connecting for p in self._pools):
            # Nothing will free (no connection may be opened at all), or the queue is full.
            self.fail(pending, HTTPError(503, "metadata proxy busy"))
            return
        loop = self._loop or asyncio.get_running_loop()
        pending.queued = loop.time()
        if front:
            waiting.appendleft(pending)
        else:
            waiting.append(pending)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def waited(self, pending: _Pending[object], now: float) -> None:
        if self._metrics is not None:
            self._metrics.queue_wait.observe(max(0.0, now - pending.queued))

    def pump(self) -> None:
        """Send waiting requests where there is room now (a connection closed, a pool
        came back)."""
        waiting = self.wait_queue
        if not waiting or self._closing:
            return
        now = (self._loop or asyncio.get_running_loop()).time()
        while waiting:
            head = waiting[0]
            if head.done:
                waiting.popleft()
                continue
            if not any(pool.send(head) for pool in self._candidates(head, False)):
                return
            waiting.popleft()
            self.waited(head, now)

    # -- called by connections and pools -----------------------------------------------------
    def freed(self, conn: _Conn) -> None:
        """``conn`` answered everything it carried: the first waiting request takes
        it, else it is pooled."""
        waiting = self.wait_queue
        while waiting and waiting[0].done:
            waiting.popleft()
        if waiting and not self._closing:
            conn._pool.take(conn, waiting, (self._loop or asyncio.get_running_loop()).time())
        elif conn.reusable:
            conn._pool.idle.append(conn)

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

    def lost(self, pending: _Pending[object], *, sent: bool, partial: bool, suspect: bool) -> None:
        """The connection carrying ``pending`` closed before its whole reply came;
        ``sent``: it had been written to that connection."""
        if pending.done:
            return
        closed = HTTPError(502, "metadata server closed the connection")
        if (sent and (partial or not pending.idempotent)) or pending.resends >= MAX_RESENDS:
            self.fail(pending, closed)
            return
        pending.resends += 1
        pending.fresh = True  # not on another keep-alive connection that may be stale
        # A suspect goes to another node or nowhere; the others prefer another node.
        if self._dispatch(pending, untried=suspect and sent, front=True):
            if self._metrics is not None:
                self._metrics.retries.inc(_LOST)
        else:
            self.fail(pending, closed)

    def unreachable(self, pool: _Pool, conn: _Conn, exc: BaseException) -> None:
        """A connection to ``pool`` could not be opened: none of its requests was sent."""
        pool.mark_down(f"cannot connect: {exc}")
        error = HTTPError(502, f"metadata server unreachable at {pool.spec}: {exc}")
        while conn.pending:
            pending = conn.pending.popleft()
            pool.outstanding -= 1
            if pending.done:
                continue
            if self._dispatch(pending, untried=True, front=True):
                if self._metrics is not None:
                    self._metrics.retries.inc(_CONNECT)
            else:
                self.fail(pending, error)
        self.pump()

    # -- deadlines -------------------------------------------------------------------------
    @property
    def _sweep_every(self) -> float:
        # A reply is declared late at most a tenth of the timeout after its deadline.
        return max(0.05, self._timeout / 10)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = False
        for pool in self._pools:
            for conn in list(pool.open):
                for pending in list(conn.pending):
                    if pending.done:
                        continue
                    if pending.deadline <= now:
                        self._timeout_on(pending, conn)
                    else:
                        busy = True
            busy = busy or pool.connecting > 0
        waiting = self.wait_queue
        if waiting:
            late = [p for p in waiting if not p.done and p.deadline <= now]
            for pending in late:
                self.waited(pending, now)
                self.fail(pending, HTTPError(504, "no connection to the metadata server freed in time"))
            if late:
                kept = [p for p in waiting if not p.done]
                waiting.clear()
                waiting.extend(kept)
            busy = busy or bool(waiting)
        if busy:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def _timeout_on(self, pending: _Pending[object], conn: _Conn) -> None:
        self.fail(pending, HTTPError(504, "metadata server did not answer in time"))
        # The connection would deliver the late reply to the next request in line: it
        # is closed rather than reused, and what waits behind goes elsewhere. A late
        # request further back stays in line; its reply is read and dropped.
        if conn.pending and conn.pending[0] is pending:
            conn._close()

    # -- health ----------------------------------------------------------------------------
    def start_checks(self, interval: float = CHECK_INTERVAL) -> None:
        """Look at every upstream's health each ``interval`` seconds from now on (see
        the module's docstring); until :meth:`close`."""
        if self._checker is None:
            self._checker = asyncio.get_running_loop().create_task(self._check(interval))

    async def _check(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            for pool in self._pools:
                if pool.probing:
                    continue
                if pool.up and pool.replies != pool.looked_at:
                    pool.looked_at = pool.replies  # it answered since the last look
                    continue
                pool.probing = True
                task = loop.create_task(self._probe(pool))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, pool: _Pool) -> None:
        spec = pool.spec
        writer: asyncio.StreamWriter | None = None
        try:
            if spec.unix_path is not None:
                opening = asyncio.open_unix_connection(str(spec.unix_path))
            else:
                opening = asyncio.open_connection(spec.host, spec.port)
            reader, opened = await asyncio.wait_for(opening, spec.connect_timeout)
            writer = opened
            opened.write(PROBE)
            line = await asyncio.wait_for(reader.readline(), spec.reply_timeout)
        except TimeoutError:
            pool.mark_down("no answer to the health check in time")
            return
        except (OSError, ValueError) as exc:  # ValueError: a line past the stream's limit
            pool.mark_down(f"health check: {exc}")
            return
        finally:
            pool.probing = False
            if writer is not None:
                writer.close()
        if _STATUS_LINE_RE.fullmatch(line.rstrip(b"\r\n")) is None:
            pool.mark_down("health check: no HTTP reply" if not line else "health check: not an HTTP reply")
            return
        pool.looked_at = pool.replies
        pool.mark_up()
        self.pump()

    # -- state -----------------------------------------------------------------------------
    def states(self) -> list[tuple[str, bool]]:
        """Each upstream's address and whether it is marked up, in the order given."""
        return [(pool.name, pool.up) for pool in self._pools]

    def loads(self) -> list[tuple[str, int, int]]:
        """Each upstream's address, the replies read from it ever, and its requests
        outstanding now: how the guests spread over the nodes."""
        return [(pool.name, pool.replies, pool.outstanding) for pool in self._pools]

    def waiting(self) -> int:
        """Requests waiting for a connection now."""
        return sum(1 for pending in self.wait_queue if not pending.done)

    @property
    def open_connections(self) -> int:
        return sum(len(pool.open) for pool in self._pools)

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        tasks = [*self._probes, *([self._checker] if self._checker is not None else [])]
        self._checker = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stopping = HTTPError(503, "metadata proxy stopping")
        while self.wait_queue:
            self.fail(self.wait_queue.popleft(), stopping)
        for pool in self._pools:
            for conn in list(pool.open):
                conn._close()
            pool.idle.clear()


_LOST = ("lost",)
_CONNECT = ("connect",)


def _share(pools: Sequence[_Pool]) -> float:
    """How many requests outstanding a caller's pool may have and still take the
    caller's next one (bounded loads: Mirrokni, Thorup and Zadimoghaddam, 2018)."""
    mean = (sum(p.outstanding for p in pools) + 1) / len(pools)
    return max(float(PIPELINE_DEPTH), AFFINITY_BALANCE * mean)


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
