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

from meta169.errors import HTTPError, ValidationError
from meta169.http.stamp import HDR_CALLER_IP, HDR_NETWORK, HDR_ROUTER
from meta169.model import Caller, check_id, parse_ip


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
