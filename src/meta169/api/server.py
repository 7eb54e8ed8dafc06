"""Run the metadata plane: open listeners, share one site cache, poll for changes.

``start()`` is the programmatic entry (tests use it on loopback); ``run()`` is what
``meta169 serve`` calls: it refuses an empty registry (unless allowed), installs
uvloop, optionally forks worker processes that share the listening sockets, and
handles signals (``http.lifecycle``): SIGHUP reloads what can change while
serving (rate limits, static vendor data, log level), SIGTERM and SIGINT drain.

The readiness checks ``start()`` keeps in the :class:`~meta169.health.Health` it is
given: ``registry`` (the registry answered the last call: a poll, a lookup),
``registry-poll`` (it answered recently), ``listeners`` (every listener bound),
``registry-empty`` (instances exist) and ``networks`` (every network and router a
listener names exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meta169.api.cache import RELAXED_POLL_S, Scope, SiteCache
from meta169.api.config import ServeConfig
from meta169.api.metadata import MetadataApp
from meta169.api.ratelimit import Buckets
from meta169.api.tokens import KeyRing
from meta169.errors import ConfigError, NotFound, RegistryError
from meta169.health import Health
from meta169.http import wire
from meta169.http.lifecycle import Recheck, Signals, drain, reload_config, restart_needed, warn_restart_needed
from meta169.http.limits import Limits
from meta169.http.listen import LISTEN_BACKLOG, Binding, ListenAddress, open_listen_socket
from meta169.http.loop import loop_factory
from meta169.http.protocol import ConnectionTracker, HTTPProtocol, Ticker
from meta169.http.workers import MainLink, ServiceLink, fork_workers, ready_unless_stopped, reap
from meta169.logs import AccessLog
from meta169.metrics.endpoint import ExportSockets, OpsServer, export_metrics
from meta169.metrics.instruments import ServeMetrics
from meta169.registry import Registry, describe_registry_url, open_registry
from meta169.render import RenderOptions
from meta169.render.document import seed_pool_bytes
from meta169.sdnotify import Notifier

log = logging.getLogger("meta169.serve")

# Readiness check names (meta169.health), as /readyz lists them.
CHECK_REGISTRY = "registry"
CHECK_POLL = "registry-poll"
CHECK_LISTENERS = "listeners"
CHECK_EMPTY = "registry-empty"
CHECK_NETWORKS = "networks"

# What a reload (SIGHUP) changes while serving; any other field that differs is
# logged as needing a restart and keeps its running value.
RELOADABLE = ("rate_limit", "static_vendor_data", "log_level")


@dataclass
class RunningServer:
    cache: SiteCache
    servers: list[asyncio.AbstractServer]
    addresses: list[ListenAddress]
    ticker: Ticker
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    health: Health = field(default_factory=Health)
    # The configuration a reload compares with: the edge's, as it built it.
    config: ServeConfig | None = None
    buckets: Buckets | None = None
    # With --metrics-listen: the numbers, and where they are served (the main process).
    metrics: ServeMetrics | None = None
    ops: OpsServer | None = None
    export: ExportSockets | None = None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.ops is not None:
            await self.ops.close()
        if self.export is not None:
            self.export.close()
        self.ticker.close()
        for srv in self.servers:
            srv.close()
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        self.cache.close()

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let requests in flight finish within ``drain_timeout``
        seconds (idle keep-alive connections close at once), then close."""
        for srv in self.servers:
            srv.close()
        await drain([self.ticker], drain_timeout)
        await self.close()

    def reconfigure(self, new: ServeConfig) -> list[str]:
        """Apply a reloaded configuration: what can change while serving changes
        (without dropping a connection), the rest is logged and kept. Returns what
        changed, for the log."""
        old = self.config
        if old is None:
            raise ValueError("reconfigure needs the running configuration")
        changed: list[str] = []
        restart = restart_needed(old, new, RELOADABLE)
        rate_limit = old.rate_limit
        if new.rate_limit != old.rate_limit:
            if self.buckets is not None and new.rate_limit is not None:
                self.buckets.set_limit(new.rate_limit)
                rate_limit = new.rate_limit
                changed.append(f"rate limit {_rate_text(old)} -> {_rate_text(new)}")
            else:
                # The fast path was built with or without a bucket table.
                restart.append("rate_limit (turned on or off)")
        if new.static_vendor_data != old.static_vendor_data:
            options = dataclasses.replace(self.cache.render_options, static_vendor_data=new.static_vendor_data)
            self.cache.set_render_options(options)
            changed.append("static vendor data")
        log_level = old.log_level
        if new.log_level is not None and new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
            log_level = new.log_level
            before = logging.getLevelName(old.log_level) if old.log_level is not None else "unset"
            changed.append(f"log level {before} -> {logging.getLevelName(new.log_level)}")
        warn_restart_needed(restart)
        self.config = dataclasses.replace(
            old, rate_limit=rate_limit, static_vendor_data=new.static_vendor_data, log_level=log_level
        )
        return changed


