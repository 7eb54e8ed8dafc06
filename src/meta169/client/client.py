"""The metadata client: IMDSv2 token handling, explicit timeouts and retries.

Token handling follows botocore's ``IMDSFetcher._fetch_metadata_token``
[botocore utils.py]: ``PUT /latest/api/token`` with a TTL header; 200 gives the
token; 403, 404 and 405 mean "this service has no IMDSv2" and the client falls
back to plain GETs; 400 is fatal; a read timeout on the PUT also falls back (some
proxies in front of old services swallow PUTs). A GET answered 401 while holding
a token means the token expired: the client fetches a new one and retries once.

Retries: a transport failure (refused, timed out, unreachable, cut short) or a 5xx
reply is retried ``retries`` times with exponential backoff; 4xx never is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

from meta169.client.transport import HTTPTransport, Reply, Transport
from meta169.client.tree import Crawl, crawl
from meta169.client.url import Endpoint
from meta169.errors import ClientError, ConfigError

IMDSv2Mode: TypeAlias = Literal["auto", "required", "off"]

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600  # EC2 user guide: 1..21600 seconds

RETRYABLE_REASONS = frozenset(("refused", "timeout", "unreachable", "connect", "read-timeout", "protocol"))
RETRYABLE_STATUSES = frozenset((500, 502, 503, 504))
# botocore treats these token replies as "no IMDSv2 here" [utils.py _fetch_metadata_token].
NO_IMDSV2_STATUSES = frozenset((403, 404, 405))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How hard the client tries: per-attempt timeout, retries, backoff, IMDSv2 mode."""

    imdsv2: IMDSv2Mode = "auto"
    timeout: float = 2.0
    retries: int = 2
    backoff: float = 0.2
    token_ttl: int = MAX_TOKEN_TTL

    def __post_init__(self) -> None:
        if self.imdsv2 not in ("auto", "required", "off"):
            raise ConfigError(f"IMDSv2 mode must be auto, required or off, not {self.imdsv2!r}")
        if not 0 < self.timeout <= 300:
            raise ConfigError(f"timeout {self.timeout}s outside (0, 300]")
        if not 0 <= self.retries <= 20:
            raise ConfigError(f"retries {self.retries} outside 0..20")
        if self.backoff < 0:
            raise ConfigError("backoff must be >= 0")
        if not 1 <= self.token_ttl <= MAX_TOKEN_TTL:
            raise ConfigError(f"token TTL {self.token_ttl} outside 1..{MAX_TOKEN_TTL}")


class MetadataClient:
    """Talks to one metadata endpoint; holds the IMDSv2 token between requests.

    ``transport`` and ``sleep`` are seams: tests pass an in-memory transport and a
    sleep that records instead of waiting.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        config: ClientConfig | None = None,
        *,
        transport: Transport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.config = config or ClientConfig()
        self._transport = transport or HTTPTransport(endpoint, self.config.timeout)
        self._sleep = sleep
        self._token: str | None = None
        self._token_known = False

    @property
    def token_in_use(self) -> bool:
        """True once a token was obtained and is sent with each request."""
        return self._token is not None

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, *, body: bytes | None = None
    ) -> Reply:
        """One request with the configured retries; any HTTP status is returned, not raised."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                reply = self._transport(method, path, headers or {}, body=body)
            except ClientError as exc:
                if last or exc.reason not in RETRYABLE_REASONS:
                    raise
            else:
                if last or reply.status not in RETRYABLE_STATUSES:
                    return reply
            self._sleep(self.config.backoff * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def token(self) -> str | None:
        """The IMDSv2 token, fetched once; None when the mode is off or the service has none."""
        mode = self.config.imdsv2
        if mode == "off" or self._token_known:
            return self._token
        url = self.endpoint.url(TOKEN_PATH)
        try:
            reply = self.request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.config.token_ttl)})
        except ClientError as exc:
            if mode == "auto" and exc.reason == "read-timeout":
                self._token_known = True
                return None
            raise
        if reply.status == 200 and reply.body.strip():
            self._token = reply.body.decode("ascii", errors="replace").strip()
        elif mode == "auto" and reply.status in NO_IMDSV2_STATUSES:
            self._token = None
        else:
            raise ClientError(
                f"IMDSv2 token request answered HTTP {reply.status}", reason="status", url=url, status=reply.status
            )
        self._token_known = True
        return self._token

    def get(self, path: str) -> Reply:
        """GET ``path`` (with the token when there is one); any status is returned."""
        token = self.token()
        reply = self.request("GET", path, {TOKEN_HEADER: token} if token else {})
        if reply.status == 401 and token is not None:
            # The token expired or the service restarted with new keys: once more.
            self._token, self._token_known = None, False
            token = self.token()
            reply = self.request("GET", path, {TOKEN_HEADER: token} if token else {})
        return reply

    def fetch(self, path: str) -> bytes:
        """The body of ``path``; ``ClientError(reason="status")`` unless the reply is 2xx."""
        reply = self.get(path)
        if not reply.ok:
            raise ClientError(f"HTTP {reply.status}", reason="status", url=self.endpoint.url(path), status=reply.status)
        return reply.body

    def crawl(self, path: str) -> Crawl:
        """Every leaf under the directory ``path`` (EC2 listings, OpenStack versions)."""

        def leaf(child: str) -> bytes | None:
            reply = self.get(child)
            if reply.status == 404:
                return None
            if not reply.ok:
                raise ClientError(
                    f"HTTP {reply.status}", reason="status", url=self.endpoint.url(child), status=reply.status
                )
            return reply.body

        return crawl(self.fetch, leaf, path)
