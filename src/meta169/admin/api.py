"""The admin HTTP API: list, show, create, update and delete what the registry holds.

Authenticated by a bearer token read from a file (compared in constant time), and
meant for a management network or loopback, never a tenant network. Bodies use the
inventory format, so what ``meta169 import`` accepts, the API accepts:

=======  ===========================  =========================================
method   path                         what
=======  ===========================  =========================================
GET      /v1/instances                a page of instances (inventory form)
GET      /v1/instances/UUID           one instance
PUT      /v1/instances/UUID           create or replace one instance (JSON)
DELETE   /v1/instances/UUID           remove it and its ports
GET      /v1/networks                 all networks
GET      /v1/networks/ID              one network
PUT      /v1/networks/ID              create or replace one network (JSON)
DELETE   /v1/networks/ID              remove it; 409 while a port or router uses it
GET      /v1/routers                  all routers
GET      /v1/routers/ID               one router
PUT      /v1/routers/ID               create or replace one router (JSON)
DELETE   /v1/routers/ID               remove it
POST     /v1/import                   an inventory document (JSON or YAML)
GET      /v1/health                   no auth; 200 with the registry revision
=======  ===========================  =========================================

A PUT body is one inventory entry; the id (``uuid`` for an instance) may be left out
and is then the path's. It is checked as ``meta169 import`` checks that entry (a
router's networks must exist, a port's IPs must be in its network's subnets and
free), and written only when it differs. Without a ``source`` a new entry is the
API's (``admin``) and a replaced one keeps the owner it has; an entry naming another
source than the stored one's is a 409, as an import's is.

The instance list pages as Nova's list APIs do: ``?limit=N`` (default and at most
1000, Nova's ``[api] max_limit``) and ``?marker=UUID``, the last uuid of the previous
page; instances come in uuid order. The body stays a JSON list; when the page is
full, a ``Link: <...>; rel="next"`` header (RFC 8288) gives the next page's URL.

An import is one transaction: all of it is written, or (400, 409, 503) none.
Its body may be as large as the server's ``--max-body-mib``.

Errors: 401 without a valid token, 400 for an invalid body (the inventory error,
naming the entry and field) or query, 404 unknown, 409 conflicts (the reason in
``error``: a network still used names the instances or routers using it; a network
whose new subnets would leave out a port's address names the instances and
addresses), 503 registry failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from meta169.errors import Conflict, InventoryError, NotFound, RegistryError, ValidationError
from meta169.http.message import Request, Response, error_response
from meta169.inventory import (
    apply_inventory,
    format_import_report,
    instance_to_dict,
    network_to_dict,
    parse_document,
    parse_inventory,
    router_to_dict,
)
from meta169.metrics.instruments import AdminMetrics
from meta169.registry import Registry

if TYPE_CHECKING:
    from meta169.http.protocol import Ticker

log = logging.getLogger("meta169.admin")
T = TypeVar("T")
JSON = "application/json"


def _json(status: int, value: Any) -> Response:
    return Response(status, (json.dumps(value, indent=2) + "\n").encode(), JSON)


class AdminApp:
    """Handler for :class:`meta169.http.protocol.HTTPProtocol`; registry calls run on one thread."""

    def __init__(self, registry: Registry, token: bytes, metrics: AdminMetrics | None = None) -> None:
        if len(token) < 16:
            raise ValidationError("the admin token must be at least 16 bytes")
        self._registry = registry
        self._token = token
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meta169-admin")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def set_token(self, token: bytes) -> None:
        """Accept ``token`` from now on (a reload read the token file again)."""
        if len(token) < 16:
            raise ValidationError("the admin token must be at least 16 bytes")
        self._token = token

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run a registry call on the registry thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def revision(self) -> int:
        """The registry's revision, asked on the registry thread (raises RegistryError)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._registry.revision)

    def __call__(self, req: Request) -> Response | Awaitable[Response]:
        path = req.raw_path.decode("latin-1").split("?", 1)[0].rstrip("/")
        if path == "/v1/health" and req.method == "GET":
            return self._run(lambda: _json(200, {"status": "ok", "revision": self._registry.revision()}))
        if not self._authorized(req):
            return Response(401, b"401 Unauthorized\n", headers=(("WWW-Authenticate", "Bearer"),))
        parts = path.split("/")[1:]
        if parts[:1] != ["v1"] or len(parts) < 2:
            return error_response(404)
        route = _ROUTES.get((req.method, parts[1], len(parts) - 2))
        if route is None:
            known = any(k[1] == parts[1] and k[2] == len(parts) - 2 for k in _ROUTES)
            return error_response(405 if known else 404)
        answer = self._run(lambda: route(self._registry, parts[2:], req))
        kind = _WRITES.get(route)
        if kind is not None and self._metrics is not None:
            return self._counted(kind, answer, self._metrics)
        return answer

    @staticmethod
    async def _counted(kind: str, answer: Awaitable[Response], metrics: AdminMetrics) -> Response:
        resp = await answer
        metrics.writes.inc((kind, str(resp.status)))
        return resp

    def _authorized(self, req: Request) -> bool:
        header = req.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)

    async def _run(self, fn: Callable[[], Response]) -> Response:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except InventoryError as exc:
            return _json(400, {"error": str(exc), "entry": exc.entry, "field": exc.field})
        except ValidationError as exc:
            return _json(400, {"error": str(exc)})
        except NotFound as exc:
            return _json(404, {"error": str(exc)})
        except Conflict as exc:
            return _json(409, {"error": str(exc)})
        except RegistryError as exc:
            log.error("admin: registry failure: %s", exc)
            return _json(503, {"error": "registry unavailable"})


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body is not UTF-8") from exc