def _rate_text(config: ServeConfig) -> str:
    limit = config.rate_limit
    return "off" if limit is None else f"{limit.rate:g}/{limit.burst}"


def render_options(config: ServeConfig) -> RenderOptions:
    signer = None
    if config.identity_key_dir is not None:
        from meta169.identity import RsaIdentitySigner, load_identity_key

        signer = RsaIdentitySigner(load_identity_key(config.identity_key_dir))
    return RenderOptions(
        static_vendor_data=config.static_vendor_data, account_id=config.account_id, identity_signer=signer
    )


async def start(
    config: ServeConfig,
    *,
    registry: Registry | None = None,
    sockets: list[socket.socket] | None = None,
    health: Health | None = None,
    announce: bool = True,
    export: ExportSockets | None = None,
) -> RunningServer:
    """Open (or adopt) the listeners and start serving on the running loop.

    With ``config.metrics_listen`` it counts, and serves /metrics, /healthz and
    /readyz there; ``export`` is what ``run()`` opened before forking (a worker
    reports to the main process instead of listening).

    Keeps the readiness checks in ``health`` (the module docstring lists them).
    An empty registry and listeners naming nothing in it are served (their guests
    get 404) with a warning now and every minute while it lasts, unless
    ``announce`` is False (a worker process: the main one says it).
    """
    reg = registry if registry is not None else open_registry(config.registry_url)
    metrics = ServeMetrics() if config.metrics_listen is not None else None
    access = AccessLog(config.access_log_sample) if config.access_log_sample else None
    cache = SiteCache(
        reg,
        render_options(config),
        max_sites=config.site_cache_size,
        prerender=prerender_scope(config) if config.prerender else None,
        vendordata_targets=config.vendordata_targets,
        vendordata_timeout=config.vendordata_timeout,
        metrics=metrics,
    )
    socks = sockets if sockets is not None else [open_listen_socket(s.address) for s in config.listeners]
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    addresses: list[ListenAddress] = []
    ring = config.token_keys if config.token_keys is not None else KeyRing.generate()
    buckets = Buckets(config.rate_limit) if config.rate_limit is not None else None
    tracker = ConnectionTracker()
    ticker = Ticker(loop, config.limits)
    # The compiled path's random seeds come from the same generator as Python's.
    wire.set_seed_source(seed_pool_bytes)
    try:
        for spec, sock in zip(config.listeners, socks, strict=True):
            secret = None
            if spec.binding.kind == "proxy" and sock.family != socket.AF_UNIX:
                if config.proxy_secret is None:
                    raise ConfigError(
                        f"proxy listener {spec.address} on TCP needs a shared secret (--proxy-secret-file)"
                    )
                secret = config.proxy_secret
            app = MetadataApp(
                cache,
                spec.binding,
                proxy_secret=secret,
                token_keys=ring,
                default_options=config.default_metadata_options,
                buckets=buckets,
                neutron_secret=config.neutron_secret if spec.binding.kind == "neutron" else None,
                metrics=metrics,
                access_log=access,
            )
            factory = _protocol_factory(app, config.limits, tracker, loop, ticker)
            srv: asyncio.AbstractServer
            if sock.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
                addresses.append(spec.address)
            else:
                srv = await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
                host, port = sock.getsockname()[:2]
                addresses.append(ListenAddress(host=host, port=port))
            servers.append(srv)
            log.info("listening on %s for %s", addresses[-1], spec.binding.scope)
    except BaseException:
        ticker.close()
        for opened in servers:
            opened.close()
        for sock in socks:
            sock.close()
        cache.close()
        raise
    if not wire.compiled():
        log.warning(
            "compiled fast path not built (needs gcc and Python headers at install): all requests take "
            "the Python path, several times slower"
        )
    running = RunningServer(
        cache, servers, addresses, ticker, health=health if health is not None else Health(), config=config
    )
    running.buckets = buckets
    running.metrics = metrics
    try:
        await _watch_registry(running, config, announce=announce)
        if metrics is not None and config.metrics_listen is not None:
            await _export(running, metrics, export or ExportSockets.open(config.metrics_listen))
    except BaseException:
        await running.close()
        raise
    return running


