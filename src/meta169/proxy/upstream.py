"""The proxy's side of the proxy-to-server hop: a small keep-alive connection pool.

Replies from ``serve`` are small (user data is at most 64 KiB) and always carry
Content-Length, so a reply is read whole, bounded, and relayed verbatim. Failures
map to what the guest should see (BRIEF: never hang): cannot connect -> 502,
pool exhausted -> 503, no reply in time -> 504.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httptools

from meta169.errors import HTTPError

MAX_REPLY = 1 << 20


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


class _ReplyReader:
    """httptools callbacks collecting one reply; ``done`` once complete."""

    __slots__ = ("done", "keep_alive", "parser")

    def __init__(self) -> None:
        self.done = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_complete(self) -> None:
        self.done = True
        # httptools answers should_keep_alive() truthfully only inside the callback.
        if self.parser is not None:
            self.keep_alive = bool(self.parser.should_keep_alive())


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    raw: bytes
    headers: dict[str, str]


class _HeaderReader(_ReplyReader):
    __slots__ = ("_name", "headers")

    def __init__(self) -> None:
        super().__init__()
        self.headers: dict[str, str] = {}
        self._name = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")


class Upstream:
    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self._open = 0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._idle:
            return self._idle.pop()
        if self._open >= self.spec.max_connections:
            raise HTTPError(503, "metadata proxy busy")
        try:
            if self.spec.unix_path is not None:
                coro = asyncio.open_unix_connection(str(self.spec.unix_path))
            else:
                coro = asyncio.open_connection(self.spec.host, self.spec.port)
            pair = await asyncio.wait_for(coro, self.spec.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise HTTPError(502, f"metadata server unreachable at {self.spec}: {exc}") from exc
        self._open += 1
        return pair

    def _discard(self, writer: asyncio.StreamWriter) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):
            writer.close()

    async def request(self, payload: bytes) -> Reply:
        """Send one complete request; return the whole reply. Retries once on a stale
        pooled connection (the server may have closed an idle keep-alive)."""
        for attempt in (0, 1):
            fresh = not self._idle
            reader, writer = await self._connect()
            try:
                writer.write(payload)
                reply, keep = await asyncio.wait_for(self._read(reader), self.spec.reply_timeout)
            except TimeoutError:
                self._discard(writer)
                raise HTTPError(504, "metadata server did not answer in time") from None
            except (ConnectionError, asyncio.IncompleteReadError, httptools.HttpParserError) as exc:
                self._discard(writer)
                if fresh or attempt:
                    raise HTTPError(502, f"metadata server closed the connection: {exc}") from exc
                continue
            if keep:
                self._idle.append((reader, writer))
            else:
                self._discard(writer)
            return reply
        raise HTTPError(502, "metadata server unreachable")  # pragma: no cover

    async def _read(self, reader: asyncio.StreamReader) -> tuple[Reply, bool]:
        cb = _HeaderReader()
        parser = httptools.HttpResponseParser(cb)
        cb.parser = parser
        chunks: list[bytes] = []
        size = 0
        while not cb.done:
            data = await reader.read(65536)
            if not data:
                raise ConnectionResetError("upstream closed mid-reply")
            size += len(data)
            if size > MAX_REPLY:
                raise httptools.HttpParserError("reply too large")
            chunks.append(data)
            parser.feed_data(data)
        cb.parser = None
        return Reply(parser.get_status_code(), b"".join(chunks), cb.headers), cb.keep_alive

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            self._discard(writer)
