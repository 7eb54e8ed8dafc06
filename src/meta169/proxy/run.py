"""Run ``meta169 proxy``: build the desired listener set from its sources, reconcile
it every second, serve until SIGINT/SIGTERM, then drain.

SIGHUP reads the listener sources again at once and applies a rebuilt
configuration (static listeners, the listener file, log level); a stop closes the
listeners, lets the requests in flight get their replies from serve within the
drain timeout, then closes (``http.lifecycle``). Readiness checks kept in the
:class:`~meta169.health.Health` given: ``listeners`` (every desired listener
open), ``listener-source`` (the last read of the file or registry worked),
``upstreams`` (at least one upstream marked up) and, with ``--from-registry``,
``registry-empty``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from meta169.errors import ConfigError, RegistryError, ValidationError
from meta169.health import Health
from meta169.http.lifecycle import Recheck, Signals, drain, reload_config, restart_needed, warn_restart_needed
from meta169.http.listen import Binding, ListenAddress
from meta169.http.workers import MainLink, ServiceLink, fork_workers, ready_unless_stopped, reap
from meta169.metrics.endpoint import ExportSockets, OpsServer, export_metrics
from meta169.metrics.instruments import ProxyMetrics
from meta169.model import parse_ip
from meta169.proxy.server import (
    ProxyListener,
    ProxyServer,
    listeners_from_topology,
    load_listener_file,
    netns_exists,
    open_in_namespace,
    watch,
)
from meta169.proxy.upstream import CHECK_INTERVAL, QUEUE_LIMIT, Upstream, UpstreamSpec
from meta169.sdnotify import Notifier

log = logging.getLogger("meta169.proxy")

CHECK_LISTENERS = "listeners"
CHECK_SOURCE = "listener-source"
CHECK_EMPTY = "registry-empty"
CHECK_UPSTREAMS = "upstreams"


@dataclass(frozen=True)
class ProxyConfig:
    # The serve nodes, each with a connection pool of its own (proxy.upstream).
    upstreams: tuple[UpstreamSpec, ...]
    secret: bytes | None = field(default=None, repr=False)
    static: tuple[ProxyListener, ...] = ()
    listener_file: Path | None = None
    # May carry a password joined from a 0600 file: never in repr or logs.
    registry_url: str | None = field(default=None, repr=False)
    interval: float = 1.0
    # With registry_url: start even if the registry holds no instances.
    allow_empty: bool = False
    # Seconds a stop waits for requests in flight before closing them.
    drain_timeout: float = 10.0
    # The root logger's level; None: as the edge set it. A reload applies a change.
    log_level: int | None = None
    # /metrics, /healthz and /readyz on a listener of their own; None: off.
    metrics_listen: ListenAddress | None = None
    # Requests that may wait for a connection to serve when every pool is busy.
    queue_limit: int = QUEUE_LIMIT
    # Seconds between two looks at each upstream's health.
    check_interval: float = CHECK_INTERVAL

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ConfigError("give at least one --upstream")
        names = [str(spec) for spec in self.upstreams]
        if len(set(names)) != len(names):
            raise ConfigError(f"--upstream given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")


# What a reload changes while running; the upstreams and their secret need a restart.
RELOADABLE = ("static", "listener_file", "registry_url", "interval", "allow_empty", "drain_timeout", "log_level")


def parse_upstream(text: str) -> UpstreamSpec:
    if text.startswith("unix:"):
        return UpstreamSpec(unix_path=Path(text[5:]))
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--upstream {text!r}: expected unix:PATH or HOST:PORT")
    return UpstreamSpec(host=host.strip("[]"), port=int(port))


def parse_static_listener(text: str) -> ProxyListener:
    """``[NETNS/]ADDR:PORT=network:ID`` or ``...=router:ID``."""
    where, sep, bind = text.partition("=")
    kind, _, ident = bind.partition(":")
    if not sep or kind not in ("network", "router") or not ident:
        raise ConfigError(f"--listen {text!r}: expected [NETNS/]ADDR:PORT=network:ID or =router:ID")
    netns, slash, hostport = where.rpartition("/")
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        raise ConfigError(f"--listen {text!r}: expected ADDR:PORT")
    try:
        binding = Binding("network", ident) if kind == "network" else Binding("router", ident)
        return ProxyListener(binding, parse_ip(host.strip("[]")), int(port), netns if slash else None)
    except ValidationError as exc:
        raise ConfigError(f"--listen {text!r}: {exc}") from exc


def desired_listeners(config: ProxyConfig) -> Callable[[], list[ProxyListener]]:
    def source() -> list[ProxyListener]:
        out = list(config.static)
        if config.listener_file is not None:
            out.extend(load_listener_file(config.listener_file))
        if config.registry_url is not None:
            from meta169.registry import open_registry

            try:
                reg = open_registry(config.registry_url)
                try:
                    routers = [(r.id, r.network_ids) for r in reg.list_routers()]
                    nets = [n.id for n in reg.list_networks()]
                finally:
                    reg.close()
            except RegistryError as exc:
                raise ConfigError(f"registry: {exc}") from exc
            out.extend(lst for lst in listeners_from_topology(routers, nets) if lst.netns and netns_exists(lst.netns))
        return out

    return source


class _Running:
    """The proxy's state a reload changes: the configuration its sources read."""

    def __init__(self, config: ProxyConfig, health: Health) -> None:
        self.config = config
        self.health = health
        # The listeners the sources asked for last: what "every listener open" means.
        self.desired: list[ProxyListener] = []
        # Set to end the current watch: a reload (then a new one starts) or a stop.
        self.kick = asyncio.Event()

    def source(self) -> list[ProxyListener]:
        """Read the listener sources of the current configuration (in a thread)."""
        try:
            found = desired_listeners(self.config)()
        except ConfigError as exc:
            self.health.set(CHECK_SOURCE, False, str(exc))
            raise
        self.health.set(CHECK_SOURCE, True)
        self.desired = found
        return found

    def reconfigure(self, new: ProxyConfig) -> list[str]:
        old = self.config
        warn_restart_needed(restart_needed(old, new, RELOADABLE))
        changed = [
            f"{name.replace('_', ' ')} changed" for name in RELOADABLE if getattr(old, name) != getattr(new, name)
        ]
        if new.log_level is not None and new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
        self.config = dataclasses.replace(old, **{name: getattr(new, name) for name in RELOADABLE})
        # The listener file and the registry are read again at once, changed or not.
        self.kick.set()
        return [*changed, "listener sources read again"]