async def _export(running: RunningServer, metrics: ServeMetrics, sockets: ExportSockets) -> None:
    """Serve the operations endpoints, or, in a worker, answer the main process's scrapes."""
    running.export = sockets
    running.ops, answering = await export_metrics(sockets, "serve", metrics, running.health)
    if answering is not None:
        running._tasks.append(answering)


def prerender_scope(config: ServeConfig) -> Scope:
    """Whose sites to render ahead: the listeners' networks and routers, or every
    instance when a listener takes callers of any (a proxy or Neutron binding)."""
    kinds = {s.binding.kind for s in config.listeners}
    if kinds - {"network", "router"}:
        return Scope(everything=True)
    return Scope(
        networks=frozenset(s.binding.id for s in config.listeners if s.binding.kind == "network"),
        routers=frozenset(s.binding.id for s in config.listeners if s.binding.kind == "router"),
    )


async def _watch_registry(running: RunningServer, config: ServeConfig, *, announce: bool) -> None:
    """Set the readiness checks and start the tasks that keep them: the registry
    poll, its freshness, the empty registry, the networks listeners name."""
    cache, health = running.cache, running.health
    loop = asyncio.get_running_loop()
    health.set(CHECK_LISTENERS, True, f"{len(running.addresses)} listening")
    shown = describe_registry_url(config.registry_url)

    async def empty() -> str | None:
        if not await cache.run_blocking(cache.registry.has_instances):
            return f"registry {shown} holds no instances: every guest gets 404 until an import"
        return None

    bindings = [s.binding for s in config.listeners if s.binding.kind in ("network", "router")]

    async def missing() -> str | None:
        absent = await cache.run_blocking(_missing_bindings, cache.registry, bindings)
        if absent:
            return f"listeners name {', '.join(absent)}, not in the registry: their guests get 404 until it is imported"
        return None

    # One check is enough: the main process asks, not each worker.
    checks = [Recheck(health, CHECK_EMPTY, empty, until_resolved=True)] if announce else []
    if bindings:
        checks.append(Recheck(health, CHECK_NETWORKS, missing, warn=announce))
    for check in checks:
        await check.first()  # RegistryError here: the registry cannot be read, do not start
    health.set(CHECK_REGISTRY, True)
    last_answer = loop.time()
    # The poll's first revision is read after the checks above: a change made in
    # between shows in no poll, so the first poll checks again whatever it finds.
    first = True

    def on_poll(changed: bool, error: RegistryError | None) -> None:
        nonlocal last_answer, first
        if error is not None:
            health.set(CHECK_REGISTRY, False, f"the last poll failed: {error}")
            return
        last_answer = loop.time()
        health.set(CHECK_REGISTRY, True)
        if changed or first:
            first = False
            for check in checks:
                check.poke()

    def on_registry_state(up: bool, detail: str) -> None:
        nonlocal last_answer
        if up:
            last_answer = loop.time()
        health.set(CHECK_REGISTRY, up, detail)

    cache.on_registry_state = on_registry_state

    # A poll stuck on an unreachable database never reports; the clock does. While
    # the change feed is connected the poll runs every RELAXED_POLL_S only.
    def stale_after() -> float:
        return max(5.0, 10 * config.poll_interval, 3 * RELAXED_POLL_S if cache.listening else 0.0)

    async def freshness() -> None:
        while True:
            age = loop.time() - last_answer
            fresh = age < stale_after()
            health.set(CHECK_POLL, fresh, "" if fresh else f"no registry answer for {age:.0f} s")
            await asyncio.sleep(max(1.0, config.poll_interval))

    running._tasks.append(loop.create_task(cache.poll_forever(config.poll_interval, on_poll)))
    feed = cache.registry.change_feed() if config.registry_listen else None
    if feed is not None:
        running._tasks.append(loop.create_task(cache.listen_forever(feed, on_poll)))
    running._tasks.append(loop.create_task(freshness()))
    running._tasks.extend(loop.create_task(check.run()) for check in checks)
    cache.start()


def _missing_bindings(registry: Registry, bindings: Sequence[Binding]) -> list[str]:
    absent: list[str] = []
    for binding in bindings:
        try:
            if binding.kind == "network":
                registry.get_network(binding.id)
            else:
                registry.get_router(binding.id)
        except NotFound:
            absent.append(binding.scope)
    return absent


def refuse_empty(config: ServeConfig) -> None:
    """RegistryError when the registry holds no instances and that is not allowed:
    a server that would answer every guest 404 must not look healthy."""
    if config.allow_empty:
        return
    registry = open_registry(config.registry_url)
    try:
        empty = not registry.has_instances()
    finally:
        registry.close()
    if empty:
        raise RegistryError(empty_refusal(config.registry_url))