# Nova's default for ``[api] max_limit``: a page is at most this long.
MAX_LIMIT = 1000


def _page(req: Request) -> tuple[int, str | None]:
    """``limit`` and ``marker`` from the query; ValidationError (400) when invalid."""
    query = urllib.parse.parse_qs(req.raw_path.decode("latin-1").partition("?")[2], keep_blank_values=True)
    unknown = sorted(set(query) - {"limit", "marker"})
    if unknown:
        raise ValidationError(f"unknown query parameter {unknown[0]!r}: use limit and marker")
    limit = MAX_LIMIT
    if "limit" in query:
        text = query["limit"][-1]
        if not (text.isascii() and text.isdigit()):
            raise ValidationError(f"limit must be a non-negative integer, not {text[:20]!r}")
        # A limit above the maximum is the maximum, as Nova's max_limit makes it.
        limit = MAX_LIMIT if len(text) > len(str(MAX_LIMIT)) else min(int(text), MAX_LIMIT)
    marker = query["marker"][-1] if "marker" in query else None
    return limit, marker or None


def _list_instances(reg: Registry, _: list[str], req: Request) -> Response:
    limit, marker = _page(req)
    found = reg.list_instances(limit=limit, marker=marker)
    resp = _json(200, [instance_to_dict(i) for i in found])
    if found and len(found) == limit:
        query = urllib.parse.urlencode({"limit": limit, "marker": found[-1].uuid})
        return dataclasses.replace(resp, headers=(("Link", f'</v1/instances?{query}>; rel="next"'),))
    return resp


@dataclasses.dataclass(frozen=True, slots=True)
class _Kind:
    """One kind of entry the API reads and writes one at a time, in inventory form."""

    noun: str  # "instance"
    key: str  # "instances": the inventory's key, the path's collection, the report's field
    ident: str  # "uuid": the field that names an entry, and the path's argument
    get: Callable[[Registry, str], Any]
    delete: Callable[[Registry, str], None]
    to_dict: Callable[[Any], dict[str, Any]]


# Lambdas call the registry object's methods: Registry.get_network itself is the Protocol's stub.
_INSTANCE = _Kind(
    "instance",
    "instances",
    "uuid",
    lambda reg, uuid: reg.get_instance(uuid),
    lambda reg, uuid: reg.delete_instance(uuid),
    instance_to_dict,
)
_NETWORK = _Kind(
    "network",
    "networks",
    "id",
    lambda reg, ident: reg.get_network(ident),
    lambda reg, ident: reg.delete_network(ident),
    network_to_dict,
)
_ROUTER = _Kind(
    "router",
    "routers",
    "id",
    lambda reg, ident: reg.get_router(ident),
    lambda reg, ident: reg.delete_router(ident),
    router_to_dict,
)
_KINDS = (_INSTANCE, _NETWORK, _ROUTER)


