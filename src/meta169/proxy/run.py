"""Run ``meta169 proxy``: build the desired listener set from its sources, reconcile
it every second, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meta169.errors import ConfigError, RegistryError, ValidationError
from meta169.http.listen import Binding
from meta169.model import parse_ip
from meta169.proxy.server import (
    ProxyListener,
    ProxyServer,
    listeners_from_topology,
    load_listener_file,
    netns_exists,
    watch,
)
from meta169.proxy.upstream import Upstream, UpstreamSpec

log = logging.getLogger("meta169.proxy")


@dataclass(frozen=True)
class ProxyConfig:
    upstream: UpstreamSpec
    secret: bytes | None = field(default=None, repr=False)
    static: tuple[ProxyListener, ...] = ()
    listener_file: Path | None = None
    registry_url: str | None = None
    interval: float = 1.0


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


async def serve_proxy(config: ProxyConfig, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None) -> None:
    server = ProxyServer(Upstream(config.upstream), secret=config.secret)
    source = desired_listeners(config)
    initial = source()
    errors = await server.reconcile(initial)
    for err in errors:
        log.error("%s", err)
    if on_ready is not None:
        on_ready(len(server.listeners))
    try:
        await watch(server, source, interval=config.interval, stop=stop)
    finally:
        await server.close()


def run_proxy(config: ProxyConfig, on_ready: Callable[[int], None] | None = None) -> None:
    from meta169.http.loop import loop_factory

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_proxy(config, stop, on_ready)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