def empty_refusal(registry_url: str) -> str:
    return (
        f"{describe_registry_url(registry_url)} holds no instances, so every guest would get 404; "
        f"import an inventory first, or pass --allow-empty"
    )


def _protocol_factory(
    app: MetadataApp, limits: Limits, tracker: ConnectionTracker, loop: asyncio.AbstractEventLoop, ticker: Ticker
) -> Callable[[], HTTPProtocol]:
    fast = app.fast_path(limits)
    # Counted or logged: the app behind a wrapper; else nothing in the way.
    handler = app.handle_observed if app.observed else app

    def factory() -> HTTPProtocol:
        return HTTPProtocol(handler, limits, tracker, fast, loop, ticker)

    return factory


def run(
    config: ServeConfig,
    *,
    workers: int = 1,
    on_ready: Callable[[list[ListenAddress]], None] | None = None,
    notifier: Notifier | None = None,
    health: Health | None = None,
    reload: Callable[[], ServeConfig] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain (``config.drain_timeout``). With
    ``workers`` > 1, fork that many processes; the main one passes every signal on
    to the others and waits for them.

    ``notifier`` (systemd's, built at the edge) hears READY=1 once every process
    serves and the registry answered, then WATCHDOG=1 while every loop turns;
    RELOADING=1 and READY=1 around a reload, STOPPING=1 at a stop. ``health`` gets
    the readiness checks. ``reload`` builds the configuration again (the edge
    reads its flags, environment and config file anew) when SIGHUP comes; without
    it SIGHUP changes nothing. Raises RegistryError, before listening, for an
    empty registry unless ``config.allow_empty``.
    """
    # SIGHUP's default action is to terminate: until the loop's handler is in
    # place (in every worker too) it changes nothing, which is right, as the
    # configuration being started is the newest.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    refuse_empty(config)
    edge = config
    sockets = [open_listen_socket(s.address) for s in config.listeners]
    if config.token_keys is None:
        # Made before forking so every worker accepts the others' tokens.
        config = dataclasses.replace(config, token_keys=KeyRing.generate())
    # Bound before forking, so a busy metrics address fails before any worker exists.
    export = ExportSockets.open(config.metrics_listen, workers=workers) if config.metrics_listen else None
    link, children = fork_workers(workers, notifier if notifier is not None else Notifier())
    if export is not None:
        export.forked(children, main=isinstance(link, MainLink))
    stopping_since: float | None = None
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            stopping_since = runner.run(
                _serve_until_signal(config, edge, sockets, on_ready, link, health, reload, children, export)
            )
    finally:
        # The loop restored SIGHUP's default action when it closed.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        link.close()
        reap(children, config.drain_timeout)
    if stopping_since is not None:
        log.info("stopped after %.1f s", time.monotonic() - stopping_since)


async def _serve_until_signal(
    config: ServeConfig,
    edge: ServeConfig,
    sockets: list[socket.socket],
    on_ready: Callable[[list[ListenAddress]], None] | None,
    link: ServiceLink,
    health: Health | None,
    reload: Callable[[], ServeConfig] | None,
    children: Sequence[int],
    export: ExportSockets | None = None,
) -> float:
    """Serve until a stop signal, drain, and return when the stop began (monotonic)."""
    # In place before the sockets serve: a stop asked while starting (guests are
    # already being answered) drains like any other.
    signals = Signals(None, forward=children)
    signals.install()
    running = await start(config, sockets=sockets, health=health, announce=isinstance(link, MainLink), export=export)
    running.config = edge

    async def on_reload() -> None:
        assert reload is not None
        await reload_config(reload, running.reconfigure, link.notifier)

    signals.set_reload(on_reload if reload is not None else None)
    if not signals.stop.is_set():
        # Ready means the registry answers too, not only that the sockets are bound.
        revision = await running.cache.run_blocking(running.cache.registry.revision)
        if on_ready is not None:
            on_ready(running.addresses)
        processes = f" in {link.workers} processes" if link.workers > 1 else ""
        await ready_unless_stopped(
            link, f"serving {len(running.addresses)} listeners{processes}, registry revision {revision}", signals.stop
        )
    await signals.stop.wait()
    since = time.monotonic()
    # Workers exit now on purpose, which the main process must not take for a crash;
    # systemd stops watching the watchdog once STOPPING=1 arrives.
    link.stopping()
    link.notifier.stopping(f"{signals.received}: draining connections")
    await running.shutdown(config.drain_timeout)
    return since
