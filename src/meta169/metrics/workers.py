"""The numbers of ``serve --workers N`` as one: at a scrape, the main process asks
every worker for a snapshot of its own numbers and adds them up.

Each process counts in plain dicts of its own (``metrics.core``). Before forking,
the main process opens a :class:`WorkerHub`: a listening Unix socket with an
address the kernel picks in the abstract namespace (Linux autobind, so nothing on
the file system to clean up). Each worker connects to it once it serves; the main
process accepts only its own workers (``SO_PEERCRED``: the pid must be one it
forked, the uid its own). At a scrape it writes one line to every worker, each
worker answers with its snapshot as one line of JSON from its event loop, and the
main process adds them up (``core.merge``).

Why not prometheus_client's multiprocess mode: it keeps every value in a
memory-mapped file written on each increment under a lock (in the path of every
request), cannot carry custom collectors (the compiled fast path's counters are
read from C objects at scrape time) and must be chosen by an environment variable
before the library is imported. Here a request costs what it costs with one
process, and a scrape one round trip per worker. A worker that has not connected
yet, or does not answer within the timeout, is left out of that scrape, and
``meta169_metrics_processes`` says how many processes were counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence

from meta169.metrics.core import Family, from_json, to_json

log = logging.getLogger("meta169.metrics")

_ASK = b"snapshot\n"
# A snapshot is a few kilobytes; this bounds a confused peer.
_MAX_LINE = 16 << 20
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class WorkerHub:
    """Opened by the main process before it forks; afterwards call :meth:`as_main`
    there and :meth:`as_worker` in each worker."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("")  # autobind: a fresh abstract address (unix(7))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener: socket.socket | None = sock
        self.address: str | bytes = sock.getsockname()
        self._workers: set[int] = set()
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._lock: asyncio.Lock | None = None
        self._accepting: asyncio.Task[None] | None = None

    # -- the main process -------------------------------------------------------------------
    def as_main(self, workers: Iterable[int]) -> None:
        """Accept connections from these worker pids only (call once forked)."""
        self._workers = set(workers)

    @property
    def connected(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        """Start accepting workers on the running loop (the main process)."""
        if self._listener is not None and self._accepting is None:
            self._accepting = asyncio.get_running_loop().create_task(self._accept(self._listener))

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            if pid not in self._workers or uid != os.geteuid():
                log.warning("metrics: refused a link from pid %d (uid %d): not one of our workers", pid, uid)
                conn.close()
                continue
            conn.setblocking(False)
            old = self._streams.pop(pid, None)
            if old is not None:
                old[1].close()
            self._streams[pid] = await asyncio.open_unix_connection(sock=conn, limit=_MAX_LINE)

    async def gather(self, timeout: float = 2.0) -> list[list[Family]]:
        """Every connected worker's snapshot that came back in time."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one scrape at a time: answers come back in order
            pids = list(self._streams)
            results = await asyncio.gather(*(self._ask(pid, timeout) for pid in pids))
        return [r for r in results if r is not None]

    async def _ask(self, pid: int, timeout: float) -> list[Family] | None:
        reader, writer = self._streams[pid]
        try:
            writer.write(_ASK)
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise ConnectionError("it closed its metrics link")
            return from_json(line)
        except (OSError, ValueError, TimeoutError) as exc:
            # Gone or out of step: left out until it connects again.
            log.warning("metrics: worker %d did not answer (%s); its numbers are left out", pid, exc)
            self._streams.pop(pid, None)
            writer.close()
            return None

    # -- a worker ---------------------------------------------------------------------------
    def as_worker(self) -> None:
        """Drop the main process's listening socket (call once forked)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def answer(self, snapshot: Callable[[], Sequence[Family]]) -> None:
        """Connect to the main process and answer each request with a snapshot,
        until the link closes (the main process is gone)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Local and listening: the connect completes at once (a blocking call is fine).
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            log.warning("metrics: cannot reach the main process (%s); this worker's numbers are left out", exc)
            return
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_MAX_LINE)
        try:
            while await reader.readline():
                writer.write(to_json(snapshot()) + b"\n")
                await writer.drain()
        except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("metrics: the link to the main process broke (%s)", exc)
        finally:
            writer.close()

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        for _, writer in self._streams.values():
            writer.close()
        self._streams.clear()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
