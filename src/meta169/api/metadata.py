"""The metadata plane: identify the caller, find its site, answer the path.

Owns method rules, the password API and the mapping of typed errors to statuses.
Does not own framing (``http``), identity parsing (``api.identity``) or document
content (``render``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from urllib.parse import unquote

from meta169.api import tokens
from meta169.api.cache import MISS_AMBIGUOUS, Miss, SiteCache
from meta169.api.identity import NeutronIdentity, caller_from_proxy_headers, neutron_identity
from meta169.api.ratelimit import Buckets, retry_after
from meta169.api.tokens import TOKEN_HEADER, TTL_HEADER, KeyRing
from meta169.errors import ConfigError, Conflict, HTTPError, NotFound, RegistryError
from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.listen import Binding
from meta169.http.message import Fast, Request, Response, document_head, error_response
from meta169.http.stamp import (
    HDR_CALLER_IP,
    HDR_HOP_LIMIT,
    HDR_NETWORK,
    HDR_ROUTER,
    IDENTITY_PREFIX,
    ReplayGuard,
    verify,
)
from meta169.model import Caller, MetadataOptions
from meta169.render import Site, is_password_path
from meta169.render.document import SEED_TEXT_BYTES, Document, SeededJSON

log = logging.getLogger("meta169.api")

# Nova's password API: at most 4 chunks of 255 bytes [openstack/nova api/metadata/password.py].
PASSWORD_MAX = 4 * 255
_READ_METHODS = frozenset(("GET", "HEAD"))
_ALLOW = (("Allow", "GET, HEAD"),)

# The request headers whose presence or value can change a GET or HEAD answer on a
# network, router or proxy listener (read here, in api.identity and in api.tokens;
# tests/unit/test_owned_headers.py holds the lists to their source). The compiled
# fast path answers only GET and HEAD on those listeners and repeats only answers
# given without any of these, so it declines every request that carries one
# (http.wire); on a proxy socket it reads the stamp itself (HDR_CALLER_IP with
# HDR_NETWORK or HDR_ROUTER).
PYTHON_OWNED_HEADERS = frozenset(
    (TOKEN_HEADER,)  # IMDSv2: a token that is sent must be valid, else 401
)
# Headers read only where the fast path never answers, so they cannot make it repeat
# a stale answer: the token PUT, and listeners bound to a Neutron metadata agent
# (which have no fast path). Neutron's own haproxy sends X-Forwarded-For with every
# GET; leaving it to the fast path keeps that path as cheap as a guest's.
NOT_ON_THE_FAST_PATH = frozenset(
    (
        TTL_HEADER,  # IMDSv2 token PUT
        "x-forwarded-for",  # a token PUT relayed from inside the guest is refused; Neutron's hop
        "x-instance-id",  # the Neutron agent's identity (api.identity.neutron_identity)
        "x-instance-id-signature",
        "x-tenant-id",
    )
)
# Every X-Meta169-* header: the trusted proxy's stamp and markers, refused from anyone else.
PYTHON_OWNED_PREFIXES = (IDENTITY_PREFIX,)


def _describe(caller: Caller | NeutronIdentity) -> str:
    if isinstance(caller, NeutronIdentity):
        return f"instance {caller.instance_id} of tenant {caller.tenant_id} (Neutron, for {caller.forwarded_for})"
    return f"{caller.ip} on {caller.scope}"


def _token_path_kind(path: str) -> str:
    """ "latest" for the token path, "dated" for /<version>/api/token, "" otherwise."""
    stripped = path.rstrip("/")
    if not stripped.endswith("/api/token"):
        return ""
    version = stripped[1 : -len("/api/token")]
    if version == "latest":
        return "latest"
    return "dated" if "/" not in version else ""


class MetadataApp:
    """One per listener: knows the listener's binding, shares the site cache."""

    __slots__ = (
        "_binding",
        "_buckets",
        "_cache",
        "_defaults",
        "_direct",
        "_guard",
        "_neutron",
        "_ring",
        "_scope",
        "_secret",
        "_wire",
    )

    def __init__(
        self,
        cache: SiteCache,
        binding: Binding,
        *,
        proxy_secret: bytes | None = None,
        token_keys: KeyRing | None = None,
        default_options: MetadataOptions | None = None,
        buckets: Buckets | None = None,
        neutron_secret: bytes | None = None,
    ) -> None:
        self._cache = cache
        self._binding = binding
        self._scope = binding.scope
        self._direct: tuple[str, str] | None = None
        if binding.kind == "network":
            self._direct = (binding.id, "")
        elif binding.kind == "router":
            self._direct = ("", binding.id)
        # Set for a proxy binding on TCP: every request must carry a fresh HMAC.
        self._secret = proxy_secret
        self._guard = ReplayGuard() if proxy_secret is not None else None
        self._ring = token_keys if token_keys is not None else KeyRing.generate()
        self._defaults = default_options if default_options is not None else MetadataOptions()
        self._buckets = buckets
        if binding.kind == "neutron" and not neutron_secret:
            raise ConfigError("a neutron listener needs a non-empty shared secret (--neutron-secret-file)")
        self._neutron = neutron_secret
        # Whether replies may be remembered for the compiled fast path: on network and
        # router listeners, and on a proxy's Unix socket, where the stamp is trusted
        # as sent (over TCP every request's HMAC must be checked in Python).
        self._wire = self._direct is not None or (binding.kind == "proxy" and proxy_secret is None)

    def fast_path(self, limits: Limits) -> wire.Answer | None:
        """The compiled answer for repeated document requests, or None (Neutron and
        HMAC listeners, or no extension)."""
        if not self._wire:
            return None
        buckets = self._buckets.table if self._buckets is not None else None
        sites: wire.SiteSlots | dict[str, wire.SiteSlots]
        routers: dict[str, wire.SiteSlots] | None
        stamp: tuple[str, str, str] | None = None
        if self._direct is not None:
            sites = self._cache.wire_sites(*self._direct)
            routers = None
        else:
            sites, routers = self._cache.wire_scopes
            stamp = (HDR_CALLER_IP, HDR_NETWORK, HDR_ROUTER)
        return wire.fast_path(
            sites,
            buckets,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            max_url_bytes=limits.max_url_bytes,
            owned=PYTHON_OWNED_HEADERS,
            owned_prefixes=PYTHON_OWNED_PREFIXES,
            routers=routers,
            stamp=stamp,
        )

    def __call__(self, req: Request) -> Response | Fast | Awaitable[Response | Fast]:
        direct = self._direct
        if direct is not None and req.peer_key:
            # Hot path for a network/router listener: the cache key needs no Caller.
            if req.identity_header:
                return error_response(403, "identity headers are accepted only from the trusted proxy")
            key: tuple[str, str, object] = (direct[0], direct[1], req.peer_key)
            entry = self._cache.by_caller.get(key)
            if entry is not None:
                return self._answer(req, None, entry)
            return self._slow(req, self._identify(req), key)
        try:
            if self._neutron is not None:
                return self._neutron_request(req, self._neutron)
            caller = self._identify(req)
        except HTTPError as exc:
            return error_response(exc.status, str(exc))
        key = (caller.network_id or "", caller.router_id or "", caller.ip)
        entry = self._cache.by_caller.get(key)
        if entry is None:
            return self._slow(req, caller, key)
        return self._answer(req, caller, entry)

    def _neutron_request(self, req: Request, secret: bytes) -> Response | Fast | Awaitable[Response | Fast]:
        ident = neutron_identity(req.headers, secret)
        key = ("neutron", ident.instance_id, ident.tenant_id)
        entry = self._cache.by_caller.get(key)
        if entry is None:
            return self._slow(req, ident, key)
        return self._answer(req, ident, entry)

    def _identify(self, req: Request) -> Caller:
        headers = req.headers
        if self._binding.kind == "proxy":
            if self._secret is not None:
                assert self._guard is not None
                verify(self._secret, headers, req.method, req.raw_path.decode("latin-1"), self._guard)
            return caller_from_proxy_headers(headers)
        if req.identity_header:
            raise HTTPError(403, "identity headers are accepted only from the trusted proxy")
        if req.peer is None:
            raise HTTPError(400, "no peer address")
        if self._binding.kind == "network":
            return Caller(ip=req.peer, network_id=self._binding.id)
        return Caller(ip=req.peer, router_id=self._binding.id)

    async def _slow(
        self, req: Request, caller: Caller | NeutronIdentity, key: tuple[str, str, object]
    ) -> Response | Fast:
        try:
            entry = await self._cache.lookup(key, caller)
        except RegistryError as exc:
            log.error("registry failure resolving %s: %s", _describe(caller), exc)
            return error_response(503, "metadata registry unavailable")
        result = self._answer(req, caller, entry)
        if isinstance(result, Response | tuple):
            return result
        return await result

    def _answer(
        self, req: Request, caller: Caller | NeutronIdentity | None, entry: Site | Miss
    ) -> Response | Fast | Awaitable[Response | Fast]:
        if isinstance(entry, Miss):
            if caller is None:
                caller = self._identify(req)
            # Nova answers 404 for an unknown instance; say in the log which network
            # and IP had none: the first thing an operator asks when a guest gets no keys.
            if entry.reason == MISS_AMBIGUOUS:
                log.error("refusing ambiguous caller: %s", entry.error)
            else:
                log.warning("no instance for caller %s", _describe(caller))
            return error_response(404)
        if self._buckets is not None:
            wait = self._buckets.take(entry.instance.uuid)
            if wait:
                return error_response(429, headers=(("Retry-After", retry_after(wait)),))
        raw = req.raw_path
        qpos = raw.find(b"?")
        if qpos >= 0:
            raw = raw[:qpos]
        path = raw.decode("latin-1")
        if "%" in path:
            try:
                path = unquote(path, errors="strict")
            except UnicodeDecodeError:
                return error_response(400, "path is not UTF-8 after percent-decoding")
        method = req.method
        instance = entry.instance
        options = instance.metadata_options or self._defaults
        if options.http_endpoint == "disabled":
            # EC2: with the endpoint disabled the instance gets 403 on every path.
            return error_response(403, "instance metadata endpoint disabled")
        # Hot path: an exact document hit needs none of the token-path or password
        # rules below (neither is ever a document), only the token check.
        doc = entry.documents.get(path)
        if doc is None and len(path) > 1 and path[-1] == "/":
            # Listings are asked for with a trailing slash (cloud-init's crawl).
            doc = entry.documents.get(path[:-1])
        if doc is not None and method in _READ_METHODS:
            if self._unauthorized(req, options, instance.uuid):
                return error_response(401)
            body = doc.body if doc.fresh is None else doc.fresh()
            reply = (document_head(doc.content_type, len(body)), body)
            if self._wire and options.http_tokens != "required" and b"%" not in raw:
                # Without a token this caller gets this same reply: let the fast path repeat it.
                self._remember(req, caller, entry, raw, doc, reply)
            return reply
        token_path = _token_path_kind(path)
        if token_path:
            return self._token(req, instance.uuid, options, dated=token_path == "dated")
        if self._unauthorized(req, options, instance.uuid):
            return error_response(401)
        if is_password_path(path):
            return self._password(req, entry)
        if method not in _READ_METHODS:
            if entry.lookup(path) is None:
                return error_response(404)
            return Response(405, b"405 Method Not Allowed\n", headers=_ALLOW)
        doc = entry.lookup(path)
        if doc is None:
            return error_response(404)
        body = doc.fresh() if doc.fresh is not None else doc.body
        return Response(200, body, doc.content_type)

    def _remember(
        self, req: Request, caller: Caller | NeutronIdentity | None, site: Site, raw: bytes, doc: Document, reply: Fast
    ) -> None:
        key: tuple[str, str, object]
        if self._direct is not None:
            peer = req.peer_key
            key = (self._direct[0], self._direct[1], peer)
        elif isinstance(caller, Caller):
            # The fast path finds the caller by the stamp's text as sent.
            peer = req.headers[HDR_CALLER_IP].strip()
            key = (caller.network_id or "", caller.router_id or "", caller.ip)
        else:
            return
        if doc.fresh is None:
            entry: wire.WireEntry = reply
        elif isinstance(doc.fresh, SeededJSON):
            fresh = doc.fresh
            entry = (reply[0], fresh.head, fresh.tail)
            if len(fresh.head) + SEED_TEXT_BYTES + len(fresh.tail) != len(reply[1]):
                return
        else:
            return
        self._cache.remember_wire(key, peer, site, raw, entry)

    def _unauthorized(self, req: Request, options: MetadataOptions, uuid: str) -> bool:
        """IMDSv2: a token that is sent must be valid; with ``required`` one must be sent."""
        token = req.headers.get(TOKEN_HEADER)
        if token is None:
            return options.http_tokens == "required"
        return not tokens.is_valid(self._ring, token, uuid)

    def _token(self, req: Request, uuid: str, options: MetadataOptions, *, dated: bool) -> Response:
        if req.method != "PUT":
            return Response(405, b"405 Method Not Allowed\n", headers=(("Allow", "PUT"),))
        if dated:
            # Only /latest/api/token issues tokens (EC2 user guide).
            return error_response(403)
        if self._binding.kind == "proxy":
            forwarded = "x-meta169-guest-forwarded" in req.headers
        elif self._binding.kind == "neutron":
            # The agent adds one X-Forwarded-For hop itself; a second came from the guest.
            forwarded = "," in req.headers.get("x-forwarded-for", "")
        else:
            forwarded = "x-forwarded-for" in req.headers
        if forwarded:
            # A token PUT relayed by a proxy inside the guest (SSRF, containers behind
            # NAT) is refused outright (EC2 user guide, IMDSv2 X-Forwarded-For rule).
            return error_response(403)
        ttl = tokens.parse_ttl(req.headers.get(TTL_HEADER))
        if ttl is None:
            return error_response(400, f"{TTL_HEADER} must be an integer in 1..21600")
        token = tokens.issue(self._ring, uuid, ttl)
        hop = options.http_put_response_hop_limit
        headers: tuple[tuple[str, str], ...] = (("X-aws-ec2-metadata-token-ttl-seconds", str(ttl)),)
        if self._binding.kind == "proxy":
            # The proxy owns the guest-facing socket: it applies the TTL there.
            return Response(200, token.encode(), headers=(*headers, (HDR_HOP_LIMIT, str(hop))))
        return Response(200, token.encode(), headers=headers, ip_ttl=hop)

    async def _password(self, req: Request, site: Site) -> Response:
        uuid = site.instance.uuid
        try:
            if req.method in _READ_METHODS:
                password = await self._cache.run_blocking(self._cache.registry.get_password, uuid)
                return Response(200, password.encode(), "text/plain; charset=utf-8")
            # Nova: anything but GET and POST is a bad request, not 405.
            if req.method != "POST":
                return error_response(400, "password accepts GET and POST only")
            if len(req.body) > PASSWORD_MAX:
                return error_response(400, f"password longer than {PASSWORD_MAX} bytes")
            try:
                text = req.body.decode("utf-8")
            except UnicodeDecodeError:
                return error_response(400, "password must be UTF-8")
            await self._cache.run_blocking(self._cache.registry.set_password, uuid, text)
            return Response(200, b"")
        except Conflict:
            return error_response(409, "password already set")
        except NotFound:
            return error_response(404)
        except RegistryError as exc:
            log.error("password store failed for %s: %s", uuid, exc)
            return error_response(503, "metadata registry unavailable")