async def serve_proxy(
    config: ProxyConfig,
    stop: asyncio.Event,
    on_ready: Callable[[int], None] | None = None,
    notifier: Notifier | None = None,
    *,
    health: Health | None = None,
    reload: Callable[[], ProxyConfig] | None = None,
    signals: Signals | None = None,
    link: ServiceLink | None = None,
    exports: ExportSockets | None = None,
    shared: bool = False,
) -> float:
    """Serve until ``stop`` is set, then drain; returns when the stop began (monotonic).

    ``notifier`` hears READY=1 once the first listeners are open (with ``link``, a
    worker's or the main process's end, once every process's are), RELOADING=1 and
    READY=1 around a reload, STOPPING=1 at the stop. ``reload`` rebuilds the
    configuration when ``signals`` (installed by the caller) gets SIGHUP. ``exports``
    is what ``run_proxy`` opened for the metrics before forking workers; with
    ``shared`` (workers) each listener is opened beside the other processes' own
    (SO_REUSEPORT).
    """
    link = link if link is not None else MainLink(notifier if notifier is not None else Notifier(), {})
    notifier = link.notifier
    running = _Running(config, health if health is not None else Health())
    metrics = ProxyMetrics() if config.metrics_listen is not None else None
    upstream = Upstream(config.upstreams, metrics=metrics, queue_limit=config.queue_limit)
    upstream.start_checks(config.check_interval)
    opener = functools.partial(open_in_namespace, shared=shared)
    server = ProxyServer(upstream, secret=config.secret, metrics=metrics, opener=opener)
    ops: OpsServer | None = None
    tasks: list[asyncio.Task[None]] = []
    if metrics is not None and config.metrics_listen is not None:
        sockets = exports if exports is not None else ExportSockets.open(config.metrics_listen)
        ops, answering = await export_metrics(sockets, "proxy", metrics, running.health)
        if answering is not None:
            tasks.append(answering)
    initial = running.source()
    errors = await server.reconcile(initial)
    for err in errors:
        log.error("%s", err)
    tasks += [
        asyncio.get_running_loop().create_task(_check_listeners(running, server)),
        asyncio.get_running_loop().create_task(_check_upstreams(running, upstream)),
    ]
    if config.registry_url is not None:
        empty = Recheck(running.health, CHECK_EMPTY, _empty_check(config.registry_url), until_resolved=True)
        await empty.first()
        tasks.append(asyncio.get_running_loop().create_task(empty.run()))
    if signals is not None and reload is not None:
        rebuild = reload

        async def on_reload() -> None:
            await reload_config(rebuild, running.reconfigure, notifier)

        signals.set_reload(on_reload)
    failed = f", {len(errors)} failed (see the log)" if errors else ""
    targets = ", ".join(str(spec) for spec in config.upstreams)
    processes = f" in {link.workers} processes" if link.workers > 1 else ""
    ready = f"proxying {len(server.listeners)} listeners to {targets}{processes}{failed}"
    try:
        # READY=1 once every worker listens too (a worker lost first: WorkerLost).
        await ready_unless_stopped(link, ready, stop)
        if on_ready is not None and not stop.is_set():
            on_ready(len(server.listeners))
        stopper = asyncio.get_running_loop().create_task(_relay(stop, running))
        tasks.append(stopper)
        while not stop.is_set():
            running.kick.clear()
            await watch(server, running.source, interval=running.config.interval, stop=running.kick)
        since = time.monotonic()
        link.stopping()  # workers exit now on purpose
        notifier.stopping("draining connections")
        await server.reconcile([])  # stop accepting; the upstream stays for the replies in flight
        ticker = server.ticker
        await drain([ticker] if ticker is not None else [], running.config.drain_timeout)
        return since
    finally:
        for task in tasks:
            task.cancel()
        if ops is not None:
            await ops.close()
        if exports is not None:
            exports.close()
        await server.close()


