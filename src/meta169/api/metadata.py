"""The metadata plane: identify the caller, find its site, answer the path.

Owns method rules, the password API and the mapping of typed errors to statuses.
Does not own framing (``http``), identity parsing (``api.identity``) or document
content (``render``).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Awaitable
from urllib.parse import unquote

from meta169.api import tokens
from meta169.api.cache import MISS_AMBIGUOUS, RETRY_AFTER_S, Miss, SiteCache
from meta169.api.identity import NeutronIdentity, caller_from_proxy_headers, neutron_identity
from meta169.api.ratelimit import Buckets, retry_after
from meta169.api.tokens import TOKEN_HEADER, TTL_HEADER, KeyRing
from meta169.errors import ConfigError, Conflict, HTTPError, NotFound, RegistryError, RegistryUnavailable
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
from meta169.logs import AccessLog
from meta169.metrics.core import status_class
from meta169.metrics.instruments import ServeMetrics, request_class
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
# (http.wire), except two it is given the means to check itself: on a proxy socket
# the stamp (HDR_CALLER_IP with HDR_NETWORK or HDR_ROUTER), and the IMDSv2 token,
# which it accepts only when this path has found that very token valid for the
# caller's instance and it has not expired since (tokens.Validated).
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

_HIT = ("hit",)
_MISS = ("miss",)
_VIA_PYTHON = ("python",)
# While the registry is unreachable a caller serve has not cached gets this, never
# 404: cloud-init takes a 404 as "no metadata service here" and gives up on the
# datasource, where a 503 is retried by the EC2 crawl and by SDKs.
_UNAVAILABLE_HEADERS = (("Retry-After", str(RETRY_AFTER_S)),)


def _describe(caller: Caller | NeutronIdentity) -> str:
    if isinstance(caller, NeutronIdentity):
        return f"instance {caller.instance_id} of tenant {caller.tenant_id} (Neutron, for {caller.forwarded_for})"
    return f"{caller.ip} on {caller.scope}"


_EC2_VERSION = re.compile(r"[0-9]+\.[0-9]+|[0-9]{4}-[0-9]{2}-[0-9]{2}")
_EC2_DIRECTORIES = frozenset(("meta-data", "dynamic"))
_KINDS: dict[bytes, tuple[str, str]] = {}


def request_kind(raw_path: bytes) -> tuple[str, str]:
    """(tree, kind) of a request path for the metrics: tree ``openstack``, ``ec2`` or
    ``other``; kind ``token``, ``user-data``, ``listing`` (a path ending in ``/``, a
    tree's root, a version, or an EC2 version's ``meta-data`` or ``dynamic``) or
    ``document``. A deeper EC2 directory asked without its slash counts as a
    document: clients follow the listings' ``name/`` entries with the slash."""
    known = _KINDS.get(raw_path)
    if known is not None:
        return known
    path = raw_path.partition(b"?")[0].decode("latin-1")
    segments = [s for s in path.split("/") if s]
    if segments[:1] == ["openstack"]:
        tree = "openstack"
    elif not segments or segments[0] == "latest" or _EC2_VERSION.fullmatch(segments[0]):
        tree = "ec2"
    else:
        tree = "other"
    if _token_path_kind(path):
        kind = "token"
    elif segments and segments[-1] in ("user-data", "user_data"):
        kind = "user-data"
    elif (
        path.endswith("/")
        or (tree == "openstack" and len(segments) <= 2)
        or (tree == "ec2" and (len(segments) <= 1 or (len(segments) == 2 and segments[1] in _EC2_DIRECTORIES)))
    ):
        kind = "listing"
    else:
        kind = "document"
    if len(_KINDS) >= 4096:  # paths a guest made up are not kept for ever
        _KINDS.clear()
    _KINDS[raw_path] = (tree, kind)
    return tree, kind


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
        "_access",
        "_answered",
        "_binding",
        "_buckets",
        "_cache",
        "_defaults",
        "_direct",
        "_guard",
        "_metrics",
        "_neutron",
        "_ring",
        "_scope",
        "_secret",
        "_validated",
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
        metrics: ServeMetrics | None = None,
        access_log: AccessLog | None = None,
        validated_tokens: tokens.Validated | None = None,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._access = access_log
        # For the access log: the request last answered from a site, and its instance.
        self._answered: tuple[Request, str] | None = None
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
        # The tokens this listener found valid, which its fast path may accept again.
        self._validated: tokens.Validated | None = None
        if self._wire:
            self._validated = validated_tokens if validated_tokens is not None else tokens.Validated()

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
        metrics = self._metrics
        answer = wire.fast_path(
            sites,
            buckets,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            max_url_bytes=limits.max_url_bytes,
            owned=PYTHON_OWNED_HEADERS,
            owned_prefixes=PYTHON_OWNED_PREFIXES,
            routers=routers,
            stamp=stamp,
            latency_bounds=metrics.duration.bounds if metrics is not None else None,
            tokens=self._validated.table if self._validated is not None else None,
            token_header=TOKEN_HEADER,
        )
        if answer is None:
            return None
        if metrics is not None:
            stats = wire.fast_stats(answer)
            if stats is not None:
                metrics.fast_paths.append(stats)
        if self._access is not None:
            return self._logged_fast(answer, self._access)
        return answer

    @property
    def observed(self) -> bool:
        """Whether requests are counted or logged: then the server's handler is
        :meth:`handle_observed`, else the app itself (nothing in the way)."""
        return self._metrics is not None or self._access is not None

    def __call__(self, req: Request) -> Response | Fast | Awaitable[Response | Fast]:
        direct = self._direct
        if direct is not None and req.peer_key:
            # Hot path for a network/router listener: the cache key needs no Caller.
            if req.identity_header:
                return error_response(403, "identity headers are accepted only from the trusted proxy")
            key: tuple[str, str, object] = (direct[0], direct[1], req.peer_key)
            entry = self._cache.by_caller.get(key)
            if entry is not None:
                if self._metrics is not None:
                    self._metrics.cache.inc(_HIT)
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
        if self._metrics is not None:
            self._metrics.cache.inc(_HIT)
        return self._answer(req, caller, entry)

    def _neutron_request(self, req: Request, secret: bytes) -> Response | Fast | Awaitable[Response | Fast]:
        ident = neutron_identity(req.headers, secret)
        key = ("neutron", ident.instance_id, ident.tenant_id)
        entry = self._cache.by_caller.get(key)
        if entry is None:
            return self._slow(req, ident, key)
        if self._metrics is not None:
            self._metrics.cache.inc(_HIT)
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
        if self._metrics is not None:
            self._metrics.cache.inc(_MISS)
        try:
            entry = await self._cache.lookup(key, caller)
        except RegistryUnavailable:
            # Logged once per outage by the cache, not once per guest.
            return error_response(503, "metadata registry unavailable", headers=_UNAVAILABLE_HEADERS)
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
            if self._metrics is not None:
                self._metrics.unknown_callers.inc((entry.reason,))
            return error_response(404)
        if self._access is not None:
            self._answered = (req, entry.instance.uuid)
        if self._metrics is not None and not self._cache.registry_up:
            self._metrics.stale_answers.inc()
        if self._buckets is not None:
            wait = self._buckets.take(entry.instance.uuid)
            if wait:
                if self._metrics is not None:
                    self._metrics.rate_limited.inc()
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
        doc = entry.get(path)
        if doc is None and len(path) > 1 and path[-1] == "/":
            # Listings are asked for with a trailing slash (cloud-init's crawl).
            doc = entry.get(path[:-1])
        if doc is not None and method in _READ_METHODS:
            if self._unauthorized(req, options, instance.uuid):
                return error_response(401)
            body = doc.body if doc.fresh is None else doc.fresh()
            reply = (document_head(doc.content_type, len(body)), body)
            if self._wire and b"%" not in raw:
                # Any request of this caller without a token (unless tokens are required)
                # or with one found valid gets this same reply: let the fast path repeat it.
                self._remember(req, caller, entry, raw, doc, reply, options.http_tokens == "required")
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
        self,
        req: Request,
        caller: Caller | NeutronIdentity | None,
        site: Site,
        raw: bytes,
        doc: Document,
        reply: Fast,
        tokens_required: bool,
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
        first = _wire_entry(raw, doc, len(reply[1]), reply[0])
        if first is None:
            return
        entries = [(raw, first)]
        if not self._cache.remembers_wire(key, peer, site, raw):
            # The first document this caller is answered of a version: the fast path
            # may answer every other document of that version too, as this path
            # would (the same site, the same token rule), so a guest's crawl, which
            # asks each document once, takes this path once per version and not
            # once per document (docs/benchmarks.md, boot storm).
            entries.extend(_section_entries(site, raw.decode("latin-1")))
        self._cache.remember_wire(key, peer, site, entries, tokens_required=tokens_required)

    def _unauthorized(self, req: Request, options: MetadataOptions, uuid: str) -> bool:
        """IMDSv2: a token that is sent must be valid; with ``required`` one must be sent."""
        token = req.headers.get(TOKEN_HEADER)
        if token is None:
            refused = options.http_tokens == "required"
            reason = "missing"
        else:
            expiry = tokens.valid_until(self._ring, token, uuid)
            refused = expiry is None
            reason = "invalid"
            if expiry is not None and self._validated is not None:
                # Found valid for this instance: the fast path may accept it until it expires.
                self._validated.add(token, uuid, expiry)
        if refused and self._metrics is not None:
            self._metrics.tokens_refused.inc((reason,))
        return refused

    def _token(self, req: Request, uuid: str, options: MetadataOptions, *, dated: bool) -> Response:
        metrics = self._metrics
        if req.method != "PUT":
            if metrics is not None:
                metrics.tokens_refused.inc(("method",))
            return Response(405, b"405 Method Not Allowed\n", headers=(("Allow", "PUT"),))
        if dated:
            # Only /latest/api/token issues tokens (EC2 user guide).
            if metrics is not None:
                metrics.tokens_refused.inc(("dated-path",))
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
            if metrics is not None:
                metrics.tokens_refused.inc(("forwarded",))
            return error_response(403)
        ttl = tokens.parse_ttl(req.headers.get(TTL_HEADER))
        if ttl is None:
            if metrics is not None:
                metrics.tokens_refused.inc(("ttl",))
            return error_response(400, f"{TTL_HEADER} must be an integer in 1..21600")
        token = tokens.issue(self._ring, uuid, ttl)
        if metrics is not None:
            metrics.tokens_issued.inc()
        if self._validated is not None:
            # The guest's next request carries it: let the fast path take that one too.
            expiry = tokens.valid_until(self._ring, token, uuid)
            if expiry is not None:
                self._validated.add(token, uuid, expiry)
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
        except RegistryUnavailable:
            return error_response(503, "metadata registry unavailable", headers=_UNAVAILABLE_HEADERS)
        except RegistryError as exc:
            log.error("password store failed for %s: %s", uuid, exc)
            return error_response(503, "metadata registry unavailable")

    # -- counting and the access log ---------------------------------------------------------
    def handle_observed(self, req: Request) -> Response | Fast | Awaitable[Response | Fast]:
        """The app, counted in the metrics and written to the access log."""
        started = time.perf_counter()
        try:
            result = self(req)
        except Exception:
            self._observe(req, 500, 0, started)
            raise
        if isinstance(result, tuple):
            self._observe(req, 200, len(result[1]), started)
            return result
        if isinstance(result, Response):
            self._observe(req, result.status, len(result.body), started)
            return result
        return self._observe_pending(req, result, started)

    async def _observe_pending(
        self, req: Request, pending: Awaitable[Response | Fast], started: float
    ) -> Response | Fast:
        try:
            result = await pending
        except Exception:
            self._observe(req, 500, 0, started)
            raise
        if isinstance(result, Response):
            self._observe(req, result.status, len(result.body), started)
        else:
            self._observe(req, 200, len(result[1]), started)
        return result

    def _observe(self, req: Request, status: int, size: int, started: float) -> None:
        took = time.perf_counter() - started
        metrics = self._metrics
        if metrics is not None:
            tree, kind = request_kind(req.raw_path)
            metrics.requests.inc((tree, kind, status_class(status), "python"))
            metrics.duration.observe(took, _VIA_PYTHON)
        access = self._access
        if access is not None and access.sampled():
            caller, network, router, instance = self._who(req)
            access.emit(
                caller=caller,
                network=network,
                router=router,
                instance=instance,
                method=req.method,
                path=req.raw_path.decode("latin-1"),
                status=status,
                size=0 if req.method == "HEAD" else size,
                duration=took,
                via="python",
            )

    def _who(self, req: Request) -> tuple[str, str, str, str]:
        """(caller IP, network id, router id, instance uuid) as the request names them,
        for the access log; the instance is the one whose site answered it (else the
        one the site cache holds for the caller now)."""
        answered, self._answered = self._answered, None
        if answered is not None and answered[0] is req:
            instance: str | None = answered[1]
        else:
            instance = None
        headers = req.headers
        if self._neutron is not None:
            caller = headers.get("x-forwarded-for", "").rpartition(",")[2].strip()
            return caller, "", "", instance if instance is not None else headers.get("x-instance-id", "")
        if self._direct is not None:
            network, router = self._direct
            key: tuple[str, str, object] = (network, router, req.peer_key)
            return req.peer_key, network, router, instance if instance is not None else self._instance_of(key)
        caller = headers.get(HDR_CALLER_IP, "").strip()
        network = headers.get(HDR_NETWORK, "").strip()
        router = headers.get(HDR_ROUTER, "").strip()
        if instance is not None:
            return caller, network, router, instance
        try:
            stamped = caller_from_proxy_headers(headers)
        except HTTPError:
            return caller, network, router, ""
        key = (stamped.network_id or "", stamped.router_id or "", stamped.ip)
        return caller, network, router, self._instance_of(key)

    def _instance_of(self, key: tuple[str, str, object]) -> str:
        entry = self._cache.by_caller.get(key)
        return entry.instance.uuid if isinstance(entry, Site) else ""

    def _logged_fast(self, answer: wire.Answer, access: AccessLog) -> wire.Answer:
        """``answer`` followed by an access log line for each request it answered.

        The compiled path stays on while the access log is: the lines are made from
        the request lines it consumed and the replies it wrote, paired in order
        (the fast path answers a prefix of the pipelined requests, one reply each).
        Sampling is decided per read, before the call: requests pipelined in one
        read are logged together or not at all, and one not sampled costs a random
        draw (parsing them for the log would cost ten times the answer)."""
        sampled = access.sampled

        def logged(data: bytes, peer: str) -> tuple[bytes, bool] | tuple[bytes, bool, int] | None:
            if not sampled():
                return answer(data, peer)
            started = time.perf_counter()
            reply = answer(data, peer)
            if reply is not None:
                self._log_fast(data, peer, reply[0], time.perf_counter() - started, access)
            return reply

        return logged

    def _log_fast(self, data: bytes, peer: str, replies: bytes, took: float, access: AccessLog) -> None:
        pos = rpos = 0
        while rpos < len(replies):
            end = data.find(b"\r\n\r\n", pos)
            rend = replies.find(b"\r\n\r\n", rpos)
            if end < 0 or rend < 0:
                return
            head, reply_head = data[pos:end], replies[rpos:rend]
            pos, rpos = end + 4, rend + 4
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0]
            length = _content_length(reply_head)
            size = 0 if method == b"HEAD" else length
            rpos += size
            caller, network, router, instance = self._who_fast(head, peer)
            access.emit(
                caller=caller,
                network=network,
                router=router,
                instance=instance,
                method=method.decode("latin-1"),
                path=target.decode("latin-1"),
                status=int(reply_head[9:12]),
                size=size,
                duration=took,
                via="fast",
            )

    def _who_fast(self, head: bytes, peer: str) -> tuple[str, str, str, str]:
        if self._direct is not None:
            network, router = self._direct
            slot = self._cache.wire_sites(network, router).get(peer)
            return peer, network, router, slot[1] if slot is not None else ""
        stamp: dict[str, str] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            stamp[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        caller = stamp.get(HDR_CALLER_IP, "")
        network, router = stamp.get(HDR_NETWORK, ""), stamp.get(HDR_ROUTER, "")
        networks, routers = self._cache.wire_scopes
        scope = networks.get(network, {}) if network else routers.get(router, {})
        slot = scope.get(caller)
        return caller, network, router, slot[1] if slot is not None else ""


def _content_length(head: bytes) -> int:
    at = head.find(b"Content-Length: ")
    if at < 0:
        return 0
    digits = head[at + 16 : head.find(b"\r\n", at)] if head.find(b"\r\n", at) >= 0 else head[at + 16 :]
    return int(digits) if digits.isdigit() else 0


def _wire_entry(raw: bytes, doc: Document, length: int, head: bytes | None = None) -> wire.WireEntry | None:
    """What the fast path answers ``raw`` with: ``doc``, of ``length`` bytes, under
    ``head`` (made when not given); None for a document made afresh otherwise than by
    a seed (the fast path cannot)."""
    if head is None:
        head = document_head(doc.content_type, length)
    # Its metrics class: the fast path counts its answers by it.
    cls = request_class(*request_kind(raw))
    if doc.fresh is None:
        return (head, doc.body, cls)
    fresh = doc.fresh
    if isinstance(fresh, SeededJSON) and len(fresh.head) + SEED_TEXT_BYTES + len(fresh.tail) == length:
        return (head, fresh.head, fresh.tail, cls)
    return None


def _section_entries(site: Site, path: str) -> list[tuple[bytes, wire.WireEntry]]:
    """The fast path's entries for every document of the section holding ``path``:
    each under its key, and a listing (a key others in the section go on from) under
    its key with a slash too, as clients ask for one and the Python path answers it."""
    keys = site.section_keys(path)
    listings = {k[: k.rfind("/")] for k in keys}
    out: list[tuple[bytes, wire.WireEntry]] = []
    for k in keys:
        doc = site.get(k)
        if doc is None or "%" in k or not k.isascii():
            continue  # a key asked only percent-encoded is the Python path's
        fresh = doc.fresh
        if fresh is None:
            length = len(doc.body)
        elif isinstance(fresh, SeededJSON):
            length = len(fresh.head) + SEED_TEXT_BYTES + len(fresh.tail)
        else:
            continue
        head = document_head(doc.content_type, length)
        raw = _key_bytes(k)
        for asked in (raw, raw + b"/") if k in listings else (raw,):
            entry = _wire_entry(asked, doc, length, head)
            if entry is not None:
                out.append((asked, entry))
    return out


@functools.lru_cache(maxsize=8192)
def _key_bytes(key: str) -> bytes:
    """A document key as the fast path looks it up: one bytes object for every caller
    (sites share most keys), not one per caller and document."""
    return key.encode("ascii")
