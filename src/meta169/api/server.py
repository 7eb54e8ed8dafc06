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
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meta169.api import wire
from meta169.api.cache import SiteCache
from meta169.api.http import ConnectionTracker, HTTPProtocol, Limits, Ticker
from meta169.api.metadata import MetadataApp
from meta169.api.ratelimit import Buckets
from meta169.api.tokens import KeyRing
from meta169.config import ListenAddress, ServeConfig
from meta169.errors import ConfigError
from meta169.registry import Registry, open_registry
from meta169.render import RenderOptions
from meta169.render.document import seed_pool_bytes

log = logging.getLogger("meta169.serve")

# Connections waiting to be accepted. Given again to create_server: uvloop listens
# anew with its own backlog (100 by default), which a burst of per-request
# connections (Neutron's haproxy, a proxy opening its pool) overflows into EAGAIN.
LISTEN_BACKLOG = 4096


def open_listen_socket(address: ListenAddress, *, reuse_port: bool = False) -> socket.socket:
    """Bind a listening socket (TCP or Unix); errors name the address."""
    if address.unix_path is not None:
        return _open_unix(address.unix_path)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _open_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        else:
            raise ConfigError(f"cannot listen on unix:{path}: a non-socket file is in the way")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o117)  # srw-rw----: trust comes from who may connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


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
        log.warning("compiled fast path not built (needs gcc and Python headers at install): all requests take "
                    "the Python path, several times slower")
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


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
