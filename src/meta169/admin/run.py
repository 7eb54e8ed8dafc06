"""Run ``meta169 admin``: listen, serve the admin API until SIGTERM or SIGINT, drain.

Refuses a registry without instances unless ``allow_empty`` (then warns at start
and every minute while it stays empty, and the ``registry-empty`` readiness check
fails). SIGHUP rebuilds the configuration and applies the token (a rotated token
file) and the log level; a stop lets requests in flight (an import) finish within
the drain timeout (``http.lifecycle``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meta169.admin.api import start_admin
from meta169.errors import ConfigError, RegistryError
from meta169.health import Health
from meta169.http.lifecycle import Recheck, Signals, drain, reload_config, restart_needed, warn_restart_needed
from meta169.http.listen import ListenAddress
from meta169.registry import Registry, describe_registry_url, open_registry
from meta169.sdnotify import Notifier, ping_watchdog

log = logging.getLogger("meta169.admin")

CHECK_EMPTY = "registry-empty"

# What a reload changes while serving; the address and the registry need a restart.
RELOADABLE = ("token", "allow_empty", "drain_timeout", "log_level")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    registry_url: str
    address: ListenAddress
    # The bearer token, read from a 0600 file; never printed.
    token: bytes = field(repr=False)
    # Start on a registry without instances (to fill it through this API).
    allow_empty: bool = False
    # Seconds a stop waits for requests in flight before closing them.
    drain_timeout: float = 10.0
    # The root logger's level; None: as the edge set it. A reload applies a change.
    log_level: int | None = None
    # /metrics, /healthz and /readyz on a listener of their own; None: off.
    metrics_listen: ListenAddress | None = None
    # The largest request body: an import's inventory (a restart applies a change).
    max_body_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.address.unix_path is not None:
            raise ConfigError("--listen: the admin API listens on TCP HOST:PORT")
        if len(self.token) < 16:
            raise ConfigError("the admin token must be at least 16 bytes")


def run_admin(
    config: AdminConfig,
    *,
    on_ready: Callable[[str, int], None] | None = None,
    notifier: Notifier | None = None,
    health: Health | None = None,
    reload: Callable[[], AdminConfig] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain; SIGHUP reloads with ``reload``.

    Raises RegistryError before listening when the registry holds no instances,
    unless ``config.allow_empty``; ConfigError when the address cannot be bound.
    """
    from meta169.http.loop import loop_factory

    # SIGHUP's default action is to terminate: ignored until the handler is in place.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    registry = open_registry(config.registry_url)
    try:
        if not config.allow_empty and not registry.has_instances():
            raise RegistryError(
                f"{describe_registry_url(config.registry_url)} holds no instances; import an inventory first, "
                f"or pass --allow-empty to fill it through the admin API"
            )
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            since = runner.run(
                _serve(
                    config,
                    registry,
                    on_ready,
                    notifier if notifier is not None else Notifier(),
                    health if health is not None else Health(),
                    reload,
                )
            )
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        registry.close()
    log.info("stopped after %.1f s", time.monotonic() - since)


async def _serve(
    config: AdminConfig,
    registry: Registry,
    on_ready: Callable[[str, int], None] | None,
    notifier: Notifier,
    health: Health,
    reload: Callable[[], AdminConfig] | None,
) -> float:
    from meta169.metrics.endpoint import Exporter, OpsServer, start_ops
    from meta169.metrics.instruments import AdminMetrics

    address = config.address
    metrics = AdminMetrics() if config.metrics_listen is not None else None
    # In place before the socket serves: a stop asked while starting drains too.
    signals = Signals(None)
    signals.install()
    try:
        server, app, ticker = await start_admin(
            registry, config.token, (address.host, address.port), max_body=config.max_body_bytes, metrics=metrics
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc
    running = config
    tasks: list[asyncio.Task[None]] = []
    ops: OpsServer | None = None
    try:
        if metrics is not None and config.metrics_listen is not None:
            ops = await start_ops(config.metrics_listen, Exporter("admin", metrics), health)

        def reconfigure(new: AdminConfig) -> list[str]:
            nonlocal running
            old = running
            warn_restart_needed(restart_needed(old, new, RELOADABLE))
            changed: list[str] = []
            if new.token != old.token:
                app.set_token(new.token)
                changed.append("token")
            if new.log_level is not None and new.log_level != old.log_level:
                logging.getLogger().setLevel(new.log_level)
                changed.append(f"log level {logging.getLevelName(new.log_level)}")
            changed += [f"{name.replace('_', ' ')}" for name in ("allow_empty", "drain_timeout")
                        if getattr(old, name) != getattr(new, name)]  # fmt: skip
            running = dataclasses.replace(old, **{name: getattr(new, name) for name in RELOADABLE})
            return changed

        async def on_reload() -> None:
            assert reload is not None
            await reload_config(reload, reconfigure, notifier)

        signals.set_reload(on_reload if reload is not None else None)
        host, port = server.sockets[0].getsockname()[:2]
        if on_ready is not None:
            on_ready(host, port)

        async def empty() -> str | None:
            if not await app.run_blocking(registry.has_instances):
                return f"registry {describe_registry_url(config.registry_url)} holds no instances"
            return None

        check = Recheck(health, CHECK_EMPTY, empty, until_resolved=True)
        await check.first()
        tasks.append(asyncio.get_running_loop().create_task(check.run()))
        # Ready once the registry answers, not only once the socket is bound.
        revision = await app.revision()
        notifier.ready(f"admin API on {host}:{port}, registry revision {revision}")
        tasks.append(asyncio.get_running_loop().create_task(ping_watchdog(notifier)))
        await signals.stop.wait()
        since = time.monotonic()
        notifier.stopping("draining connections")
        server.close()
        await drain([ticker], running.drain_timeout)
        return since
    finally:
        for task in tasks:
            task.cancel()
        if ops is not None:
            await ops.close()
        server.close()
        ticker.close()
        app.close()
