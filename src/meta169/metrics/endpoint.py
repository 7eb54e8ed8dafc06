"""The operations listener: ``/metrics``, ``/healthz`` and ``/readyz``.

One small handler on :class:`~meta169.http.protocol.HTTPProtocol`, served by the
server's own event loop (no thread): ``/healthz`` answering at all shows the loop
turns, and a scrape reads the instruments where they are counted, without a lock.

- ``GET /metrics``: the Prometheus text exposition (version 0.0.4) of this process
  and, for ``serve --workers N``, of every worker (``metrics.workers``);
- ``GET /healthz``: 200 ``ok`` while the process is alive and its loop turns;
- ``GET /readyz``: 200 when every readiness check passes, else 503; the body is the
  JSON of :meth:`meta169.health.Health.report` either way.

Anything else is 404, a method other than GET or HEAD 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

from meta169.health import Health
from meta169.http.limits import Limits
from meta169.http.listen import LISTEN_BACKLOG, ListenAddress, open_listen_socket
from meta169.http.message import Request, Response, error_response
from meta169.http.protocol import HTTPProtocol, Ticker
from meta169.metrics.core import CONTENT_TYPE, Metrics, exposition, merge
from meta169.metrics.instruments import info_family
from meta169.metrics.workers import WorkerHub

log = logging.getLogger("meta169.metrics")

_ALLOW = (("Allow", "GET, HEAD"),)
# Scrapers and probes send small requests and nothing else.
_LIMITS = Limits(max_header_bytes=8192, max_body_bytes=0, request_timeout=10.0, keepalive_timeout=60.0)


def _version() -> str:
    try:
        return importlib_metadata.version("meta169")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


class Exporter:
    """What one process's ``/metrics`` shows: its metrics, its workers' and who it is."""

    def __init__(self, role: str, metrics: Metrics, hub: WorkerHub | None = None) -> None:
        self.role = role
        self.metrics = metrics
        self.hub = hub
        self._version = _version()

    async def scrape(self) -> bytes:
        snapshots = [self.metrics.snapshot()]
        if self.hub is not None:
            snapshots.extend(await self.hub.gather())
        families = merge(snapshots)
        families.extend(info_family(self.role, self._version, len(snapshots)))
        return exposition(families)


class OpsApp:
    """The handler of the operations listener."""

    __slots__ = ("_exporter", "_health")

    def __init__(self, exporter: Exporter, health: Health | None = None) -> None:
        self._exporter = exporter
        self._health = health

    def __call__(self, req: Request) -> Response | Awaitable[Response]:
        path = req.raw_path.partition(b"?")[0]
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            return error_response(404)
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"405 Method Not Allowed\n", headers=_ALLOW)
        if path == b"/healthz":
            return Response(200, b"ok\n")
        if path == b"/readyz":
            return self._ready()
        return self._metrics()

    def _ready(self) -> Response:
        health = self._health
        report = health.report() if health is not None else {"ready": True, "checks": {}}
        body = (json.dumps(report, sort_keys=True) + "\n").encode()
        return Response(200 if report["ready"] else 503, body, "application/json")

    async def _metrics(self) -> Response:
        return Response(200, await self._exporter.scrape(), CONTENT_TYPE)


@dataclass
class OpsServer:
    """A running operations listener."""

    address: ListenAddress
    _server: asyncio.AbstractServer
    _ticker: Ticker

    async def close(self) -> None:
        self._ticker.close()
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


@dataclass
class ExportSockets:
    """What a server that forks workers opens before forking: the operations
    listener (ConfigError, naming the address, when it cannot be bound: before any
    worker exists) and, with workers, the hub they report to."""

    sock: socket.socket | None
    hub: WorkerHub | None = None
    worker: bool = False

    @classmethod
    def open(cls, address: ListenAddress, *, workers: int = 1) -> ExportSockets:
        sock = open_listen_socket(address)
        try:
            hub = WorkerHub() if workers > 1 else None
        except OSError:
            sock.close()
            raise
        return cls(sock, hub)

    def forked(self, workers: Iterable[int], *, main: bool) -> None:
        """Once forked. The main process accepts these worker pids on the hub; a worker
        reports to the hub and serves no listener."""
        if main:
            if self.hub is not None:
                self.hub.as_main(workers)
            return
        self.worker = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.hub is not None:
            self.hub.as_worker()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.hub is not None:
            self.hub.close()


async def export_metrics(
    sockets: ExportSockets, role: str, metrics: Metrics, health: Health | None = None
) -> tuple[OpsServer | None, asyncio.Task[None] | None]:
    """Start what this process does for ``/metrics``: in the main process, the
    operations listener on the socket opened before forking (it owns it from now on)
    and the hub its workers report to; in a worker, its answers to the hub's
    scrapes. Returns the listener or the answering task, for the caller to stop."""
    if sockets.worker:
        if sockets.hub is None:
            return None, None
        return None, asyncio.get_running_loop().create_task(sockets.hub.answer(metrics.snapshot))
    assert sockets.sock is not None
    ops = await start_ops(sockets.sock, Exporter(role, metrics, sockets.hub), health)
    sockets.sock = None
    if sockets.hub is not None:
        sockets.hub.start()
    return ops, None


async def start_ops(
    where: ListenAddress | socket.socket, exporter: Exporter, health: Health | None = None
) -> OpsServer:
    """Serve the operations endpoints on the running loop."""
    sock = where if isinstance(where, socket.socket) else open_listen_socket(where)
    loop = asyncio.get_running_loop()
    app = OpsApp(exporter, health)
    ticker = Ticker(loop, _LIMITS)
    try:
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(
                lambda: HTTPProtocol(app, _LIMITS, loop=loop, ticker=ticker), sock=sock, backlog=LISTEN_BACKLOG
            )
            address = ListenAddress(unix_path=Path(sock.getsockname()))
        else:
            server = await loop.create_server(
                lambda: HTTPProtocol(app, _LIMITS, loop=loop, ticker=ticker), sock=sock, backlog=LISTEN_BACKLOG
            )
            host, port = sock.getsockname()[:2]
            address = ListenAddress(host=host, port=port)
    except BaseException:
        ticker.close()
        sock.close()
        raise
    log.info("metrics on http://%s/metrics, health on /healthz and /readyz", address)
    return OpsServer(address, server, ticker)
