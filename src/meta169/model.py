"""Domain objects: networks, subnets, routers, ports, keys and instances.

Small frozen dataclasses, validated on construction, with ``ipaddress`` types.
No IO here and no knowledge of how objects are stored or rendered.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from meta169.errors import ValidationError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Ids are used in file names, namespace names and URL paths: keep them tame.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# RFC 1123 host name labels, dots allowed for FQDNs.
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)

# Nova refuses user data larger than 65535 bytes once base64-encoded
# [openstack/nova api/openstack/compute/servers.py MAX_USERDATA_SIZE].
MAX_USER_DATA_B64 = 65535
MAX_USER_DATA = MAX_USER_DATA_B64 // 4 * 3


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValidationError(f"{kind} id {value!r} must be 1-128 chars of [A-Za-z0-9_.:-]")
    return value


# Who owns an object in the registry; a sync changes and removes only what its own
# source owns. "inventory" is `meta169 import`, "admin" the admin API, and the rest
# name where the objects live: "file:/abs/path" (`meta169 sync FILE`),
# "libvirt:<connection URI>", "openstack:<cloud name>".
DEFAULT_SOURCE = "inventory"
SOURCE_KINDS = ("inventory", "admin", "file", "libvirt", "openstack")
_SOURCE_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,1023}$")


def check_source(value: str) -> str:
    """``value`` if it names a source: inventory, admin, file:/PATH, libvirt:URI, openstack:CLOUD."""
    if not isinstance(value, str) or not _SOURCE_RE.fullmatch(value):
        raise ValidationError(f"source {value!r} must be 1-1024 printable ASCII characters")
    kind, _, rest = value.partition(":")
    if value in ("inventory", "admin"):
        return value
    if kind == "file" and rest.startswith("/"):
        return value
    if kind in ("libvirt", "openstack") and rest.strip():
        return value
    raise ValidationError(
        f"source {value!r} must be inventory, admin, file:/absolute/path, libvirt:URI or openstack:CLOUD"
    )


def normalize_mac(value: str) -> str:
    mac = str(value).strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(mac):
        raise ValidationError(f"MAC address {value!r} is not six colon-separated hex octets")
    return mac


def parse_ip(value: object) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an IP address") from exc


def parse_network(value: object) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not a network in CIDR form (host bits must be 0)") from exc


@dataclass(frozen=True, slots=True)
class HostRoute:
    """A static route a subnet pushes to its hosts (DHCP option 121, network_data.json)."""

    destination: IPNetwork
    nexthop: IPAddress

    def __post_init__(self) -> None:
        if self.destination.version != self.nexthop.version:
            raise ValidationError(f"host route {self.destination} via {self.nexthop} mixes IP versions")


Ipv6Mode: TypeAlias = Literal["slaac", "dhcpv6-stateful", "dhcpv6-stateless"]


@dataclass(frozen=True, slots=True)
class Subnet:
    cidr: IPNetwork
    gateway: IPAddress | None = None
    dhcp: bool = True
    dns: tuple[IPAddress, ...] = ()
    host_routes: tuple[HostRoute, ...] = ()
    ipv6_mode: Ipv6Mode | None = None

    def __post_init__(self) -> None:
        if self.gateway is not None and self.gateway not in self.cidr:
            raise ValidationError(f"gateway {self.gateway} is outside subnet {self.cidr}")
        for route in self.host_routes:
            if route.destination.version != self.cidr.version:
                raise ValidationError(f"host route {route.destination} does not match subnet {self.cidr}")
        if self.ipv6_mode is not None and self.cidr.version != 6:
            raise ValidationError(f"ipv6_mode set on IPv4 subnet {self.cidr}")

    @property
    def version(self) -> int:
        return self.cidr.version


@dataclass(frozen=True, slots=True)
class Network:
    id: str
    project_id: str = ""
    name: str = ""
    mtu: int = 1500
    subnets: tuple[Subnet, ...] = ()
    source: str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        check_id("network", self.id)
        check_source(self.source)
        if not 68 <= self.mtu <= 65535:
            raise ValidationError(f"network {self.id}: MTU {self.mtu} outside 68..65535")

    def subnet_for(self, ip: IPAddress) -> Subnet | None:
        for subnet in self.subnets:
            if ip in subnet.cidr:
                return subnet
        return None


@dataclass(frozen=True, slots=True)
class Router:
    id: str
    network_ids: tuple[str, ...] = ()
    project_id: str = ""
    source: str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        check_id("router", self.id)
        check_source(self.source)
        for net in self.network_ids:
            check_id("network", net)
        if len(set(self.network_ids)) != len(self.network_ids):
            raise ValidationError(f"router {self.id} lists a network twice")


@dataclass(frozen=True, slots=True)
class Port:
    """An instance's interface on one network."""

    network_id: str
    mac: str
    ips: tuple[IPAddress, ...]
    id: str = ""
    device_number: int = 0

    def __post_init__(self) -> None:
        check_id("network", self.network_id)
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        if not self.ips:
            raise ValidationError(f"port {self.mac} has no IP address")
        if self.id:
            check_id("port", self.id)
        else:
            # Stable id derived from the MAC so re-imports do not churn it.
            object.__setattr__(self, "id", str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"meta169:port:{self.mac}")))
        if self.device_number < 0:
            raise ValidationError(f"port {self.mac}: device_number must be >= 0")


