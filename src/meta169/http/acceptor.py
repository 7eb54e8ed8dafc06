"""Listening sockets that accept every waiting connection per wake-up.

uvloop's servers accept one connection per loop iteration: libuv (1.45 and later)
calls accept() once per readiness event, so that processes sharing a socket take
turns. When every request comes on a new connection (Neutron's haproxy, curl in a
boot script, wrk in ``bench/``), the loop then turns once per request, and each
request pays a whole iteration alone: nothing arrives together, so nothing can be
answered or forwarded together. A :class:`Listener` accepts up to ``burst`` waiting
connections per wake-up, as asyncio's own selector loop does, and hands each to
the running loop as an accepted socket (docs/benchmarks.md, finding 13).

The proxy listens with it: what it accepts together it forwards together (one
pipelined write to serve, see proxy.upstream). serve keeps uvloop's own server,
whose accept in C costs less per connection when nothing is forwarded
(docs/benchmarks.md, finding 14).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("meta169.accept")

# Out of descriptors or memory: accepting again at once would spin; asyncio waits 1 s.
_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
RETRY_DELAY = 0.5


class Listener:
    """Serves ``sock`` (a bound, listening TCP or Unix socket) on ``loop``, making a
    protocol with ``factory`` for every connection. The loop owns the connections;
    ``close()`` stops accepting and closes the listening socket only."""

    __slots__ = ("_burst", "_factory", "_fd", "_loop", "_paused", "_sock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        *,
        burst: int = 64,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        sock.setblocking(False)
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._factory = factory
        self._burst = burst
        self._paused = False
        loop.add_reader(self._fd, self._ready)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock is not None else ()

    def is_serving(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if not self._paused:
            self._loop.remove_reader(self._fd)
        sock.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for: close() is immediate (the connections live on)."""

    def _ready(self) -> None:
        sock = self._sock
        for _ in range(self._burst):
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while waiting; the next one may not have
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.warning("cannot accept on %s: %s; pausing for %.1f s", _where(sock), exc, RETRY_DELAY)
                    self._pause()
                else:
                    log.error("cannot accept on %s: %s", _where(sock), exc)
                return
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        try:
            _step(self._loop.connect_accepted_socket(self._factory, conn))
        except Exception as exc:  # the socket is unusable or the protocol failed to start
            log.warning("dropping an accepted connection: %s", exc)
            conn.close()

    def _pause(self) -> None:
        self._paused = True
        self._loop.remove_reader(self._fd)
        self._loop.call_later(RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if self._sock is not None:
            self._loop.add_reader(self._fd, self._ready)


def _where(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "a closed socket"
    return str(name) if not isinstance(name, tuple) else f"{name[0]}:{name[1]}"


def _step(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` without a Task: it waits for one future at most (the transport's
    start), so a done-callback finishes it. A Task per connection costs about as much
    as the rest of accepting it."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return
    waiting.add_done_callback(lambda _: _finish(coro))


def _finish(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        waiting = coro.send(None)
    except StopIteration:
        return
    except Exception as exc:  # the transport failed to start; the loop closed it
        log.debug("accepted connection did not start: %s", exc)
        return
    # Awaiting a second future would be a different connect_accepted_socket.
    coro.close()
    log.error("connect_accepted_socket waited twice (for %r); connection dropped", waiting)
