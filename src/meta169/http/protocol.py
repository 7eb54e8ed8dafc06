"""A small, strict HTTP/1.1 server protocol on asyncio and httptools.

Owns framing only: parsing requests within :class:`Limits`, keep-alive, pipelining
order, timeouts, and writing replies. It knows nothing about metadata or proxying:
a ``Handler`` turns a :class:`Request` into a :class:`Response`, a ``(head, body)``
pair, a :class:`Later` (a reply another protocol hands over) or an awaitable of one.
Requests are parsed by httptools alone; a compiled ``FastHook`` (``http.wire``) may
answer or prepare a request before that.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from meta169.errors import HTTPError
from meta169.http.limits import Limits
from meta169.http.message import Fast, Request, Response, date_line, encode_response, error_response
from meta169.http.stamp import IDENTITY_PREFIX

log = logging.getLogger("meta169.http")


Handler = Callable[[Request], "Response | Fast | Later | Awaitable[Response | Fast]"]


class Later:
    """A reply another protocol will hand over (the proxy's upstream connection):
    by a direct call when it arrives, with no future, task or loop round trip.
    ``deliver`` or ``fail`` is called once, possibly before the connection binds."""

    __slots__ = ("_outcome", "_request", "_target")

    def __init__(self) -> None:
        self._target: HTTPProtocol | None = None
        self._request: Request | None = None
        self._outcome: Response | Fast | bytes | BaseException | None = None

    def deliver(self, value: Response | Fast | bytes) -> None:
        """``bytes`` are a complete reply to relay as it is (the proxy's upstream's)."""
        self._settle(value)

    def fail(self, error: BaseException) -> None:
        self._settle(error)

    def _settle(self, outcome: Response | Fast | bytes | BaseException) -> None:
        target, req = self._target, self._request
        if target is None or req is None:
            self._outcome = outcome
            return
        self._target = self._request = None
        target._settled(req, outcome)

    def _bind(self, target: HTTPProtocol, req: Request) -> None:
        outcome = self._outcome
        if outcome is not None:
            self._outcome = None
            target._settled(req, outcome)
            return
        self._target = target
        self._request = req


# A compiled first look at a connection's data (http.wire): the finished replies and
# whether to keep the connection, the same with the offset where the usual parsing
# goes on (pipelined requests it does not answer), a Request already prepared for
# the handler, or None to parse as usual.
FastHook = Callable[[bytes, str], "tuple[bytes, bool] | tuple[bytes, bool, int] | Request | None"]


class ConnectionTracker:
    """Counts open connections, in total and per client address."""

    __slots__ = ("per_ip", "total")

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, peer: str, limits: Limits) -> bool:
        count = self.per_ip.get(peer, 0)
        if self.total >= limits.max_connections:
            return False
        # A Unix socket has no peer address: the proxy's connections carry many
        # guests, whose fairness is the per-instance rate limit's job.
        if peer and count >= limits.max_connections_per_ip:
            return False
        self.total += 1
        self.per_ip[peer] = count + 1
        return True

    def release(self, peer: str) -> None:
        self.total -= 1
        count = self.per_ip.get(peer, 1) - 1
        if count:
            self.per_ip[peer] = count
        else:
            self.per_ip.pop(peer, None)


class _Reject(Exception):
    """Internal: stop parsing and answer with this status, then close."""

    def __init__(self, status: int) -> None:
        self.status = status


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH")}
_HEADER_NAMES: dict[bytes, str] = {}


def _header_name(raw: bytes) -> str:
    name = raw.decode("latin-1").lower()
    if len(_HEADER_NAMES) < 1024:  # common names only; a flood of odd ones is not cached
        _HEADER_NAMES[raw] = name
    return name


class HTTPProtocol(asyncio.Protocol):
    """One connection. Requests are answered strictly in arrival order.

    Timeouts are checked by the server's :class:`Ticker` instead of a clock read per
    request: the hot path only bumps a counter, the tick compares it.
    """

    __slots__ = (
        "_begun",
        "_begun_at",
        "_body",
        "_body_bytes",
        "_busy",
        "_cur_headers",
        "_fast",
        "_handler",
        "_header_bytes",
        "_identity",
        "_idle_since",
        "_limits",
        "_loop",
        "_parser",
        "_paused",
        "_peer_key",
        "_progress",
        "_queue",
        "_seen_progress",
        "_ticker",
        "_tracked",
        "_tracker",
        "_transport",
        "_url",
        "_url_bytes",
    )

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        tracker: ConnectionTracker | None = None,
        fast: FastHook | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        ticker: Ticker | None = None,
    ) -> None:
        self._handler = handler
        self._tracker = tracker
        self._tracked = False
        self._limits = limits
        # The compiled answer for repeated document requests (http.wire), if any.
        self._fast = fast
        # Given by the server: asking asyncio costs a getpid() per call on Python 3.11.
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        # Made on the first request the fast paths decline; most connections need none.
        self._parser: httptools.HttpRequestParser | None = None
        self._transport: asyncio.Transport | None = None
        self._peer_key = ""
        self._queue: deque[Request] | None = None  # made when a request first waits
        self._busy = False
        self._paused = False  # reading paused while pipelined requests wait
        # Shared by the server's connections; a connection made without one (an
        # ad-hoc server) gets its own.
        self._ticker = ticker
        self._progress = 0  # bumped by every completed request
        self._seen_progress = 0
        self._idle_since = 0.0  # loop time of the last activity seen (set on connect)
        self._begun_at = 0.0  # loop time a request in the httptools path started
        self._begun = False  # a request has started and not completed
        # The httptools path's per-request state is set by on_message_begin.

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            # inet_ntop's text is canonical; the zone of a link-local peer is dropped.
            host = peer[0]
            self._peer_key = host.partition("%")[0] if "%" in host else host
        if self._tracker is not None:
            if not self._tracker.admit(self._peer_key, self._limits):
                log.warning("refusing connection from %s: connection limit reached", self._peer_key or "unix socket")
                self._fail(503)
                return
            self._tracked = True
        if self._ticker is None:
            self._ticker = Ticker(self._loop, self._limits)
        self._idle_since = self._loop.time()
        self._ticker.join(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        # The parser holds this protocol as its callback target: break the cycle so
        # the connection is freed by reference counting, not by the cyclic GC.
        self._parser = None
        if self._tracked and self._tracker is not None:
            self._tracked = False
            self._tracker.release(self._peer_key)
        if self._ticker is not None:
            self._ticker.leave(self)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        fast = self._fast
        while fast is not None and not (self._begun or self._busy or self._queue):
            reply = fast(data, self._peer_key)
            if reply is not None:
                self._progress += 1
                if isinstance(reply, Request):
                    self._dispatch(reply)
                    return
                if len(reply) == 2:
                    if reply[1]:
                        transport.write(reply[0])
                    else:
                        self._write_last(transport, reply[0])
                    return
                # Answered the first of pipelined requests; the rest goes on below.
                transport.write(reply[0])
                data = data[reply[2] :]
            # The next request is the Python path's. A trusted proxy pipelines what
            # reached it together, so in a boot storm most batches hold one caller
            # not yet cached among callers that are: parse that request alone, and
            # once it is answered (the parser back between messages, nothing
            # pending) the fast path takes what follows it. Where the head ends may
            # not be where the request ends (a body); then the parser is still
            # inside that request, _begun holds, and it parses the rest.
            end = data.find(b"\r\n\r\n") + 4
            if end < 4 or end >= len(data):
                break
            if not self._feed(data[:end]):
                return
            data = data[end:]
            transport = self._transport
            if transport is None:
                return
        self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; False when it failed the connection."""
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
            return True
        except _Reject as rej:
            self._fail(rej.status)
        except httptools.HttpParserUpgrade:
            self._fail(400)
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in callbacks; unwrap our own.
            cause = exc.__cause__ or exc.__context__
            self._fail(cause.status if isinstance(cause, _Reject) else 400)
        return False

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._begun = True
        self._begun_at = self._loop.time()
        self._url = b""
        self._url_bytes = 0
        self._header_bytes = 0
        self._cur_headers: dict[str, str] = {}
        self._identity = False
        self._body: list[bytes] = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self._limits.max_url_bytes:
            raise _Reject(414)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        headers = self._cur_headers
        limits = self._limits
        if size > limits.max_header_bytes or len(headers) >= limits.max_headers:
            raise _Reject(431)
        key = _HEADER_NAMES.get(name) or _header_name(name)
        if key.startswith(IDENTITY_PREFIX):
            self._identity = True
        # httptools drops leading whitespace only; RFC 9110 5.5 excludes trailing too.
        text = value.decode("latin-1").rstrip(" \t")
        if key in headers:
            # Duplicate identity or token headers are a smuggling vector; keep them
            # visible as one comma-joined value so handlers can refuse them.
            headers[key] = headers[key] + "," + text
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        length = self._cur_headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise _Reject(400) from None
            if declared > self._limits.max_body_bytes:
                raise _Reject(413)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Reject(413)

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        raw_method = parser.get_method()
        body = b""
        if self._body:
            body = b"".join(self._body)
        req = Request(
            _METHODS.get(raw_method) or raw_method.decode("ascii", "replace"),
            self._url,
            self._cur_headers,
            body,
            self._peer_key,
            parser.should_keep_alive(),
            self._identity,
        )
        self._begun = False
        self._progress += 1
        if self._busy or self._queue:
            queue = self._queue
            if queue is None:
                queue = self._queue = deque()
            if len(queue) >= self._limits.max_pipelined:
                raise _Reject(503)
            queue.append(req)
            # Backpressure only once a request waits behind another: a client that
            # asks one thing at a time costs no pause/resume per request.
            if not self._paused and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()
            return
        self._dispatch(req)

    # -- dispatch --------------------------------------------------------------------------
    def _dispatch(self, req: Request) -> bool:
        """Answer ``req``; False when the answer is pending (the connection waits)."""
        try:
            result = self._handler(req)
        except Exception:
            log.exception("handler failed for %s %r", req.method, req.raw_path)
            result = error_response(500)
        if type(result) is tuple:
            self._write_fast(req, result)
            return True
        if isinstance(result, Response):
            self._write(req, result)
            return True
        self._busy = True
        if type(result) is Later:
            result._bind(self, req)
            return not self._busy
        if isinstance(result, asyncio.Future):
            # A plain future (the proxy's upstream reply): a callback, not a task.
            result.add_done_callback(lambda fut: self._resolved(req, fut))
            return False
        task = self._loop.create_task(self._await(req, cast(Awaitable[Response | Fast], result)))
        task.add_done_callback(_consume_exception)
        return False

    def _drain(self) -> None:
        queue = self._queue
        while queue and self._transport is not None and not self._busy:
            if not self._dispatch(queue.popleft()):
                return

    async def _await(self, req: Request, pending: Awaitable[Response | Fast]) -> None:
        try:
            resp = await pending
        except Exception:
            log.exception("handler failed for %s %r", req.method, req.raw_path)
            resp = error_response(500)
        self._finish(req, resp)

    def _resolved(self, req: Request, fut: asyncio.Future[Response | Fast]) -> None:
        if fut.cancelled():
            self._finish(req, error_response(503))
            return
        error = fut.exception()
        self._settled(req, error if error is not None else fut.result())

    def _settled(self, req: Request, outcome: Response | Fast | bytes | BaseException) -> None:
        if isinstance(outcome, HTTPError):
            log.warning("%s %r from %s: %s", req.method, req.raw_path, req.peer, outcome)
            outcome = error_response(outcome.status, "metadata service unavailable")
        elif isinstance(outcome, BaseException):
            log.error("handler failed for %s %r", req.method, req.raw_path, exc_info=outcome)
            outcome = error_response(500)
        self._finish(req, outcome)

    def _finish(self, req: Request, resp: Response | Fast | bytes) -> None:
        """Write a reply that was pending, then go on with the pipeline."""
        self._busy = False
        if self._transport is None:
            return
        if isinstance(resp, bytes):
            self._relay(req, resp, keep=req.keep_alive)
        elif isinstance(resp, tuple):
            self._write_fast(req, resp)
        else:
            self._write(req, resp)
        if self._transport is not None:
            self._drain()
            if self._paused and not self._queue and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()

    def _write_fast(self, req: Request, reply: Fast) -> None:
        transport = self._transport
        if transport is None:
            return
        head, body = reply
        if req.method == "HEAD":
            body = b""
        if req.keep_alive:
            transport.write(b"".join((head, date_line(), b"\r\n", body)))
        else:
            self._write_last(transport, head, date_line(), b"Connection: close\r\n\r\n", body)

    def _relay(self, req: Request, raw: bytes, *, keep: bool) -> None:
        transport = self._transport
        assert transport is not None
        if keep:
            transport.write(raw)
            return
        # A relayed reply on a connection we are about to close says so (RFC 9112 9.6).
        end = raw.find(b"\r\n\r\n")
        self._write_last(transport, raw[:end], b"\r\nConnection: close", memoryview(raw)[end:])

    def _write_last(self, transport: asyncio.Transport, *parts: bytes | memoryview) -> None:
        """Write the connection's last reply and close it, this side first (_cork)."""
        _cork(transport)
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)
        transport.close()
        self._transport = None

    def _write(self, req: Request, resp: Response) -> None:
        transport = self._transport
        if transport is None:
            return
        if resp.ip_ttl is not None:
            self._set_ttl(transport, resp.ip_ttl)
        if resp.raw is not None:
            self._relay(req, resp.raw, keep=req.keep_alive and not resp.close)
            return
        if req.method == "HEAD":
            resp.head = True
        keep = req.keep_alive and not resp.close
        if keep:
            transport.write(encode_response(resp, keep_alive=True))
        else:
            self._write_last(transport, encode_response(resp, keep_alive=False))

    def _set_ttl(self, transport: asyncio.Transport, ttl: int) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
                # An IPv4 client on a dual-stack socket is governed by IP_TTL.
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            elif sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        except OSError as exc:  # Unix sockets have no TTL; the proxy applies it.
            log.debug("cannot set TTL on %s: %s", sock.family, exc)

    def _fail(self, status: int) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(encode_response(error_response(status, close=True), keep_alive=False))
        transport.close()
        self._transport = None

    # -- shutdown --------------------------------------------------------------------------
    def close_if_idle(self) -> bool:
        """Close the connection unless a request is being read, answered or waits
        (a server draining at shutdown); True when it is closed."""
        transport = self._transport
        if transport is None:
            return True
        if self._busy or self._begun or self._queue:
            return False
        transport.close()
        self._transport = None
        return True

    def abort(self) -> None:
        transport = self._transport
        if transport is not None:
            self._transport = None
            transport.abort()

    # -- timeouts --------------------------------------------------------------------------
    def _on_tick(self, now: float) -> None:
        """Timeouts, measured from loop times recorded at or before the event, so
        they never fire early (and at most about one tick late)."""
        transport = self._transport
        if transport is None:
            return
        limits = self._limits
        if self._busy:
            self._idle_since = now
        elif self._begun:
            # Slowloris: a request started and has not completed in time -> 408.
            if now - self._begun_at >= limits.request_timeout:
                self._fail(408)
        elif self._progress != self._seen_progress:
            self._seen_progress = self._progress
            self._idle_since = now
        elif now - self._idle_since >= limits.keepalive_timeout:
            transport.close()
            self._transport = None


