"""The proxy's upstream pool pipelines GETs that reach it together: they share one
connection and one write, replies come back in order, and every way a connection
can fail still gives each request exactly one answer. A scripted Unix-socket server
plays serve, so each failure is exact."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from meta169.errors import HTTPError
from meta169.proxy.upstream import PIPELINE_DEPTH, Reply, Upstream, UpstreamSpec

Script = Callable[[int, int, bytes], Awaitable[bytes | None]]  # (connection, request index, request) -> reply


def _reply(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _get(n: int) -> bytes:
    return f"GET /r/{n} HTTP/1.1\r\nhost: metadata\r\n\r\n".encode()


class FakeServe:
    """Reads requests, answers each with whatever ``script`` returns (None: hang up)."""

    def __init__(self, path: Path, script: Script, *, piece: int = 0) -> None:
        self.path = path
        self.script = script
        self.piece = piece  # write replies this many bytes at a time (0: whole)
        self.connections = 0
        self.reads: list[tuple[int, bytes]] = []  # (connection, bytes of one read)
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeServe:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        buf = b""
        index = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                self.reads.append((conn, data))
                buf += data
                while b"\r\n\r\n" in buf:
                    request, _, buf = buf.partition(b"\r\n\r\n")
                    reply = await self.script(conn, index, request)
                    index += 1
                    if reply is None:
                        return
                    step = self.piece or len(reply) or 1
                    for at in range(0, len(reply), step):
                        writer.write(reply[at : at + step])
                        await writer.drain()
                        if self.piece:
                            await asyncio.sleep(0.001)
        finally:
            writer.close()


class Sink:
    def __init__(self) -> None:
        self.outcome: asyncio.Future[Reply | BaseException] = asyncio.get_running_loop().create_future()

    def deliver(self, value: Reply) -> None:
        assert not self.outcome.done(), "answered twice"
        self.outcome.set_result(value)

    def fail(self, error: BaseException) -> None:
        assert not self.outcome.done(), "answered twice"
        self.outcome.set_result(error)


def _send_together(upstream: Upstream, count: int, *, pipeline: bool = True, first: int = 0) -> list[Sink]:
    """Issue ``count`` requests from one callback, as requests read in one loop
    iteration are."""
    sinks = [Sink() for _ in range(count)]
    for i, sink in enumerate(sinks):
        upstream.request(_get(first + i), lambda r: r, sink, pipeline=pipeline)
    return sinks


async def _outcomes(sinks: list[Sink]) -> list[Reply | BaseException]:
    return list(await asyncio.wait_for(asyncio.gather(*(s.outcome for s in sinks)), 5))


def _bodies(outcomes: list[Reply | BaseException]) -> list[bytes | int]:
    """The body of each reply, or the status of each error."""
    out: list[bytes | int] = []
    for o in outcomes:
        if isinstance(o, HTTPError):
            out.append(o.status)
        else:
            assert isinstance(o, Reply), o
            out.append(o.raw.partition(b"\r\n\r\n")[2])
    return out


async def answers(sinks: list[Sink], timeout: float = 10.0) -> list[bytes | int]:
    """The body of each reply, or the status of each error, once every sink has one."""
    return _bodies(await asyncio.wait_for(asyncio.gather(*(s.outcome for s in sinks)), timeout))


def _echo(conn: int, index: int, request: bytes) -> Awaitable[bytes | None]:
    async def answer() -> bytes | None:
        return _reply(request.split(b" ")[1])

    return answer()


def _run(body: Callable[[Path], Awaitable[None]], tmp_path: Path) -> None:
    asyncio.run(body(tmp_path / "serve.sock"))


@contextlib.asynccontextmanager
async def _pool(
    path: Path, script: Script, *, piece: int = 0, timeout: float = 10.0
) -> AsyncIterator[tuple[FakeServe, Upstream]]:
    """A scripted serve and a pool to it that already holds one idle connection (a
    pipeline starts on one; the very first request opens a connection of its own)."""
    async with FakeServe(path, script, piece=piece) as serve:
        upstream = Upstream(UpstreamSpec(unix_path=path, reply_timeout=timeout))
        await _outcomes(_send_together(upstream, 1, first=999))
        try:
            yield serve, upstream
        finally:
            await upstream.close()


def test_upstream_pipelines_requests_sent_together(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        async with _pool(path, _echo) as (serve, upstream):
            sinks = _send_together(upstream, 5)
            assert _bodies(await _outcomes(sinks)) == [f"/r/{i}".encode() for i in range(5)]
            assert serve.connections == 1
            # the five left in one write: serve read them in one go
            assert serve.reads[-1] == (0, b"".join(_get(i) for i in range(5)))

    _run(body, tmp_path)


def test_upstream_pipeline_depth_is_bounded(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        async with _pool(path, _echo) as (serve, upstream):
            count = PIPELINE_DEPTH + 3
            sinks = _send_together(upstream, count)
            assert _bodies(await _outcomes(sinks)) == [f"/r/{i}".encode() for i in range(count)]
            # the idle connection carried a full pipeline; the rest went on a new one
            requests = {conn: b"".join(d for c, d in serve.reads if c == conn).count(b"GET ") for conn in (0, 1)}
            assert requests == {0: 1 + PIPELINE_DEPTH, 1: 3} and serve.connections == 2

    _run(body, tmp_path)


def test_upstream_keeps_non_gets_on_connections_of_their_own(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        async with _pool(path, _echo) as (serve, upstream):
            sinks = _send_together(upstream, 3, pipeline=False)
            assert _bodies(await _outcomes(sinks)) == [b"/r/0", b"/r/1", b"/r/2"]
            assert serve.connections == 3  # the warm one plus two new: never two on one

    _run(body, tmp_path)


def test_upstream_reads_replies_split_anywhere(tmp_path: Path) -> None:
    async def dribble(conn: int, index: int, request: bytes) -> bytes | None:
        return _reply(request.split(b" ")[1] * 50, "X-Meta169-Hop-Limit: 1" if index % 2 else "Server: x")

    async def body(path: Path) -> None:
        async with _pool(path, dribble, piece=7) as (_, upstream):
            sinks = _send_together(upstream, 6)
            outcomes = await _outcomes(sinks)
            assert _bodies(outcomes) == [f"/r/{i}".encode() * 50 for i in range(6)]
            # the Python framing handed over the headers of the unusual ones
            assert [isinstance(o, Reply) and o.headers.get("x-meta169-hop-limit") for o in outcomes] == [
                "1",
                None,
                "1",
                None,
                "1",
                None,
            ]

    _run(body, tmp_path)


@pytest.mark.parametrize("piece", [0, 7], ids=["whole", "in-pieces"])
def test_upstream_retries_what_waited_behind_a_closing_reply(tmp_path: Path, piece: int) -> None:
    async def close_after_first(conn: int, index: int, request: bytes) -> bytes | None:
        # the first pipelined request gets a reply that closes; the rest never get one there
        if conn == 0 and index == 1:
            return _reply(b"last", "Connection: close")
        if conn == 0 and index > 1:
            return None
        return _reply(request.split(b" ")[1])

    async def body(path: Path) -> None:
        async with _pool(path, close_after_first, piece=piece) as (serve, upstream):
            sinks = _send_together(upstream, 4)
            assert _bodies(await _outcomes(sinks)) == [b"last", b"/r/1", b"/r/2", b"/r/3"]
            assert serve.connections >= 2

    _run(body, tmp_path)


def test_upstream_bad_reply_fails_its_request_only(tmp_path: Path) -> None:
    async def garbage_first(conn: int, index: int, request: bytes) -> bytes | None:
        if conn == 0 and index == 1:
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        return _reply(request.split(b" ")[1])

    async def body(path: Path) -> None:
        async with _pool(path, garbage_first) as (_, upstream):
            sinks = _send_together(upstream, 3)
            assert _bodies(await _outcomes(sinks)) == [502, b"/r/1", b"/r/2"]

    _run(body, tmp_path)


def test_upstream_server_vanishing_mid_pipeline(tmp_path: Path) -> None:
    async def die_after_one(conn: int, index: int, request: bytes) -> bytes | None:
        if conn == 0 and index == 2:
            return None  # hangs up with /r/1.. unanswered
        return _reply(request.split(b" ")[1])

    async def body(path: Path) -> None:
        async with _pool(path, die_after_one) as (_, upstream):
            sinks = _send_together(upstream, 4)
            # /r/0 was answered; the others were retried once on a fresh connection
            assert _bodies(await _outcomes(sinks)) == [b"/r/0", b"/r/1", b"/r/2", b"/r/3"]

    _run(body, tmp_path)


def test_upstream_silent_server_times_out_every_request(tmp_path: Path) -> None:
    async def silent(conn: int, index: int, request: bytes) -> bytes | None:
        if index == 0 and conn == 0:
            return _reply(b"warm")
        await asyncio.sleep(30)
        return None

    async def body(path: Path) -> None:
        async with _pool(path, silent, timeout=0.3) as (_, upstream):
            sinks = _send_together(upstream, 3)
            assert _bodies(await _outcomes(sinks)) == [504, 504, 504]

    _run(body, tmp_path)


@pytest.mark.parametrize("pipeline", [True, False])
def test_upstream_stale_keepalive_is_retried(tmp_path: Path, pipeline: bool) -> None:
    async def one_per_connection(conn: int, index: int, request: bytes) -> bytes | None:
        # the first connection answers once, then it is gone (its keep-alive ran out)
        return _reply(request.split(b" ")[1]) if index == 0 or conn > 0 else None

    async def body(path: Path) -> None:
        async with _pool(path, one_per_connection) as (_, upstream):
            await asyncio.sleep(0)  # let nothing read the close yet: the pool still holds it
            sinks = _send_together(upstream, 2, pipeline=pipeline)
            assert _bodies(await _outcomes(sinks)) == [b"/r/0", b"/r/1"]

    _run(body, tmp_path)


@pytest.fixture
def full_listener(tmp_path: Path) -> Iterator[tuple[Path, socket.socket, list[socket.socket]]]:
    """A Unix listener whose queue of connections waiting to be accepted is full."""
    path = tmp_path / "serve.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    waiting: list[socket.socket] = []
    try:
        while True:
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                c.close()
                break
            waiting.append(c)
        yield path, listener, waiting
    finally:
        listener.close()
        for c in waiting:
            c.close()


# These two run on uvloop, as the proxy does: asyncio's own loop connects another way.


def test_upstream_waits_for_a_full_listen_queue_to_drain(
    full_listener: tuple[Path, socket.socket, list[socket.socket]],
) -> None:
    path, listener, waiting = full_listener

    async def body() -> None:
        loop = asyncio.get_running_loop()

        async def drain_then_serve() -> None:
            await asyncio.sleep(0.2)
            for c in waiting:
                c.close()
            listener.setblocking(False)
            while True:
                conn, _ = await loop.sock_accept(listener)
                data = await loop.sock_recv(conn, 65536)
                if data.startswith(b"GET "):
                    await loop.sock_sendall(conn, _reply(b"late but there"))
                conn.close()

        server = asyncio.create_task(drain_then_serve())
        upstream = Upstream(UpstreamSpec(unix_path=path, connect_timeout=3.0))
        try:
            assert _bodies(await _outcomes(_send_together(upstream, 1))) == [b"late but there"]
        finally:
            server.cancel()
            await upstream.close()

    uvloop.run(body())


def test_upstream_full_listen_queue_that_never_drains_is_502(
    full_listener: tuple[Path, socket.socket, list[socket.socket]],
) -> None:
    path = full_listener[0]

    async def body() -> None:
        upstream = Upstream(UpstreamSpec(unix_path=path, connect_timeout=0.3))
        outcome = (await _outcomes(_send_together(upstream, 1)))[0]
        assert isinstance(outcome, HTTPError) and outcome.status == 502 and "unreachable" in str(outcome)
        await upstream.close()

    uvloop.run(body())
