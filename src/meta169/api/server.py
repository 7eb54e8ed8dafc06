"""Run the metadata plane: open listeners, share one site cache, poll for changes.

``start()`` is the programmatic entry (tests use it on loopback); ``run()`` is what
``meta169 serve`` calls: it installs uvloop, handles signals and optionally forks
worker processes that share the listening sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from meta169.api.cache import SiteCache
from meta169.api.config import ServeConfig
from meta169.api.metadata import MetadataApp
from meta169.api.ratelimit import Buckets
from meta169.api.tokens import KeyRing
from meta169.errors import ConfigError
from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.listen import LISTEN_BACKLOG, ListenAddress, open_listen_socket
from meta169.http.loop import loop_factory
from meta169.http.protocol import ConnectionTracker, HTTPProtocol, Ticker
from meta169.registry import Registry, open_registry
from meta169.render import RenderOptions
from meta169.render.document import seed_pool_bytes

log = logging.getLogger("meta169.serve")


@dataclass
class RunningServer:
    cache: SiteCache
    servers: list[asyncio.AbstractServer]
    addresses: list[ListenAddress]
    ticker: Ticker
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.ticker.close()
        for srv in self.servers:
            srv.close()
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        self.cache.close()


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
) -> RunningServer:
    """Open (or adopt) the listeners and start serving on the running loop."""
    reg = registry if registry is not None else open_registry(config.registry_url)
    cache = SiteCache(
        reg,
        render_options(config),
        vendordata_targets=config.vendordata_targets,
        vendordata_timeout=config.vendordata_timeout,
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
    running = RunningServer(cache, servers, addresses, ticker)
    running._tasks.append(loop.create_task(cache.poll_forever(config.poll_interval)))
    return running


def _protocol_factory(
    app: MetadataApp, limits: Limits, tracker: ConnectionTracker, loop: asyncio.AbstractEventLoop, ticker: Ticker
) -> Callable[[], HTTPProtocol]:
    fast = app.fast_path(limits)

    def factory() -> HTTPProtocol:
        return HTTPProtocol(app, limits, tracker, fast, loop, ticker)

    return factory


def run(
    config: ServeConfig,
    *,
    workers: int = 1,
    on_ready: Callable[[list[ListenAddress]], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. With ``workers`` > 1, fork that many processes."""
    sockets = [open_listen_socket(s.address) for s in config.listeners]
    if config.token_keys is None:
        # Made before forking so every worker accepts the others' tokens.
        config = dataclasses.replace(config, token_keys=KeyRing.generate())
    children: list[int] = []
    if workers > 1:
        for _ in range(workers - 1):
            pid = os.fork()
            if pid == 0:
                children = []
                break
            children.append(pid)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_serve_until_signal(config, sockets, on_ready))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


async def _serve_until_signal(
    config: ServeConfig,
    sockets: list[socket.socket],
    on_ready: Callable[[list[ListenAddress]], None] | None,
) -> None:
    running = await start(config, sockets=sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(running.addresses)
    await stop.wait()
    await running.close()
