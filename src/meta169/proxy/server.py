"""``meta169 proxy``: one process, one event loop, listeners in many namespaces.

Each listener is a socket opened inside a router or DHCP namespace (enter, bind,
come back: the socket stays there) and knows the router or network it serves. For
every request the proxy strips guest-supplied identity headers, stamps the caller's
source IP and scope, and forwards to ``serve``. Listeners are reconciled against a
desired set (a watched file, or the registry) as namespaces come and go.

Must not know about rendering or the registry's storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meta169.errors import ConfigError, PlumbingError, ValidationError
from meta169.http import wire
from meta169.http.acceptor import Listener
from meta169.http.limits import Limits
from meta169.http.listen import Binding
from meta169.http.message import Request, Response, error_response
from meta169.http.protocol import FastHook, HTTPProtocol, Later, Ticker
from meta169.http.stamp import (
    HDR_CALLER_IP,
    HDR_HOP_LIMIT,
    HDR_NETWORK,
    HDR_ROUTER,
    HDR_SIGNATURE,
    HOP_BY_HOP,
    IDENTITY_HEADER_PREFIXES,
    IDENTITY_HEADERS,
    is_identity_header,
    sign_stamp,
)
from meta169.metrics.core import Family
from meta169.metrics.instruments import ProxyMetrics
from meta169.model import IPAddress, check_id, parse_ip
from meta169.proxy.upstream import IDEMPOTENT, Reply, Upstream

log = logging.getLogger("meta169.proxy")


@dataclass(frozen=True, slots=True)
class ProxyListener:
    """Where to listen (namespace, address, port) and for which router or network."""

    binding: Binding
    address: IPAddress
    port: int
    netns: str | None = None
    # Scope of an IPv6 link-local address (fe80::a9fe:a9fe on the DHCP port).
    interface: str | None = None

    def __post_init__(self) -> None:
        if self.binding.kind == "proxy":
            raise ValidationError("a proxy listener is bound to a network or a router")
        if not 1 <= self.port <= 65535:
            raise ValidationError(f"listener port {self.port} out of range")
        if self.netns is not None:
            check_id("namespace", self.netns)

    @property
    def key(self) -> tuple[str | None, str, int]:
        return (self.netns, f"{self.address}%{self.interface}" if self.interface else str(self.address), self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.netns or 'host'}:{host}:{self.port} -> {self.binding.scope}"


def parse_listeners(data: object, *, source: str) -> list[ProxyListener]:
    """``{"listeners": [{"netns", "address", "port", "network"|"router"}]}``."""
    if not isinstance(data, dict) or not isinstance(data.get("listeners"), list):
        raise ConfigError(f"{source}: expected an object with a 'listeners' list")
    out: list[ProxyListener] = []
    for i, item in enumerate(data["listeners"]):
        where = f"{source}: listeners[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object")
        unknown = set(item) - {"netns", "address", "port", "network", "router", "interface"}
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
        try:
            if ("network" in item) == ("router" in item):
                raise ValidationError("give exactly one of network or router")
            binding = Binding("network", item["network"]) if "network" in item else Binding("router", item["router"])
            out.append(
                ProxyListener(
                    binding=binding,
                    address=parse_ip(item.get("address", "0.0.0.0")),
                    port=int(item.get("port", 9697)),
                    netns=item.get("netns"),
                    interface=item.get("interface"),
                )
            )
        except (ValidationError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return out


SocketOpener = Callable[[ProxyListener], Awaitable[socket.socket]]


async def open_in_namespace(listener: ProxyListener, *, shared: bool = False) -> socket.socket:
    """Open the listening socket inside the listener's namespace, off the loop thread.
    ``shared``: each worker of ``proxy --workers N`` opens its own (SO_REUSEPORT)."""
    from meta169.plumbing.netns import open_socket_in_netns

    family = socket.AF_INET6 if listener.address.version == 6 else socket.AF_INET
    if listener.netns is None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((str(listener.address), listener.port))
        sock.listen(1024)
        sock.setblocking(False)
        return sock
    netns = listener.netns

    def opener() -> socket.socket:
        return open_socket_in_netns(
            netns,
            family,
            socket.SOCK_STREAM,
            listener.address,
            listener.port,
            # A v6 wildcard listener next to a v4 one on the same port: keep them apart.
            v6only=True if family == socket.AF_INET6 else None,
            interface=listener.interface,
            backlog=1024,
            reuse_port=shared,
        )

    sock = await asyncio.to_thread(opener)
    # A blocking listener would make the loop's accept() wait for the next client
    # once the backlog is drained: every accept must fail fast with EAGAIN.
    sock.setblocking(False)
    return sock


class ProxyApp:
    """The per-listener request handler: synchronous up to the upstream write; the
    upstream connection hands the reply to the guest's connection (no task, no
    future per request)."""

    __slots__ = ("_binding", "_metrics", "_scope_header", "_scope_text", "_secret", "_upstream")

    def __init__(
        self, binding: Binding, upstream: Upstream, secret: bytes | None, metrics: ProxyMetrics | None = None
    ) -> None:
        self._binding = binding
        self._upstream = upstream
        self._secret = secret
        self._metrics = metrics
        # The stamp's scope half never changes for a listener: encode it once.
        if binding.kind == "network":
            self._scope_header = f"{HDR_NETWORK}: {binding.id}"
            self._scope_text = f"network:{binding.id}"
        else:
            self._scope_header = f"{HDR_ROUTER}: {binding.id}"
            self._scope_text = f"router:{binding.id}"

    def fast_path(self, limits: Limits, key: object = None) -> FastHook | None:
        """The compiled stamping of simple GET/HEAD requests (http.wire), or None: over
        TCP every request is signed here in Python, and without the extension. Its
        count of requests is read at scrape time under ``key`` (the listener's)."""
        if self._secret is not None:
            return None
        forward = wire.stamper(
            drop=HOP_BY_HOP | _NOT_FORWARDED | IDENTITY_HEADERS,
            prefixes=IDENTITY_HEADER_PREFIXES,
            marker_for="x-forwarded-for",
            marker=_GUEST_FORWARDED,
            before=f"host: metadata\r\n{HDR_CALLER_IP}: ",
            after=f"\r\n{self._scope_header}\r\n\r\n",
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            max_url_bytes=limits.max_url_bytes,
        )
        if forward is None:
            return None
        if self._metrics is not None:
            self._metrics.stampers[key] = wire.stamped(forward)

        def fast(data: bytes, peer: str) -> Request | None:
            stamped = forward(data, peer)
            if stamped is None:
                return None
            payload, head, keep_alive, target = stamped
            req = Request("HEAD" if head else "GET", target, {}, b"", peer, keep_alive)
            req.prepared = payload
            return req

        return fast

    def __call__(self, req: Request) -> Response | Later:
        if not req.peer_key:
            return error_response(400, "no peer address")
        if req.prepared is not None:
            later = Later()
            # The stamped request is always a body-less GET (a HEAD is asked as GET).
            self._upstream.request(
                req.prepared,
                _relay_head if req.method == "HEAD" else _relay,
                later,
                pipeline=True,
                affinity=hash((req.peer_key, self._scope_text)),
            )
            return later
        if self._metrics is not None:
            self._metrics.requests.inc(_VIA_PYTHON)
        # Listener sockets are AF_INET or v6-only AF_INET6, so the peer text is the
        # caller's address as the registry knows it (never an IPv4-mapped form).
        peer = req.peer_key
        path = req.raw_path.decode("latin-1")
        method = req.method
        # HEAD is relayed as GET and the body cut here: the reply parser cannot know
        # that a HEAD reply's Content-Length announces a body that never comes.
        upstream_method = "GET" if method == "HEAD" else method
        lines = [f"{upstream_method} {path} HTTP/1.1"]
        for name, value in req.headers.items():
            if name in HOP_BY_HOP or name in _NOT_FORWARDED:
                continue
            if is_identity_header(name):
                # The one bit of guest-sent forwarding the server must still see:
                # IMDSv2 refuses a token PUT that came through a proxy in the guest.
                if name == "x-forwarded-for":
                    lines.append(_GUEST_FORWARDED)
                continue
            lines.append(f"{name}: {value}")
        lines.append("host: metadata")
        lines.append(f"{HDR_CALLER_IP}: {peer}")
        lines.append(self._scope_header)
        if self._secret is not None:
            lines.append(f"{HDR_SIGNATURE}: {sign_stamp(self._secret, peer, self._scope_text, upstream_method, path)}")
        if req.body or upstream_method != "GET":
            lines.append(f"content-length: {len(req.body)}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body
        later = Later()
        pipeline = upstream_method == "GET" and not req.body
        self._upstream.request(
            payload,
            _relay_head if method == "HEAD" else _relay,
            later,
            pipeline=pipeline,
            idempotent=upstream_method in IDEMPOTENT,
            # One node answers each caller: its cache, tokens and rate limit are there.
            affinity=hash((peer, self._scope_text)),
        )
        return later


_VIA_PYTHON = ("python",)
_NOT_FORWARDED = frozenset(("content-length", "host"))
_GUEST_FORWARDED = "X-Meta169-Guest-Forwarded: 1"
_HOP_PREFIX = HDR_HOP_LIMIT.encode()


def _relay(reply: Reply) -> Response | bytes:
    raw = reply.raw
    hop = reply.headers.get(HDR_HOP_LIMIT)
    if hop is None:
        return raw  # relayed as it is
    head, _, body = raw.partition(b"\r\n\r\n")
    head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(_HOP_PREFIX))
    ttl: int | None = None
    with contextlib.suppress(ValueError):
        ttl = max(1, min(255, int(hop)))
    return Response(reply.status, raw=head + b"\r\n\r\n" + body, ip_ttl=ttl)


def _relay_head(reply: Reply) -> Response | bytes:
    relayed = _relay(reply)
    if isinstance(relayed, bytes):
        return relayed.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert relayed.raw is not None
    relayed.raw = relayed.raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    return relayed


@dataclass
class ProxyServer:
    """Owns the listeners; ``reconcile`` makes the open set equal the desired set."""

    upstream: Upstream
    secret: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    opener: SocketOpener = open_in_namespace
    # Counted when given: connections, requests, listeners per namespace (read at scrape time).
    metrics: ProxyMetrics | None = None
    _servers: dict[tuple[str | None, str, int], tuple[ProxyListener, Listener]] = field(default_factory=dict)
    _ticker: Ticker | None = None
    # Listeners the last reconcile was asked for, per namespace ("" for the host's).
    _expected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.metrics is not None:
            self.metrics.reader(self._listener_families)

    def _listener_families(self) -> Iterable[Family]:
        # With workers, each holds every listener of its own: the fewest of them.
        opened = Family(
            "meta169_proxy_listeners_open",
            "gauge",
            'Listeners open, per network namespace (netns="": the host\'s); with --workers, the fewest '
            "a worker has open.",
            ("netns",),
            merge="min",
        )
        expected = Family(
            "meta169_proxy_listeners_expected",
            "gauge",
            'Listeners the sources ask for, per network namespace (netns="": the host\'s).',
            ("netns",),
            merge="min",
        )
        for netns, count in self._expected.items():
            expected.values[(netns,)] = float(count)
            opened.values[(netns,)] = 0.0
        for lst, _ in self._servers.values():
            key = (lst.netns or "",)
            opened.values[key] = opened.values.get(key, 0.0) + 1
        upstream = Family(
            "meta169_proxy_upstream_connections_open", "gauge", "Connections to serve open (pooled or busy)."
        )
        upstream.values[()] = float(self.upstream.open_connections)
        return (opened, expected, upstream)

    @property
    def listeners(self) -> list[ProxyListener]:
        return [lst for lst, _ in self._servers.values()]

    @property
    def ticker(self) -> Ticker | None:
        """The timer of the guests' connections, which knows every one open (a drain
        waits on it); None before the first listener."""
        return self._ticker

    async def reconcile(self, desired: Iterable[ProxyListener]) -> list[str]:
        """Open what is missing, close what is gone. Returns per-listener errors
        (a namespace that vanished must not stop the others)."""
        want = {lst.key: lst for lst in desired}
        self._expected = Counter(lst.netns or "" for lst in want.values())
        errors: list[str] = []
        for key in list(self._servers):
            current, srv = self._servers[key]
            if key not in want or want[key].binding != current.binding:
                srv.close()
                del self._servers[key]
                if self.metrics is not None:
                    self.metrics.forget_stamper(key)
                log.info("closed listener %s", current)
        loop = asyncio.get_running_loop()
        if self._ticker is None:
            self._ticker = Ticker(loop, self.limits)
        for key, lst in want.items():
            if key in self._servers:
                continue
            try:
                sock = await self.opener(lst)
            except (PlumbingError, OSError) as exc:
                errors.append(f"{lst}: {exc}")
                log.error("cannot open listener %s: %s", lst, exc)
                continue
            app = ProxyApp(lst.binding, self.upstream, self.secret, self.metrics)
            srv = Listener(loop, sock, _factory(app, self.limits, loop, self._ticker, key, self.metrics))
            self._servers[key] = (lst, srv)
            log.info("listening %s", lst)
        return errors

    async def close(self) -> None:
        for _, srv in self._servers.values():
            srv.close()
        self._servers.clear()
        if self._ticker is not None:
            self._ticker.close()
        await self.upstream.close()


def _factory(
    app: ProxyApp,
    limits: Limits,
    loop: asyncio.AbstractEventLoop,
    ticker: Ticker,
    key: object = None,
    metrics: ProxyMetrics | None = None,
) -> Callable[[], HTTPProtocol]:
    fast = app.fast_path(limits, key)
    if metrics is None:
        return lambda: HTTPProtocol(app, limits, fast=fast, loop=loop, ticker=ticker)
    connections = metrics.connections

    def counted() -> HTTPProtocol:
        connections.inc()
        return HTTPProtocol(app, limits, fast=fast, loop=loop, ticker=ticker)

    return counted


def load_listener_file(path: Path) -> list[ProxyListener]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read listener file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_listeners(data, source=str(path))


def _yaml(text: str) -> object:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def netns_exists(name: str, run_dir: Path = Path("/run/netns")) -> bool:
    return (run_dir / name).exists()


def listeners_from_topology(
    routers: Sequence[tuple[str, Sequence[str]]],
    networks: Sequence[str],
    *,
    router_ns: str = "qrouter-{id}",
    dhcp_ns: str = "qdhcp-{id}",
    port: int = 9697,
) -> list[ProxyListener]:
    """Neutron's convention: a router namespace gets 0.0.0.0:9697 behind the REDIRECT;
    a network no router serves gets 169.254.169.254:80 in its DHCP namespace."""
    out: list[ProxyListener] = []
    routed: set[str] = set()
    for router_id, nets in routers:
        routed.update(nets)
        out.append(
            ProxyListener(
                Binding("router", router_id), ipaddress.ip_address("0.0.0.0"), port, router_ns.format(id=router_id)
            )
        )
    for net in networks:
        if net not in routed:
            out.append(
                ProxyListener(
                    Binding("network", net), ipaddress.ip_address("169.254.169.254"), 80, dhcp_ns.format(id=net)
                )
            )
    return out


async def watch(
    server: ProxyServer,
    source: Callable[[], list[ProxyListener]],
    *,
    interval: float = 1.0,
    stop: asyncio.Event,
) -> None:
    """Re-read the desired listeners every ``interval`` and reconcile."""
    last: list[tuple[tuple[str | None, str, int], str]] | None = None
    while not stop.is_set():
        try:
            desired = await asyncio.to_thread(source)
            fingerprint = sorted((lst.key, lst.binding.scope) for lst in desired)
            if fingerprint != last or len(server.listeners) != len(desired):
                await server.reconcile(desired)
                last = fingerprint
        except ConfigError as exc:
            log.error("listener source: %s (keeping current listeners)", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