async def _relay(stop: asyncio.Event, running: _Running) -> None:
    await stop.wait()
    running.kick.set()


async def _check_listeners(running: _Running, server: ProxyServer) -> None:
    while True:
        open_keys = {lst.key for lst in server.listeners}
        missing = [str(lst) for lst in running.desired if lst.key not in open_keys]
        running.health.set(
            CHECK_LISTENERS,
            not missing,
            f"not listening: {', '.join(missing)}" if missing else f"{len(open_keys)} listening",
        )
        await asyncio.sleep(running.config.interval)


async def _check_upstreams(running: _Running, upstream: Upstream) -> None:
    """Ready while at least one upstream is marked up (a proxy with none answers
    every guest 502)."""
    while True:
        states = upstream.states()
        down = [name for name, up in states if not up]
        running.health.set(
            CHECK_UPSTREAMS,
            len(down) < len(states),
            f"down: {', '.join(down)}" if down else f"{len(states)} up",
        )
        await asyncio.sleep(running.config.interval)


def _empty_check(registry_url: str) -> Callable[[], Awaitable[str | None]]:
    async def check() -> str | None:
        if await asyncio.to_thread(_registry_is_empty, registry_url):
            return f"registry {_describe(registry_url)} holds no instances"
        return None

    return check


# The registry's modules (SQLAlchemy) are imported only by a proxy that reads it:
# one proxy process serves a thousand namespaces, its size matters.
def _describe(registry_url: str) -> str:
    from meta169.registry import describe_registry_url

    return describe_registry_url(registry_url)


def _registry_is_empty(registry_url: str) -> bool:
    from meta169.registry import open_registry

    registry = open_registry(registry_url)
    try:
        return not registry.has_instances()
    finally:
        registry.close()


def run_proxy(
    config: ProxyConfig,
    on_ready: Callable[[int], None] | None = None,
    notifier: Notifier | None = None,
    *,
    workers: int = 1,
    health: Health | None = None,
    reload: Callable[[], ProxyConfig] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain; SIGHUP reloads with ``reload``.
    With ``workers`` > 1, fork that many processes, each with its own event loop,
    listeners (the kernel spreads the guests' connections over them) and pools to
    the upstreams; the main one passes every signal on and waits for them.

    Raises RegistryError before listening when ``config.registry_url`` names a
    registry without instances, unless ``config.allow_empty``.
    """
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    from meta169.http.loop import loop_factory

    # SIGHUP's default action is to terminate: ignored until the handler is in place.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.registry_url is not None and not config.allow_empty and _registry_is_empty(config.registry_url):
        raise RegistryError(
            f"{_describe(config.registry_url)} holds no instances, so --from-registry has nothing "
            f"to serve; import an inventory first, or pass --allow-empty"
        )

    # Bound before forking, so a busy metrics address fails before any worker exists.
    exports = ExportSockets.open(config.metrics_listen, workers=workers) if config.metrics_listen else None
    link, children = fork_workers(workers, notifier if notifier is not None else Notifier())
    main_process = isinstance(link, MainLink)
    if exports is not None:
        exports.forked(children, main=main_process)

    async def main() -> float:
        signals = Signals(None, forward=children)
        signals.install()
        return await serve_proxy(
            config,
            signals.stop,
            on_ready if main_process else None,
            health=health,
            reload=reload,
            signals=signals,
            link=link,
            exports=exports,
            shared=workers > 1,
        )

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            since = runner.run(main())
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        link.close()
        reap(children, config.drain_timeout)
    log.info("stopped after %.1f s", time.monotonic() - since)
