"""Who is calling: turn a request on a given listener into a :class:`Caller`.

A listener is bound to one trust source:

- ``network``: the TCP peer address, scoped to one network (direct mode);
- ``router``: the TCP peer address, scoped to the router's networks;
- ``proxy``: a trusted ``meta169 proxy`` stamps the identity in headers; trust comes
  from the Unix socket's file permissions (or a per-request HMAC over TCP);
- ``neutron``: a stock Neutron metadata agent names the instance in ``X-Instance-ID``
  and proves it with ``X-Instance-ID-Signature`` (Nova's compatibility contract).

Identity headers are only ever read on a proxy listener. Anywhere else their mere
presence is refused, so a guest that can reach ``serve`` directly cannot claim to be
someone else by sending what the proxy would have sent.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from meta169.errors import HTTPError, ValidationError
from meta169.model import Caller, check_id, parse_ip

BindingKind = Literal["network", "router", "proxy", "neutron"]

# The proxy's own stamp. Guests' copies are removed by the proxy before it stamps.
HDR_CALLER_IP = "x-meta169-caller-ip"
HDR_NETWORK = "x-meta169-network-id"
HDR_ROUTER = "x-meta169-router-id"
IDENTITY_PREFIX = "x-meta169-"
# serve asks the proxy to send a reply with this IP TTL / hop limit (IMDSv2 token
# replies); the proxy applies it on the guest's socket and never forwards the header.
HDR_HOP_LIMIT = "X-Meta169-Hop-Limit"


@dataclass(frozen=True, slots=True)
class Binding:
    kind: BindingKind
    id: str = ""

    def __post_init__(self) -> None:
        if self.kind in ("network", "router"):
            check_id(self.kind, self.id)
        elif self.kind not in ("proxy", "neutron"):
            raise ValidationError(f"unknown listener binding {self.kind!r}")

    @property
    def scope(self) -> str:
        return f"{self.kind} {self.id}" if self.id else self.kind



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


@dataclass(frozen=True, slots=True)
class NeutronIdentity:
    instance_id: str
    tenant_id: str
    forwarded_for: str


def neutron_identity(headers: dict[str, str], secret: bytes) -> NeutronIdentity:
    """Check a Neutron metadata agent's headers as Nova's handler does.

    Missing header -> 400; bad signature -> 403 (constant-time compare). The
    signature is lowercase hex HMAC-SHA256(secret, instance_id)
    [openstack/nova api/metadata/handler.py _handle_instance_id_request,
    openstack/neutron common/utils.py sign_instance_id].
    """
    instance_id = headers.get("x-instance-id")
    tenant_id = headers.get("x-tenant-id")
    signature = headers.get("x-instance-id-signature")
    forwarded = headers.get("x-forwarded-for", "")
    for name, value in (
        ("X-Instance-ID", instance_id),
        ("X-Tenant-ID", tenant_id),
        ("X-Instance-ID-Signature", signature),
    ):
        if value is None:
            raise HTTPError(400, f"{name} header is missing from request.")
        if "," in value:
            raise HTTPError(400, f"multiple {name} headers")
    assert instance_id is not None and tenant_id is not None and signature is not None
    expected = hmac.new(secret, instance_id.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise HTTPError(403, "invalid proxy request signature")
    return NeutronIdentity(instance_id.strip(), tenant_id.strip(), forwarded)
