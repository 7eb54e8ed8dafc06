"""Who is calling: turn a request on a given listener into a :class:`Caller`.

A listener is bound to one trust source:

- ``network``: the TCP peer address, scoped to one network (direct mode);
- ``router``: the TCP peer address, scoped to the router's networks;
- ``proxy``: a trusted ``meta169 proxy`` stamps the identity in headers; trust comes
  from the Unix socket's file permissions (or a per-request HMAC over TCP).

Identity headers are only ever read on a proxy listener. Anywhere else their mere
presence is refused, so a guest that can reach ``serve`` directly cannot claim to be
someone else by sending what the proxy would have sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meta169.errors import HTTPError, ValidationError
from meta169.model import Caller, check_id, parse_ip

BindingKind = Literal["network", "router", "proxy"]

# The proxy's own stamp. Guests' copies are removed by the proxy before it stamps.
HDR_CALLER_IP = "x-meta169-caller-ip"
HDR_NETWORK = "x-meta169-network-id"
HDR_ROUTER = "x-meta169-router-id"
IDENTITY_PREFIX = "x-meta169-"


@dataclass(frozen=True, slots=True)
class Binding:
    kind: BindingKind
    id: str = ""

    def __post_init__(self) -> None:
        if self.kind in ("network", "router"):
            check_id(self.kind, self.id)
        elif self.kind != "proxy":
            raise ValidationError(f"unknown listener binding {self.kind!r}")

    @property
    def scope(self) -> str:
        return f"{self.kind} {self.id}" if self.id else self.kind


def has_identity_headers(headers: dict[str, str]) -> bool:
    return any(name.startswith(IDENTITY_PREFIX) for name in headers)


def caller_from_proxy_headers(headers: dict[str, str]) -> Caller:
    """Parse the identity the trusted proxy stamped. Malformed -> 400."""
    ip_text = headers.get(HDR_CALLER_IP)
    network = headers.get(HDR_NETWORK)
    router = headers.get(HDR_ROUTER)
    if ip_text is None or (network is None) == (router is None):
        raise HTTPError(400, "proxy request lacks a caller IP and exactly one of network or router id")
    if "," in ip_text or (network and "," in network) or (router and "," in router):
        raise HTTPError(400, "duplicate identity headers")
    try:
        ip = parse_ip(ip_text.strip())
        if network is not None:
            return Caller(ip=ip, network_id=check_id("network", network.strip()))
        assert router is not None
        return Caller(ip=ip, router_id=check_id("router", router.strip()))
    except ValidationError as exc:
        raise HTTPError(400, str(exc)) from exc