KeyType: TypeAlias = Literal["ssh", "x509"]


@dataclass(frozen=True, slots=True)
class SSHKey:
    name: str
    data: str
    type: KeyType = "ssh"

    def __post_init__(self) -> None:
        if not self.name or "\n" in self.name or "=" in self.name or "/" in self.name:
            raise ValidationError(f"key name {self.name!r} must be non-empty, without '=', '/' or newlines")
        if not self.data.strip():
            raise ValidationError(f"key {self.name!r} has no data")
        if self.type not in ("ssh", "x509"):
            raise ValidationError(f"key {self.name!r}: type must be ssh or x509, not {self.type!r}")


HttpTokens: TypeAlias = Literal["optional", "required"]
Toggle: TypeAlias = Literal["enabled", "disabled"]


@dataclass(frozen=True, slots=True)
class MetadataOptions:
    """Per-instance metadata access policy, with EC2's names (ModifyInstanceMetadataOptions)."""

    http_tokens: HttpTokens = "optional"
    http_endpoint: Toggle = "enabled"
    http_put_response_hop_limit: int = 1
    instance_metadata_tags: Toggle = "disabled"

    def __post_init__(self) -> None:
        if self.http_tokens not in ("optional", "required"):
            raise ValidationError(f"http_tokens must be optional or required, not {self.http_tokens!r}")
        for name in ("http_endpoint", "instance_metadata_tags"):
            if getattr(self, name) not in ("enabled", "disabled"):
                raise ValidationError(f"{name} must be enabled or disabled")
        if not 1 <= self.http_put_response_hop_limit <= 64:
            raise ValidationError("http_put_response_hop_limit must be 1..64")


def _epoch() -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Instance:
    uuid: str
    name: str
    hostname: str = ""
    project_id: str = ""
    availability_zone: str = "nova"
    region: str = "RegionOne"
    instance_type: str = "m1.small"
    image_id: str = ""
    launch_index: int = 0
    created_at: datetime = field(default_factory=_epoch)
    metadata: Mapping[str, str] = field(default_factory=dict)
    keys: tuple[SSHKey, ...] = ()
    user_data: bytes | None = None
    vendor_data: Mapping[str, Any] | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    security_groups: tuple[str, ...] = ()
    ports: tuple[Port, ...] = ()
    metadata_options: MetadataOptions | None = None
    architecture: str = "x86_64"
    source: str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        check_source(self.source)
        try:
            canonical = str(uuidlib.UUID(self.uuid))
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValidationError(f"instance uuid {self.uuid!r} is not a UUID") from exc
        object.__setattr__(self, "uuid", canonical)
        if not self.name:
            raise ValidationError(f"instance {self.uuid} has no name")
        if not self.hostname:
            object.__setattr__(self, "hostname", _hostname_from(self.name))
        if not _HOSTNAME_RE.fullmatch(self.hostname):
            raise ValidationError(f"instance {self.uuid}: hostname {self.hostname!r} is not a valid host name")
        if self.launch_index < 0:
            raise ValidationError(f"instance {self.uuid}: launch_index must be >= 0")
        if self.created_at.tzinfo is None:
            object.__setattr__(self, "created_at", self.created_at.replace(tzinfo=UTC))
        if self.user_data is not None and len(self.user_data) > MAX_USER_DATA:
            raise ValidationError(
                f"instance {self.uuid}: user_data is {len(self.user_data)} bytes; "
                f"Nova's limit is {MAX_USER_DATA_B64} bytes base64-encoded ({MAX_USER_DATA} raw)"
            )
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValidationError(f"instance {self.uuid}: duplicate key names")
        macs = [p.mac for p in self.ports]
        if len(set(macs)) != len(macs):
            raise ValidationError(f"instance {self.uuid}: duplicate port MACs")
        for mapping_name in ("metadata", "tags"):
            mapping = getattr(self, mapping_name)
            for k, v in mapping.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ValidationError(f"instance {self.uuid}: {mapping_name} keys and values must be strings")
            object.__setattr__(self, mapping_name, dict(mapping))

    @property
    def primary_port(self) -> Port | None:
        return min(self.ports, key=lambda p: p.device_number) if self.ports else None


def _hostname_from(name: str) -> str:
    # Nova sanitizes display names into hostnames the same way
    # [openstack/nova utils.sanitize_hostname]: lowercase, spaces/underscores to dashes.
    host = re.sub(r"[ _]", "-", name.lower())
    host = re.sub(r"[^a-z0-9.-]", "", host).strip(".-")[:63]
    return host or "instance"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: an IP seen within a network, or within a router's networks.

    Exactly one of ``network_id`` and ``router_id`` is set; the registry lookup is
    always scoped to it, so overlapping tenant IP ranges never collide.
    """

    ip: IPAddress
    network_id: str | None = None
    router_id: str | None = None

    def __post_init__(self) -> None:
        if (self.network_id is None) == (self.router_id is None):
            raise ValidationError("a caller is scoped to exactly one of network_id or router_id")
        # An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
        if isinstance(self.ip, ipaddress.IPv6Address) and self.ip.ipv4_mapped is not None:
            object.__setattr__(self, "ip", self.ip.ipv4_mapped)

    @property
    def scope(self) -> str:
        return f"network {self.network_id}" if self.network_id is not None else f"router {self.router_id}"
