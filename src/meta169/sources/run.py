"""Run a source's watch as a service: ``meta169 sync libvirt|openstack --watch``.

The watch itself (:func:`.libvirt.watch_libvirt`, :func:`.openstack.watch_openstack`)
is a blocking loop of syncs on a thread of its own; this module is the service
around it, on an event loop, as serve, proxy and admin have:

- the service manager (sd_notify(3), through the Notifier built at the edge) hears
  READY=1 after the first *successful* sync, so a unit an operator orders after
  this one starts on a filled registry (the shipped serve unit is not: it answers from
  what the registry holds while a source is down); STATUS= after every sync and
  every failure (before the first success too: ``systemctl status`` shows why it is
  not ready yet); STOPPING=1 at SIGTERM or SIGINT, after which the process exits 0;
- WATCHDOG=1 every half watchdog period while the loop turns *and* the watch has
  ended a sync (or failed one) within :attr:`WatchConfig.stall` seconds: a watch stuck
  in a call to a source that never answers stops the pings and systemd restarts it;
- SIGHUP syncs at once (the configuration is read at start: a restart applies it);
- ``metrics_listen``: /metrics (:class:`~meta169.metrics.instruments.SyncMetrics`),
  /healthz and /readyz, whose check ``sync`` holds while the last sync succeeded.

Results and errors cross from the watch's thread to the loop's, where they are
counted and reported (the metrics take no lock). The watch's own log says when it
retries; the error itself is logged here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meta169.errors import Meta169Error
from meta169.health import Health
from meta169.http.lifecycle import Signals
from meta169.http.listen import ListenAddress
from meta169.logs import LIFECYCLE_LOGGER
from meta169.sdnotify import Notifier
from meta169.sources.reconcile import SyncResult

log = logging.getLogger("meta169.sources")
# Starts, reloads and stops, shown at every log level (meta169.logs).
lifecycle = logging.getLogger(LIFECYCLE_LOGGER)

CHECK = "sync"
# The same error, again and again (libvirtd down: a reconnect every 2 s), is logged
# once this often, with the count of failures since.
REPEAT_LOG_EVERY = 60.0
# Room for one long sync on top of the longest wait between two: a full read of a
# large cloud (every server, port and network, a page at a time) takes minutes.
SYNC_ALLOWANCE = 600.0

# What the source's watch is given: the events that stop it and wake it, and where
# its results and errors go (called on the watch's thread).
Report = Callable[[SyncResult], None]
ReportError = Callable[[Meta169Error], None]
Watch = Callable[[threading.Event, threading.Event, Report, ReportError], None]


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """The service around one source's watch."""

    # The registry source it syncs (libvirt:URI, openstack:CLOUD), for status lines.
    source: str
    # Seconds the watch may go without ending a sync before the watchdog pings stop:
    # :func:`stall_limit` of the longest wait between its syncs.
    stall: float
    # /metrics, /healthz and /readyz; None: off.
    metrics_listen: ListenAddress | None = None
    # On a stop, seconds to wait for a sync under way before exiting without it (its
    # writes are one transaction each: the next start completes a prefix).
    stop_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.stall <= 0 or self.stop_timeout < 0:
            raise ValueError("stall must be positive and stop_timeout not negative")


def stall_limit(longest_wait: float) -> float:
    """How long a watch whose syncs are at most ``longest_wait`` seconds apart may go
    without ending one before it counts as hung."""
    return longest_wait + SYNC_ALLOWANCE


def status_line(result: SyncResult) -> str:
    """What ``systemctl status`` shows after a successful sync."""
    if result.report is None:
        return f"{result.source} dry run: {len(result.plan.changes)} changes planned, nothing written"
    return f"{result.source} in sync at registry revision {result.report.revision}"


class _State:
    """What the loop knows of the watch; touched on the loop's thread only."""

    def __init__(self, now: float) -> None:
        self.ready = False
        self.failures = 0
        self.last_report = now
        self.stalled = False
        # The error last logged, and when.
        self.logged: tuple[str, float] = ("", 0.0)