class Ticker:
    """One timer for the timeouts of every open connection of a server, instead of a
    timer per connection (whose creation and cancellation cost as much as the rest
    of a short connection's Python work). Timeouts are checked every ``tick`` (a
    quarter of the shorter timeout): never before they are due, at most about a
    tick after. The timer runs while connections are open and lapses one tick after
    the last."""

    __slots__ = ("_closed", "_conns", "_handle", "_loop", "tick")

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self._loop = loop
        self.tick = max(0.05, min(limits.request_timeout, limits.keepalive_timeout) / 4)
        self._conns: set[HTTPProtocol] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._closed = False

    def join(self, conn: HTTPProtocol) -> None:
        self._conns.add(conn)
        if self._handle is None and not self._closed:
            self._handle = self._loop.call_later(self.tick, self._run)

    def leave(self, conn: HTTPProtocol) -> None:
        self._conns.discard(conn)

    @property
    def open(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def close_idle(self) -> int:
        """Close every connection with no request in progress; the number left open."""
        return sum(1 for conn in list(self._conns) if not conn.close_if_idle())

    def abort_all(self) -> int:
        """Drop every connection still open; how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def close(self) -> None:
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self._handle = None
        now = self._loop.time()
        for conn in list(self._conns):
            conn._on_tick(now)
        if self._conns and not self._closed:
            self._handle = self._loop.call_later(self.tick, self._run)


def _cork(transport: asyncio.Transport) -> None:
    """Hold the last reply of a connection until close() so it leaves with the FIN.

    Then this side is the first to close and keeps the TIME_WAIT state; when the
    client closes first, every connection parks an ephemeral port of the guest in
    TIME_WAIT for a minute, and a guest (or a benchmark) that opens connections fast
    runs out of ports and stalls in connect(). ``write_eof()`` is no substitute:
    uvloop's shutdown waits for the next loop iteration, and a guest on a veth pair
    closes first (measured: the proxy fell from 15k to 0.3k requests per second).
    """
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except OSError as exc:
        log.debug("cannot cork: %s", exc)


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("connection task failed", exc_info=task.exception())