def _get_one(kind: _Kind, reg: Registry, args: list[str], _: Request) -> Response:
    return _json(200, kind.to_dict(kind.get(reg, args[0])))


def _put_one(kind: _Kind, reg: Registry, args: list[str], req: Request) -> Response:
    text = _decode(req.body)
    try:
        entry = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"body is not JSON: {exc}") from exc
    if not isinstance(entry, dict):
        raise ValidationError(f"body must be one {kind.noun} as a JSON object")
    entry.setdefault(kind.ident, args[0])
    if str(entry[kind.ident]) != args[0]:
        raise ValidationError(f"body {kind.ident} {entry[kind.ident]} does not match the path {args[0]}")
    if entry.get("source") is None:  # `source: null` is no source, as in an inventory
        # An entry the API creates is the API's; an update keeps the owner it has.
        try:
            entry["source"] = kind.get(reg, args[0]).source
        except NotFound:
            entry["source"] = "admin"
    inventory = parse_document({kind.key: [entry]}, source="request body")
    report = apply_inventory(reg, inventory)
    (stored,) = getattr(inventory, kind.key)
    status = 201 if getattr(report, kind.key).created else 200
    return _json(status, kind.to_dict(kind.get(reg, getattr(stored, kind.ident))))


def _delete_one(kind: _Kind, reg: Registry, args: list[str], _: Request) -> Response:
    # A network a port or router still uses is the registry's Conflict (409), naming them.
    kind.delete(reg, args[0])
    return Response(204, b"")


def _list_networks(reg: Registry, _: list[str], __: Request) -> Response:
    return _json(200, [network_to_dict(n) for n in reg.list_networks()])


def _list_routers(reg: Registry, _: list[str], __: Request) -> Response:
    return _json(200, [router_to_dict(r) for r in reg.list_routers()])


def _import(reg: Registry, _: list[str], req: Request) -> Response:
    report = apply_inventory(reg, parse_inventory(_decode(req.body), source="request body"))
    return _json(200, {"report": format_import_report(report), "revision": report.revision})


Route = Callable[[Registry, list[str], Request], Response]
_PUTS: dict[str, Route] = {k.key: functools.partial(_put_one, k) for k in _KINDS}
_DELETES: dict[str, Route] = {k.key: functools.partial(_delete_one, k) for k in _KINDS}
# (method, collection, number of path arguments) -> handler
_ROUTES: dict[tuple[str, str, int], Route] = {
    ("GET", "instances", 0): _list_instances,
    ("GET", "networks", 0): _list_networks,
    ("GET", "routers", 0): _list_routers,
    **{("GET", k.key, 1): functools.partial(_get_one, k) for k in _KINDS},
    **{("PUT", key, 1): route for key, route in _PUTS.items()},
    **{("DELETE", key, 1): route for key, route in _DELETES.items()},
    ("POST", "import", 0): _import,
}


# The routes that write, by the kind meta169_admin_writes_total counts them as.
_WRITES: dict[Route, str] = {
    **{route: "put" for route in _PUTS.values()},
    **{route: "delete" for route in _DELETES.values()},
    _import: "import",
}


async def start_admin(
    registry: Registry,
    token: bytes,
    address: tuple[str, int],
    *,
    max_body: int = 4 << 20,
    metrics: AdminMetrics | None = None,
) -> tuple[asyncio.Server, AdminApp, Ticker]:
    """Listen on ``address`` (TCP) with the admin API; imports may be up to ``max_body``.
    Writes are counted in ``metrics`` when given.

    Returns the server, the app and the connections' timer, which knows every open
    connection (a stop drains them)."""
    from meta169.http.limits import Limits
    from meta169.http.protocol import HTTPProtocol, Ticker

    app = AdminApp(registry, token, metrics)
    limits = Limits(max_body_bytes=max_body, request_timeout=30.0)
    loop = asyncio.get_running_loop()
    ticker = Ticker(loop, limits)
    try:
        server = await loop.create_server(
            lambda: HTTPProtocol(app, limits, loop=loop, ticker=ticker), address[0], address[1]
        )
    except BaseException:
        ticker.close()
        app.close()
        raise
    return server, app, ticker
