"""DHCP classless static routes (option 121, RFC 3442, and Microsoft's option 249).

Pure: which routes a subnet pushes, and their encodings (wire bytes, dnsmasq's
``dhcp-option`` text, dhclient's lease text). No IO, no knowledge of dnsmasq
processes or namespaces.

Route order [openstack/neutron agent/linux/dhcp.py
``_generate_opts_per_subnet``]: ``169.254.169.254/32`` via the metadata next hop,
then the subnet's host routes, then ``0.0.0.0/0`` via the gateway. RFC 3442 section
"DHCP Client Behavior": a client that receives option 121 MUST ignore option 3, so
the default route has to be inside option 121. The /32 is what beats a guest's
zeroconf ``169.254.0.0/16 dev eth0`` route by longest prefix (the seed's fault).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meta169.errors import ValidationError
from meta169.model import Subnet

OPTION_CLASSLESS_STATIC_ROUTE = 121
# Windows (before Vista) only honours this private-use code with the same
# encoding; neutron sends both [agent/linux/dhcp.py WIN2k3_STATIC_DNS = 249].
OPTION_MS_CLASSLESS_STATIC_ROUTE = 249

METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
METADATA_V4_ROUTE = ipaddress.IPv4Network("169.254.169.254/32")
DEFAULT_V4_ROUTE = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True, slots=True)
class ClasslessRoute:
    """One RFC 3442 route: ``destination`` reached via ``router``.

    A ``router`` of 0.0.0.0 means "on link": neutron pushes such routes for a
    network's other subnets, and dhclient-script installs them with scope link.
    """

    destination: ipaddress.IPv4Network
    router: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        if not isinstance(self.destination, ipaddress.IPv4Network):
            raise ValidationError(f"classless route destination {self.destination!r} is not IPv4")
        if not isinstance(self.router, ipaddress.IPv4Address):
            raise ValidationError(f"classless route router {self.router!r} is not IPv4")

    def __str__(self) -> str:
        return f"{self.destination} via {self.router}"


def metadata_next_hop(
    subnet: Subnet, *, isolated: bool, dhcp_ip: ipaddress.IPv4Address | None = None
) -> ipaddress.IPv4Address | None:
    """The address guests should send 169.254.169.254 traffic to, or None.

    Isolated subnet (no router): the DHCP port, where the metadata address is
    configured and the proxy listens. Routed subnet: the gateway, whose namespace
    REDIRECTs it to the proxy; without a gateway there is no route to push.
    """
    if subnet.version != 4:
        raise ValidationError(f"option 121 is IPv4 only; subnet {subnet.cidr} is IPv6")
    if not isolated:
        return subnet.gateway if isinstance(subnet.gateway, ipaddress.IPv4Address) else None
    if dhcp_ip is None:
        raise ValidationError(f"isolated subnet {subnet.cidr} needs the DHCP port IP as next hop")
    if dhcp_ip not in subnet.cidr:
        raise ValidationError(f"DHCP port IP {dhcp_ip} is outside subnet {subnet.cidr}")
    return dhcp_ip


def classless_routes(
    subnet: Subnet, *, isolated: bool, dhcp_ip: ipaddress.IPv4Address | None = None
) -> tuple[ClasslessRoute, ...]:
    """The option 121/249 route list for ``subnet``, in the order guests must get it.

    A host route to 0.0.0.0/0 stands in for a missing gateway (neutron does the
    same) and is otherwise dropped; a host route to the metadata /32 is dropped
    because ours must win; other duplicates keep their first occurrence.
    """
    next_hop = metadata_next_hop(subnet, isolated=isolated, dhcp_ip=dhcp_ip)
    gateway = subnet.gateway if isinstance(subnet.gateway, ipaddress.IPv4Address) else None
    routes: list[ClasslessRoute] = []
    if next_hop is not None:
        routes.append(ClasslessRoute(METADATA_V4_ROUTE, next_hop))
    seen = {METADATA_V4_ROUTE} if next_hop is not None else set()
    for host_route in subnet.host_routes:
        dest, hop = host_route.destination, host_route.nexthop
        if not isinstance(dest, ipaddress.IPv4Network) or not isinstance(hop, ipaddress.IPv4Address):
            continue
        if dest == DEFAULT_V4_ROUTE:
            gateway = gateway or hop
            continue
        if dest in seen:
            continue
        seen.add(dest)
        routes.append(ClasslessRoute(dest, hop))
    if gateway is not None:
        routes.append(ClasslessRoute(DEFAULT_V4_ROUTE, gateway))
    return tuple(routes)


# --- wire format (RFC 3442 section 3) -------------------------------------------


def _significant_octets(width: int) -> int:
    # "the number of significant octets ... is the width of the subnet mask
    # divided by eight, rounding up" [RFC 3442 section 3]
    return (width + 7) // 8


def encode(routes: Iterable[ClasslessRoute]) -> bytes:
    """RFC 3442 option data: per route, mask width, significant octets, router."""
    out = bytearray()
    for route in routes:
        width = route.destination.prefixlen
        out.append(width)
        out += route.destination.network_address.packed[: _significant_octets(width)]
        out += route.router.packed
    return bytes(out)


def decode(data: bytes | Sequence[int]) -> tuple[ClasslessRoute, ...]:
    """Parse RFC 3442 option data; ``ValidationError`` when it is truncated or bad."""
    raw = bytes(data)
    routes: list[ClasslessRoute] = []
    pos = 0
    while pos < len(raw):
        width = raw[pos]
        if width > 32:
            raise ValidationError(f"option 121 at octet {pos}: mask width {width} exceeds 32")
        n = _significant_octets(width)
        end = pos + 1 + n + 4
        if end > len(raw):
            raise ValidationError(f"option 121 at octet {pos}: route needs {1 + n + 4} octets, {len(raw) - pos} left")
        dest_octets = raw[pos + 1 : pos + 1 + n] + bytes(4 - n)
        # "the client MUST zero any bits in the subnet number where the
        # corresponding bit in the mask is zero" [RFC 3442 section 3]
        dest = ipaddress.IPv4Network((ipaddress.IPv4Address(dest_octets), width), strict=False)
        router = ipaddress.IPv4Address(raw[pos + 1 + n : end])
        routes.append(ClasslessRoute(dest, router))
        pos = end
    return tuple(routes)


# --- dhclient's lease text ------------------------------------------------------
# dhclient writes the option, declared ``array of unsigned integer 8``, as
# ``option rfc3442-classless-static-routes 32,169,254,169,254,10,0,0,3,...;`` in
# its lease file and passes it space-separated to dhclient-script.

_INT_LIST_RE = re.compile(r"^\s*\d{1,3}(?:\s*[,\s]\s*\d{1,3})*\s*$")


def to_dhclient(routes: Iterable[ClasslessRoute]) -> str:
    """The comma form dhclient writes in its lease file."""
    return ",".join(str(b) for b in encode(routes))


def from_dhclient(text: str) -> tuple[ClasslessRoute, ...]:
    """Parse dhclient's comma form (lease file) or space form (script environment)."""
    body = text.strip().rstrip(";").strip()
    if not body:
        return ()
    if not _INT_LIST_RE.fullmatch(body):
        raise ValidationError(f"not a list of decimal octets: {text!r}")
    values = [int(v) for v in re.split(r"[,\s]+", body)]
    if any(v > 255 for v in values):
        raise ValidationError(f"octet out of range in {text!r}")
    return decode(bytes(values))


# --- dnsmasq's option text ------------------------------------------------------


def to_dnsmasq(routes: Iterable[ClasslessRoute]) -> str:
    """dnsmasq's value syntax: ``169.254.169.254/32,10.0.0.3,0.0.0.0/0,10.0.0.1``."""
    return ",".join(f"{r.destination},{r.router}" for r in routes)


def from_dnsmasq(text: str) -> tuple[ClasslessRoute, ...]:
    """Inverse of :func:`to_dnsmasq`."""
    body = text.strip()
    if not body:
        return ()
    parts = [p.strip() for p in body.split(",")]
    if len(parts) % 2:
        raise ValidationError(f"dnsmasq route list {text!r} has an odd number of fields")
    routes = []
    for dest, router in zip(parts[::2], parts[1::2], strict=True):
        try:
            routes.append(ClasslessRoute(ipaddress.IPv4Network(dest), ipaddress.IPv4Address(router)))
        except ValueError as exc:
            raise ValidationError(f"bad route {dest},{router} in {text!r}: {exc}") from exc
    return tuple(routes)
