"""The identity stamp the proxy puts on each request, and its HMAC for TCP upstreams.

Pure functions and the header names both sides agree on: ``meta169 proxy`` writes a
stamp, ``serve`` reads it, and neither imports the other. The proxy is the trust
boundary: it removes every identity header a guest may have sent, then stamps its
own. Over a Unix socket the
stamp is trusted by file permissions; over TCP each request carries an HMAC-SHA256
over the identity, method, path, a timestamp and a nonce, so a captured stamp is
useless for another request and stale after the window (unlike Neutron's static
``X-Instance-ID-Signature``, which is the same for every request of an instance).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from meta169.errors import HTTPError
from meta169.model import Caller

# The proxy's own stamp. Guests' copies are removed by the proxy before it stamps.
HDR_CALLER_IP = "x-meta169-caller-ip"
HDR_NETWORK = "x-meta169-network-id"
HDR_ROUTER = "x-meta169-router-id"
IDENTITY_PREFIX = "x-meta169-"
# serve asks the proxy to send a reply with this IP TTL / hop limit (IMDSv2 token
# replies); the proxy applies it on the guest's socket and never forwards the header.
HDR_HOP_LIMIT = "x-meta169-hop-limit"
HDR_SIGNATURE = "x-meta169-signature"
# Headers that carry, or have carried, caller identity somewhere in this field:
# Neutron's agent and OVN agent, Nova's handler, generic reverse proxies.
IDENTITY_HEADER_PREFIXES = ("x-meta169-", "x-neutron-", "x-ovn-", "x-instance-id")
IDENTITY_HEADERS = frozenset(
    (
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
        "x-tenant-id",
        "x-client-ip",
        "true-client-ip",
    )
)
# Hop-by-hop headers (RFC 9110 section 7.6.1) are not forwarded.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade")
)

REPLAY_WINDOW = 30  # seconds either side of the server's clock


def is_identity_header(name: str) -> bool:
    """``name`` must be lower case."""
    return name in IDENTITY_HEADERS or name.startswith(IDENTITY_HEADER_PREFIXES)


def guest_had_forwarded_for(headers: dict[str, str]) -> bool:
    # IMDSv2: a token PUT that carries X-Forwarded-For came through a proxy inside
    # the guest and must be refused (EC2 user guide, "IMDSv2 ... X-Forwarded-For").
    return "x-forwarded-for" in headers


def stamp_headers(caller: Caller) -> list[tuple[str, str]]:
    out = [(HDR_CALLER_IP, str(caller.ip))]
    if caller.network_id is not None:
        out.append((HDR_NETWORK, caller.network_id))
    else:
        assert caller.router_id is not None
        out.append((HDR_ROUTER, caller.router_id))
    return out


def _message(caller_ip: str, scope: str, method: str, path: str, ts: int, nonce: str) -> bytes:
    return "\n".join(("meta169-v1", str(ts), nonce, method, path, caller_ip, scope)).encode()


def _scope(headers: dict[str, str]) -> str:
    if HDR_NETWORK in headers:
        return "network:" + headers[HDR_NETWORK]
    return "router:" + headers.get(HDR_ROUTER, "")


def sign(secret: bytes, caller: Caller, method: str, path: str, *, now: float | None = None) -> str:
    scope = f"network:{caller.network_id}" if caller.network_id is not None else f"router:{caller.router_id}"
    return sign_stamp(secret, str(caller.ip), scope, method, path, now=now)


def sign_stamp(secret: bytes, caller_ip: str, scope: str, method: str, path: str, *, now: float | None = None) -> str:
    """The signature header value; ``scope`` is ``network:ID`` or ``router:ID``."""
    ts = int(time.time() if now is None else now)
    nonce = os.urandom(12).hex()
    mac = hmac.new(secret, _message(caller_ip, scope, method, path, ts, nonce), hashlib.sha256).hexdigest()
    return f"v1 ts={ts} nonce={nonce} sig={mac}"


@dataclass
class ReplayGuard:
    """Remembers nonces seen inside the window; memory is bounded by ``capacity``."""

    capacity: int = 200_000
    _seen: OrderedDict[str, int] | None = None

    def __post_init__(self) -> None:
        self._seen = OrderedDict()

    def check_and_add(self, nonce: str, ts: int, now: int) -> bool:
        seen = self._seen
        assert seen is not None
        # Nonces arrive in roughly time order: expire from the old end.
        while seen:
            when = next(iter(seen.values()))
            if when >= now - REPLAY_WINDOW and len(seen) < self.capacity:
                break
            seen.popitem(last=False)
        if nonce in seen:
            return False
        seen[nonce] = ts
        return True


def verify(
    secret: bytes,
    headers: dict[str, str],
    method: str,
    path: str,
    guard: ReplayGuard,
    *,
    now: float | None = None,
) -> None:
    """Raise HTTPError(403) unless the stamp's HMAC is valid, fresh and unseen."""
    value = headers.get(HDR_SIGNATURE)
    if value is None:
        raise HTTPError(403, "proxy signature missing")
    fields = dict(part.split("=", 1) for part in value.split()[1:] if "=" in part)
    if not value.startswith("v1 ") or not {"ts", "nonce", "sig"} <= fields.keys():
        raise HTTPError(403, "proxy signature malformed")
    try:
        ts = int(fields["ts"])
    except ValueError:
        raise HTTPError(403, "proxy signature malformed") from None
    current = int(time.time() if now is None else now)
    if abs(current - ts) > REPLAY_WINDOW:
        raise HTTPError(403, "proxy signature outside the replay window")
    expected = hmac.new(
        secret,
        _message(headers.get(HDR_CALLER_IP, ""), _scope(headers), method, path, ts, fields["nonce"]),
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected, fields["sig"]):
        raise HTTPError(403, "proxy signature mismatch")
    if not guard.check_and_add(fields["nonce"], ts, current):
        raise HTTPError(403, "proxy signature replayed")
