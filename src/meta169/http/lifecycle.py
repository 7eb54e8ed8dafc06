"""How a server process lives and ends: signals, reloads, draining, lasting problems.

``meta169 serve``, ``proxy`` and ``admin`` share it. SIGHUP asks for a reload: the
server rebuilds its configuration with a callable the edge gave it (the command
line, environment and config file read again) and applies what can change without
dropping a connection; a reload that fails keeps the running configuration and
only logs why. SIGTERM and SIGINT ask for a stop that drains: stop accepting,
close idle keep-alive connections, let requests in flight finish within a
timeout, then close the rest. The service manager hears RELOADING=1 then READY=1,
and STOPPING=1, through the :class:`~meta169.sdnotify.Notifier` built at the edge
(sd_notify(3); ``Type=notify-reload`` units need both around a reload).

Knows nothing of what the server serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from meta169.errors import Meta169Error
from meta169.health import Health
from meta169.http.protocol import Ticker
from meta169.sdnotify import Notifier

# Its lines are shown at every log level (meta169.logs.setup).
log = logging.getLogger("meta169.lifecycle")

C = TypeVar("C")

# How often a drain looks for connections whose last reply has gone out.
DRAIN_POLL = 0.05
# A lasting problem (an empty registry, a listener naming nothing) is logged again
# this often while it lasts, so it shows in any window of the log an operator reads.
RECHECK_EVERY = 60.0


class Signals:
    """The running loop's signal handlers.

    SIGTERM and SIGINT set :attr:`stop` (again while stopping: nothing more, the
    drain has its own deadline); SIGHUP runs ``on_reload``, one at a time: a SIGHUP
    during a reload runs one more reload after it, so the last one reads the newest
    files. Each signal is first passed on to ``forward`` (worker processes).
    """

    def __init__(self, on_reload: Callable[[], Awaitable[None]] | None, *, forward: Sequence[int] = ()) -> None:
        self.stop = asyncio.Event()
        self.received: str = ""
        self._on_reload = on_reload
        self._forward = tuple(forward)
        self._reloading: asyncio.Task[None] | None = None
        self._again = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def set_reload(self, on_reload: Callable[[], Awaitable[None]] | None) -> None:
        """What SIGHUP runs from now on (a server that is up); None: nothing."""
        self._on_reload = on_reload

    def install(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hup)

    def remove(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.remove_signal_handler(sig)

    def _pass_on(self, sig: int) -> None:
        for pid in self._forward:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stop(self, sig: int) -> None:
        self._pass_on(sig)
        if not self.stop.is_set():
            self.received = signal.Signals(sig).name
            self.stop.set()

    def _hup(self) -> None:
        self._pass_on(signal.SIGHUP)
        if self.stop.is_set() or self._on_reload is None or self._loop is None:
            return
        if self._reloading is not None and not self._reloading.done():
            self._again = True
            return
        self._reloading = self._loop.create_task(self._reload_loop(self._on_reload))

    async def _reload_loop(self, on_reload: Callable[[], Awaitable[None]]) -> None:
        while True:
            self._again = False
            await on_reload()
            if not self._again or self.stop.is_set():
                return


async def reload_config(
    rebuild: Callable[[], C],
    apply: Callable[[C], Sequence[str]],
    notifier: Notifier,
) -> bool:
    """Rebuild the configuration off the loop and ``apply`` it; False when the rebuild
    failed and the running configuration stays. ``apply`` returns what it changed,
    one phrase each, for the log."""
    notifier.reloading()
    try:
        try:
            new = await asyncio.to_thread(rebuild)
        except Meta169Error as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        except Exception:
            # The top of an operation a signal started: a bug here must not kill a
            # server that was serving.
            log.exception("reload failed, keeping the running configuration")
            return False
        changed = apply(new)
        log.info("reloaded: %s", "; ".join(changed) if changed else "nothing changed")
        return True
    finally:
        notifier.ready()


def restart_needed(old: object, new: object, reloadable: Sequence[str]) -> list[str]:
    """The fields of two configurations of one dataclass type that differ but cannot
    change while running (every field not in ``reloadable``), by name."""
    names = getattr(type(old), "__dataclass_fields__", {})
    return [name for name in names if name not in reloadable and getattr(old, name) != getattr(new, name)]


def warn_restart_needed(fields: Sequence[str]) -> None:
    if fields:
        log.warning("reload: %s changed, which needs a restart; still running with the old value", ", ".join(fields))


async def drain(tickers: Sequence[Ticker], timeout: float) -> int:
    """Close idle connections now, wait up to ``timeout`` seconds for the others to
    finish their requests (each is closed once its last reply is written), then
    abort what is left. Call it after the listeners stopped accepting. Returns the
    number of connections aborted."""
    loop = asyncio.get_running_loop()
    busy = sum(t.close_idle() for t in tickers)
    log.info("stopping: draining %d connections", busy)
    deadline = loop.time() + timeout
    while busy and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL)
        busy = sum(t.close_idle() for t in tickers)
    if not busy:
        return 0
    aborted = sum(t.abort_all() for t in tickers)
    log.warning("drain timeout (%.1f s): closed %d connections with requests in flight", timeout, aborted)
    return aborted


class Recheck:
    """A problem that can go away on its own: a ``check`` returning what is wrong
    (None when all is well) feeds the health check ``name``; while the problem
    lasts it is logged as a warning at once and every ``every`` seconds.

    ``check`` is asked again every ``every`` seconds and whenever :meth:`poke` is
    called (a registry change); with ``until_resolved`` no more once the problem
    is gone (a check too costly to repeat forever, such as looking for instances).
    """

    def __init__(
        self,
        health: Health,
        name: str,
        check: Callable[[], Awaitable[str | None]],
        *,
        every: float = RECHECK_EVERY,
        warn: bool = True,
        until_resolved: bool = False,
    ) -> None:
        self._health = health
        self._name = name
        self._check = check
        self._every = every
        self._warn = warn
        self._until_resolved = until_resolved
        self._poked = asyncio.Event()
        self.problem: str | None = None

    async def first(self) -> str | None:
        """Check once, set the health check and warn; the problem, if any."""
        await self._update(await self._check(), warn=True)
        return self.problem

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_warning = loop.time()
        while not (self._until_resolved and self.problem is None):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._every)
            self._poked.clear()
            try:
                problem = await self._check()
            except Meta169Error as exc:
                # The registry check has its own health entry; keep the last answer.
                log.debug("%s: cannot check: %s", self._name, exc)
                continue
            due = loop.time() - last_warning >= self._every
            await self._update(problem, warn=due)
            if due and problem is not None:
                last_warning = loop.time()

    async def _update(self, problem: str | None, *, warn: bool) -> None:
        before = self.problem
        self.problem = problem
        self._health.set(self._name, problem is None, problem or "")
        if problem is not None and (warn or problem != before) and self._warn:
            log.warning("%s", problem)
        elif problem is None and before is not None and self._warn:
            log.info("%s: resolved", self._name)
