"""A small, strict HTTP/1.1 server protocol on asyncio and httptools.

Owns framing only: parsing requests within limits, keep-alive, pipelining order,
timeouts, and writing responses. It knows nothing about metadata; a ``Handler``
turns a :class:`Request` into a :class:`Response` (or an awaitable of one).

Limits follow what a metadata client needs (cloud-init and the SDKs send a few
hundred bytes of headers and at most a 1020-byte password body), so anything far
beyond that is refused early instead of buffered.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

from meta169.model import IPAddress

log = logging.getLogger("meta169.http")


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 8192
    max_headers: int = 64
    max_url_bytes: int = 2048
    max_body_bytes: int = 16384
    # A client must finish sending a request within this many seconds once it
    # started (slowloris), and an idle keep-alive connection is closed after idle.
    request_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    max_pipelined: int = 32
    # Open connections per process and per client address; beyond them a new
    # connection is answered 503 and closed, so one guest cannot exhaust the server.
    max_connections: int = 8192
    max_connections_per_ip: int = 64


@dataclass(slots=True)
class Request:
    method: str
    raw_path: bytes
    headers: dict[str, str]
    body: bytes
    peer: IPAddress | None
    http_version: str = "1.1"
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    # When set, the connection's IP TTL / hop limit is lowered to this before the
    # reply is written (IMDSv2 token replies, EC2 user guide "hop limit").
    ip_ttl: int | None = None
    head: bool = field(default=False)
    # A complete HTTP/1.1 message relayed verbatim (the proxy's upstream reply).
    raw: bytes | None = None


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class ConnectionTracker:
    """Counts open connections, in total and per client address."""

    __slots__ = ("per_ip", "total")

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[IPAddress | None, int] = {}

    def admit(self, peer: IPAddress | None, limits: Limits) -> bool:
        count = self.per_ip.get(peer, 0)
        if self.total >= limits.max_connections or count >= limits.max_connections_per_ip:
            return False
        self.total += 1
        self.per_ip[peer] = count + 1
        return True

    def release(self, peer: IPAddress | None) -> None:
        self.total -= 1
        count = self.per_ip.get(peer, 1) - 1
        if count:
            self.per_ip[peer] = count
        else:
            self.per_ip.pop(peer, None)

_REASONS = {s.value: s.phrase for s in HTTPStatus}
# [second, header line]: the Date header changes once a second, not per request.
_date_cache: list[object] = [0, b""]


def _date_header() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
    line = _date_cache[1]
    assert isinstance(line, bytes)
    return line


def encode_response(resp: Response, *, keep_alive: bool) -> bytes:
    reason = _REASONS.get(resp.status, "Unknown")
    head = [
        f"HTTP/1.1 {resp.status} {reason}\r\n".encode(),
        b"Server: meta169\r\n",
        _date_header(),
        f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n".encode(),
    ]
    for name, value in resp.headers:
        head.append(f"{name}: {value}\r\n".encode("latin-1"))
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    if not resp.head:
        head.append(resp.body)
    return b"".join(head)


def error_response(
    status: int, message: str = "", *, close: bool = False, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    text = message or _REASONS.get(status, "Error")
    return Response(status, (text + "\n").encode(), close=close, headers=headers)


class _Reject(Exception):
    """Internal: stop parsing and answer with this status, then close."""

    def __init__(self, status: int) -> None:
        self.status = status


class HTTPProtocol(asyncio.Protocol):
    """One connection. Requests are answered strictly in arrival order."""

    __slots__ = (
        "_body",
        "_busy",
        "_cur_headers",
        "_deadline",
        "_handler",
        "_header_bytes",
        "_header_name",
        "_limits",
        "_loop",
        "_parser",
        "_peer",
        "_queue",
        "_timer",
        "_tracked",
        "_tracker",
        "_transport",
        "_ttl_set",
        "_url",
        "_url_bytes",
    )

    def __init__(self, handler: Handler, limits: Limits, tracker: ConnectionTracker | None = None) -> None:
        self._handler = handler
        self._tracker = tracker
        self._tracked = False
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer: IPAddress | None = None
        self._queue: deque[Request] = deque()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._ttl_set = False
        self._deadline = 0.0
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._url_bytes = 0
        self._header_bytes = 0
        self._cur_headers: dict[str, str] = {}
        self._header_name = b""
        self._body: list[bytes] = []

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            try:
                self._peer = ipaddress.ip_address(peer[0].split("%", 1)[0])
            except ValueError:
                self._peer = None
        if self._tracker is not None:
            if not self._tracker.admit(self._peer, self._limits):
                log.warning("refusing connection from %s: connection limit reached", self._peer)
                self._fail(503)
                return
            self._tracked = True
        self._arm(self._limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._tracked and self._tracker is not None:
            self._tracked = False
            self._tracker.release(self._peer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except _Reject as rej:
            self._fail(rej.status)
        except httptools.HttpParserUpgrade:
            self._fail(400)
        except httptools.HttpParserError as exc:
            # httptools wraps exceptions raised in callbacks; unwrap our own.
            cause = exc.__cause__ or exc.__context__
            self._fail(cause.status if isinstance(cause, _Reject) else 400)

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset_message()
        self._arm(self._limits.request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self._limits.max_url_bytes:
            raise _Reject(414)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes or len(self._cur_headers) >= self._limits.max_headers:
            raise _Reject(431)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in self._cur_headers:
            # Duplicate identity or token headers are a smuggling vector; keep them
            # visible as one comma-joined value so handlers can refuse them.
            self._cur_headers[key] = self._cur_headers[key] + "," + text
        else:
            self._cur_headers[key] = text

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
        if sum(map(len, self._body)) > self._limits.max_body_bytes:
            raise _Reject(413)

    def on_message_complete(self) -> None:
        parser = self._parser
        req = Request(
            method=parser.get_method().decode("ascii", "replace"),
            raw_path=self._url,
            headers=self._cur_headers,
            body=b"".join(self._body),
            peer=self._peer,
            http_version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
        )
        self._reset_message()
        if len(self._queue) >= self._limits.max_pipelined:
            raise _Reject(503)
        self._queue.append(req)
        self._arm(self._limits.keepalive_timeout)
        if not self._busy:
            self._drain()

    # -- dispatch --------------------------------------------------------------------------
    def _drain(self) -> None:
        while self._queue and self._transport is not None:
            req = self._queue.popleft()
            try:
                result = self._handler(req)
            except Exception:
                log.exception("handler failed for %s %r", req.method, req.raw_path)
                result = error_response(500)
            if isinstance(result, Response):
                self._write(req, result)
                continue
            self._busy = True
            self._transport.pause_reading()
            task = self._loop.create_task(self._await(req, result))
            task.add_done_callback(_consume_exception)
            return

    async def _await(self, req: Request, pending: Awaitable[Response]) -> None:
        try:
            resp = await pending
        except Exception:
            log.exception("handler failed for %s %r", req.method, req.raw_path)
            resp = error_response(500)
        self._busy = False
        if self._transport is None:
            return
        self._write(req, resp)
        if self._transport is not None:
            self._transport.resume_reading()
            self._drain()

    def _write(self, req: Request, resp: Response) -> None:
        transport = self._transport
        if transport is None:
            return
        if req.method == "HEAD":
            resp.head = True
        keep = req.keep_alive and not resp.close
        if resp.ip_ttl is not None:
            self._set_ttl(transport, resp.ip_ttl)
        transport.write(resp.raw if resp.raw is not None else encode_response(resp, keep_alive=keep))
        if not keep:
            transport.close()
            self._transport = None

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

    # -- timeouts --------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        # One timer per connection, re-armed lazily: we record a deadline and only
        # reschedule when the old timer fires early, so the hot path never cancels.
        self._deadline = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        if self._busy:
            self._arm(self._limits.request_timeout)
            return
        # A request half-sent at the deadline gets 408; an idle keep-alive just closes.
        if self._url_bytes or self._header_bytes:
            self._fail(408)
        else:
            self._transport.close()
            self._transport = None


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("connection task failed", exc_info=task.exception())