def run_watch(
    watch: Watch,
    config: WatchConfig,
    *,
    on_result: Callable[[SyncResult, bool], None] | None = None,
    notifier: Notifier | None = None,
    health: Health | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``watch`` until SIGTERM or SIGINT, then stop it and return.

    ``on_result(result, first)`` is called on the loop's thread after each successful
    sync (``first``: the one that made the service ready). Raises what the watch
    raised (a ConfigError: retrying does not fix it), and ConfigError when the metrics
    address cannot be bound.
    """
    from meta169.http.loop import loop_factory

    # SIGHUP's default action is to terminate: ignored until the handler is in place.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(
                _run(
                    watch,
                    config,
                    on_result,
                    notifier if notifier is not None else Notifier(),
                    health if health is not None else Health(),
                    clock,
                )
            )
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _run(
    watch: Watch,
    config: WatchConfig,
    on_result: Callable[[SyncResult, bool], None] | None,
    notifier: Notifier,
    health: Health,
    clock: Callable[[], float],
) -> None:
    from meta169.metrics.endpoint import Exporter, OpsServer, start_ops
    from meta169.metrics.instruments import SyncMetrics

    loop = asyncio.get_running_loop()
    state = _State(clock())
    metrics = SyncMetrics() if config.metrics_listen is not None else None
    stop, wake = threading.Event(), threading.Event()
    finished = asyncio.Event()
    raised: list[BaseException] = []
    health.set(CHECK, False, "no sync yet")

    def succeeded(result: SyncResult) -> None:
        state.last_report = clock()
        text = status_line(result)
        if state.failures:
            log.warning("%s: in sync again after %d failed syncs", config.source, state.failures)
        state.failures = 0
        state.logged = ("", 0.0)
        health.set(CHECK, True, text)
        if metrics is not None:
            metrics.synced(((c.action, c.kind) for c in result.plan.changes), wrote=result.report is not None)
        first = not state.ready
        if on_result is not None:
            on_result(result, first)
        if first:
            state.ready = True
            notifier.ready(text)
        else:
            notifier.status(text)

    def failed(exc: Meta169Error) -> None:
        now = state.last_report = clock()
        state.failures += 1
        text, when = state.logged
        if str(exc) != text or now - when >= REPEAT_LOG_EVERY:
            state.logged = (str(exc), now)
            suffix = f" ({state.failures} failed in a row)" if state.failures > 1 else ""
            log.error("%s%s", exc, suffix)
        if metrics is not None:
            metrics.failed()
        health.set(CHECK, False, str(exc))
        if state.ready:
            notifier.status(f"sync failed ({state.failures} in a row), the registry keeps what it holds: {exc}")
        else:
            notifier.status(f"waiting for a first successful sync ({state.failures} failed): {exc}")

    def from_thread(handle: Callable[[Any], None]) -> Callable[[Any], None]:
        def post(arg: Any) -> None:
            # A watch still running after a stop timed out finds the loop closed.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(handle, arg)

        return post

    def target() -> None:
        try:
            watch(stop, wake, from_thread(succeeded), from_thread(failed))
        except BaseException as exc:  # handed to the loop, re-raised there
            raised.append(exc)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finished.set)

    async def sync_now() -> None:
        lifecycle.info("%s: SIGHUP, syncing now", config.source)
        wake.set()

    signals = Signals(sync_now)
    signals.install()
    ops: OpsServer | None = None
    tasks: list[asyncio.Task[object]] = []
    try:
        if metrics is not None and config.metrics_listen is not None:
            # ConfigError, naming the address, when it cannot be bound.
            ops = await start_ops(config.metrics_listen, Exporter("sync", metrics), health)
        notifier.status(f"{config.source}: first sync")
        thread = threading.Thread(target=target, name="meta169-sync-watch", daemon=True)
        thread.start()
        tasks.append(loop.create_task(_ping(notifier, state, health, config, clock)))
        tasks.append(loop.create_task(signals.stop.wait()))
        tasks.append(loop.create_task(finished.wait()))
        await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_COMPLETED)
        if signals.stop.is_set():
            notifier.stopping(f"stopping ({signals.received})")
            lifecycle.info("%s: stopping (%s)", config.source, signals.received)
        stop.set()
        wake.set()
        try:
            await asyncio.wait_for(finished.wait(), config.stop_timeout)
        except TimeoutError:
            log.warning(
                "%s: a sync still under way after %.0f s; exiting without waiting for it",
                config.source,
                config.stop_timeout,
            )
        if raised:
            raise raised[0]
        if not signals.stop.is_set():
            # The watches return only when stopped; anything else is a bug.
            raise RuntimeError(f"{config.source}: the watch ended on its own")
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        if ops is not None:
            await ops.close()
        signals.remove()


async def _ping(
    notifier: Notifier, state: _State, health: Health, config: WatchConfig, clock: Callable[[], float]
) -> None:
    """WATCHDOG=1 while the watch ends syncs; a no-op without a watchdog."""
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        quiet = clock() - state.last_report
        if quiet <= config.stall:
            state.stalled = False
            notifier.watchdog()
        elif not state.stalled:
            state.stalled = True
            detail = f"no sync ended for {quiet:.0f} s: the watch is stuck; watchdog pings stopped"
            log.error("%s: %s", config.source, detail)
            health.set(CHECK, False, detail)
            notifier.status(detail)
        await asyncio.sleep(interval)
