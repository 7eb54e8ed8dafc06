"""A server's worker processes, and what the service manager hears about them.

With ``serve --workers N`` or ``proxy --workers N`` the main process forks N-1
workers that share its listening sockets (serve's, opened before the fork) or open
their own on the same addresses (the proxy's, SO_REUSEPORT), and serves too. Only
the main process talks to systemd (the units say ``NotifyAccess=main``): each
worker writes to its own pipe to the main process when it serves (``R``), while
the watchdog is on that its event loop still turns (``W``), and that it stops on
purpose (``S``). The main process sends READY=1 once it and every worker serve,
and WATCHDOG=1 only while every worker's loop has reported since the previous
ping, so a dead or stuck worker makes systemd restart the service.

:class:`Reports` is the pure bookkeeping; :class:`MainLink` and :class:`WorkerLink`
are the two ends, with the same methods, so the serving code does not ask which
process it is. Knows nothing of HTTP or the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meta169.errors import Meta169Error
from meta169.sdnotify import Notifier

log = logging.getLogger("meta169.workers")

READY = b"R"
ALIVE = b"W"
LEAVING = b"S"


@dataclass
class Reports:
    """What the main process has heard from its workers, keyed by worker pid."""

    pending: set[int]
    ready: set[int] = field(default_factory=set)
    alive: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    leaving: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, pids: Iterable[int]) -> Reports:
        return cls(pending=set(pids))

    def feed(self, pid: int, data: bytes) -> None:
        """Record bytes read from ``pid``'s pipe; ``b""`` is end of file (the worker is gone)."""
        if not data:
            self.pending.discard(pid)
            self.ready.discard(pid)
            self.alive.discard(pid)
            self.lost.add(pid)
            return
        if LEAVING in data:
            self.leaving.add(pid)
        if READY in data and pid in self.pending:
            self.pending.discard(pid)
            self.ready.add(pid)
        if pid in self.ready:
            # A ready report also proves the loop turns.
            self.alive.add(pid)

    @property
    def all_ready(self) -> bool:
        return not self.pending and not self.lost

    def take_alive(self) -> bool:
        """True when every worker reported since the last call (which starts a new round)."""
        every = not self.lost and not self.pending and self.alive == self.ready
        self.alive = set()
        return every


class WorkerLost(Meta169Error):
    """A worker process exited before it served."""


class MainLink:
    """The main process's end: the notifier, and the read ends of the workers' pipes."""

    def __init__(self, notifier: Notifier, pipes: dict[int, int]) -> None:
        self.notifier = notifier
        self._pipes = dict(pipes)  # worker pid -> read fd
        self._count = len(pipes) + 1
        self._reports = Reports.of(pipes)
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def workers(self) -> int:
        """Processes serving, this one included."""
        return self._count

    def _listen(self) -> asyncio.Event:
        if self._changed is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
            for pid, fd in self._pipes.items():
                os.set_blocking(fd, False)
                self._loop.add_reader(fd, self._read, pid, fd)
        return self._changed

    def _read(self, pid: int, fd: int) -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data and self._loop is not None:
            self._loop.remove_reader(fd)
            if pid in self._reports.leaving:
                log.info("worker %d stopped", pid)
            elif pid not in self._reports.lost:
                log.error("worker %d exited", pid)
        self._reports.feed(pid, data)
        if self._changed is not None:
            self._changed.set()

    async def ready(self, status: str) -> None:
        """Wait until every worker serves, then send READY=1 with ``status``.

        Raises WorkerLost when a worker exits first: the service cannot be what it
        was asked to be, and failing lets systemd restart it.
        """
        changed = self._listen()
        while not self._reports.all_ready:
            if self._reports.lost:
                raise WorkerLost(f"worker {min(self._reports.lost)} exited before it served")
            changed.clear()
            await changed.wait()
        self.notifier.ready(status)
        if self.notifier.watchdog_interval is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watchdog(self.notifier.watchdog_interval)))

    async def _watchdog(self, interval: float) -> None:
        # Pinged from this loop, so a stuck loop here stops the pings as well.
        while True:
            if self._reports.take_alive():
                self.notifier.watchdog()
            else:
                log.warning("watchdog: a worker has not reported; not pinging systemd")
            await asyncio.sleep(interval)

    def stopping(self) -> None:
        """A stop was asked: workers exiting from now on is expected; stop pinging."""
        self.close()

    def close(self) -> None:
        """Stop pinging and close the pipes; callable after the loop has ended, and twice."""
        for task in self._tasks:
            task.cancel()
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._pipes.values():
                self._loop.remove_reader(fd)
        for fd in self._pipes.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pipes.clear()


class WorkerLink:
    """A worker's end: reports to the main process; its notifier is silent."""

    def __init__(self, fd: int, watchdog_interval: float | None) -> None:
        self.notifier = Notifier()
        self._fd = fd
        self._interval = watchdog_interval
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def workers(self) -> int:
        return 1

    def _write(self, data: bytes) -> None:
        # Best effort: if the main process is gone there is nobody left to tell.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._fd, data)

    async def ready(self, status: str) -> None:
        del status  # the main process writes the status line
        self._write(READY)
        if self._interval is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeat(self._interval / 2)))

    async def _heartbeat(self, interval: float) -> None:
        # Twice per main-process tick, so one late report never costs a ping.
        while True:
            self._write(ALIVE)
            await asyncio.sleep(interval)

    def stopping(self) -> None:
        """A stop was asked: say so, so that this exit is not taken for a crash."""
        self._write(LEAVING)
        self.close()

    def close(self) -> None:
        """Stop reporting and close the pipe; a second call does nothing."""
        for task in self._tasks:
            task.cancel()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


ServiceLink = MainLink | WorkerLink


def fork_workers(count: int, notifier: Notifier) -> tuple[ServiceLink, list[int]]:
    """Fork ``count - 1`` workers. Returns this process's link and, in the main
    process, the workers' pids (empty in a worker)."""
    pipes: dict[int, int] = {}
    if count > 1:
        # What the process holds now (modules, configuration) lives as long as the
        # workers: out of the cyclic GC's reach, so its collections in each worker do
        # not write to those objects and copy the pages they share (gc.freeze).
        gc.freeze()
    for _ in range(count - 1):
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            for fd in pipes.values():  # the earlier workers' read ends
                os.close(fd)
            return WorkerLink(write_fd, notifier.watchdog_interval), []
        os.close(write_fd)
        pipes[pid] = read_fd
    return MainLink(notifier, pipes), list(pipes)


async def ready_unless_stopped(link: ServiceLink, status: str, stop: asyncio.Event) -> None:
    """``link.ready(status)``, given up when ``stop`` is set first (a stop asked while
    the workers start). Raises WorkerLost when a worker exits before it served."""
    ready = asyncio.ensure_future(link.ready(status))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((ready, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if ready.done():
        ready.result()
    else:
        ready.cancel()


def reap(children: Sequence[int], drain_timeout: float) -> None:
    """Stop the workers (SIGTERM: each drains) and wait for them; kill any still
    there 5 s after ``drain_timeout``."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    pending = set(children)
    deadline = time.monotonic() + drain_timeout + 5.0
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                pending.discard(pid)
        if not pending:
            return
        if time.monotonic() > deadline:
            for pid in pending:
                log.error("worker %d did not stop %.0f s after the drain timeout: killing it", pid, 5.0)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return
        time.sleep(0.05)
