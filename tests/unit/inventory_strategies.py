"""Hypothesis strategies for whole inventories, valid by construction, and one object
per kind with every field away from its default.

The inventories use every kind and every field with odd but valid values: unicode
names and metadata, binary and text user data, nested vendor data, IPv4 and IPv6
subnets with host routes, explicit and derived port ids, metadata options, timestamps
with offsets. Ports take addresses inside their network's subnets, and no IP or MAC
is used twice on a network, so an inventory always applies to an empty registry.
"""

from __future__ import annotations

import ipaddress
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args

from hypothesis import strategies as st

from meta169.inventory import Inventory
from meta169.model import (
    HostRoute,
    HttpTokens,
    Instance,
    IPAddress,
    IPNetwork,
    Ipv6Mode,
    KeyType,
    MetadataOptions,
    Network,
    Port,
    Router,
    SSHKey,
    Subnet,
    Toggle,
)

# Any character a document can carry and a database can store: no NUL (PostgreSQL
# text refuses it), no lone surrogates (not Unicode); controls, NEL, line and
# paragraph separators, BOMs, emoji and combining marks are all in.
CHAR = st.characters(codec="utf-8", exclude_characters="\x00")
TEXT = st.text(CHAR, max_size=12)
NAME = st.text(CHAR, min_size=1, max_size=12)
IDENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,15}", fullmatch=True)
HOSTNAME = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?(\.[A-Za-z0-9]{1,6}){0,2}", fullmatch=True)
MAC = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
OFFSET = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
CREATED_AT = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(2200, 1, 1), timezones=OFFSET | st.just(UTC)
)
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(CHAR, max_size=8)
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(CHAR, max_size=6), inner, max_size=3),
    max_leaves=8,
)
VENDOR_DATA = st.none() | st.dictionaries(st.text(CHAR, max_size=6), JSON_VALUE, max_size=4)
USER_DATA = st.none() | st.binary(max_size=64) | st.text(CHAR, max_size=64).map(lambda t: t.encode("utf-8"))
STRING_MAP = st.dictionaries(TEXT, TEXT, max_size=3)
KEY_NAME = st.text(st.characters(codec="utf-8", exclude_characters="\x00\n=/"), min_size=1, max_size=8)
KEY_DATA = st.tuples(TEXT, st.text(st.characters(codec="ascii", min_codepoint=33), min_size=1), TEXT).map("".join)
METADATA_OPTIONS = st.none() | st.builds(
    MetadataOptions,
    http_tokens=st.sampled_from(get_args(HttpTokens)),
    http_endpoint=st.sampled_from(get_args(Toggle)),
    http_put_response_hop_limit=st.integers(1, 64),
    instance_metadata_tags=st.sampled_from(get_args(Toggle)),
)
COUNT = st.integers(min_value=0, max_value=2**31 - 1)


def _address(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _bits(version: int) -> int:
    return 32 if version == 4 else 128


@st.composite
def ip_networks(draw: st.DrawFn, version: int, min_prefix: int = 0) -> IPNetwork:
    bits = _bits(version)
    prefix = draw(st.integers(min_prefix, bits))
    value = draw(st.integers(0, 2**bits - 1)) >> (bits - prefix) << (bits - prefix) if prefix else 0
    return ipaddress.ip_network((value, prefix)) if version == 4 else ipaddress.IPv6Network((value, prefix))


@st.composite
def ip_addresses(draw: st.DrawFn, version: int | None = None) -> IPAddress:
    version = version or draw(st.sampled_from([4, 6]))
    return _address(version, draw(st.integers(0, 2 ** _bits(version) - 1)))


@st.composite
def subnets(draw: st.DrawFn) -> Subnet:
    version = draw(st.sampled_from([4, 6]))
    # Room for a few hosts: ports draw their addresses from here.
    cidr = draw(ip_networks(version, min_prefix=8 if version == 4 else 48).filter(lambda n: n.num_addresses >= 8))
    gateway = draw(st.none() | st.integers(0, cidr.num_addresses - 1).map(lambda k: cidr.network_address + k))
    routes = draw(st.lists(st.builds(HostRoute, ip_networks(version), ip_addresses(version)), max_size=2))
    return Subnet(
        cidr=cidr,
        gateway=gateway,
        dhcp=draw(st.booleans()),
        dns=tuple(draw(st.lists(ip_addresses(), max_size=2))),
        host_routes=tuple(routes),
        ipv6_mode=draw(st.none() | st.sampled_from(get_args(Ipv6Mode))) if version == 6 else None,
    )


networks = st.builds(
    Network,
    id=IDENT,
    project_id=TEXT,
    name=TEXT,
    mtu=st.integers(68, 65535),
    subnets=st.lists(subnets(), max_size=2).map(tuple),
)


@st.composite
def _port_ips(draw: st.DrawFn, network: Network, used: set[tuple[str, IPAddress]]) -> tuple[IPAddress, ...]:
    ips: list[IPAddress] = []
    for _ in range(draw(st.integers(1, 2))):
        if network.subnets:
            subnet = draw(st.sampled_from(network.subnets))
            ip = subnet.cidr.network_address + draw(st.integers(0, min(subnet.cidr.num_addresses, 2**32) - 1))
        else:
            ip = draw(ip_addresses())
        if (network.id, ip) not in used:
            used.add((network.id, ip))
            ips.append(ip)
    return tuple(ips)


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    """An inventory of up to 3 networks, 2 routers and 3 instances; ``import`` accepts it."""
    nets = draw(st.lists(networks, max_size=3, unique_by=lambda n: n.id))
    net_ids = [n.id for n in nets]
    routers = draw(
        st.lists(
            st.builds(
                Router,
                id=IDENT,
                network_ids=st.lists(st.sampled_from(net_ids), unique=True).map(tuple) if net_ids else st.just(()),
                project_id=TEXT,
            ),
            max_size=2,
            unique_by=lambda r: r.id,
        )
    )
    uuids = draw(st.lists(st.uuids(), max_size=3, unique=True))
    macs = iter(draw(st.lists(MAC, min_size=6, max_size=6, unique=True)))
    used: set[tuple[str, IPAddress]] = set()
    instances = []
    for instance_uuid in uuids:
        ports = []
        for _ in range(draw(st.integers(0, 2)) if nets else 0):
            network = draw(st.sampled_from(nets))
            ips = draw(_port_ips(network, used))
            if ips:
                ports.append(
                    Port(
                        network.id,
                        next(macs),
                        ips,
                        id=draw(st.just("") | IDENT),
                        device_number=draw(COUNT),
                    )
                )
        instances.append(draw(_instance(instance_uuid, tuple(ports))))
    return Inventory(source="generated", networks=tuple(nets), routers=tuple(routers), instances=tuple(instances))


@st.composite
def _instance(draw: st.DrawFn, instance_uuid: uuid.UUID, ports: tuple[Port, ...]) -> Instance:
    keys = draw(
        st.lists(
            st.builds(SSHKey, name=KEY_NAME, data=KEY_DATA, type=st.sampled_from(get_args(KeyType))),
            max_size=2,
            unique_by=lambda k: k.name,
        )
    )
    return Instance(
        uuid=str(instance_uuid),
        name=draw(NAME),
        hostname=draw(st.just("") | HOSTNAME),
        project_id=draw(TEXT),
        availability_zone=draw(TEXT),
        region=draw(TEXT),
        instance_type=draw(TEXT),
        image_id=draw(TEXT),
        launch_index=draw(COUNT),
        created_at=draw(CREATED_AT),
        metadata=draw(STRING_MAP),
        keys=tuple(keys),
        user_data=draw(USER_DATA),
        vendor_data=draw(VENDOR_DATA),
        tags=draw(STRING_MAP),
        security_groups=tuple(draw(st.lists(TEXT, max_size=3))),
        ports=ports,
        metadata_options=draw(METADATA_OPTIONS),
        architecture=draw(TEXT),
    )


# -- one object per kind with every field away from its default -----------------------------

V6 = ipaddress.ip_network("2001:db8:6::/64")
EVERY_FIELD_PORT = Port(
    network_id="net-every",
    mac="fa:16:3e:00:00:aa",
    ips=(ipaddress.ip_address("2001:db8:6::10"), ipaddress.ip_address("10.9.0.10")),
    id="port-explicit",
    device_number=3,
)
EVERY_FIELD_SUBNET = Subnet(
    cidr=V6,
    gateway=ipaddress.ip_address("2001:db8:6::1"),
    dhcp=False,
    dns=(ipaddress.ip_address("2001:db8::53"),),
    host_routes=(HostRoute(ipaddress.ip_network("2001:db8:99::/48"), ipaddress.ip_address("2001:db8:6::fe")),),
    ipv6_mode="dhcpv6-stateful",
)
EVERY_FIELD_NETWORK = Network(
    id="net-every",
    project_id="proj-ü",
    name="réseau",
    mtu=9000,
    subnets=(EVERY_FIELD_SUBNET, Subnet(ipaddress.ip_network("10.9.0.0/24"))),
    source="file:/etc/meta169/every field.yaml",
)
EVERY_FIELD_ROUTER = Router(
    id="router-every", network_ids=("net-every",), project_id="proj-ü", source="openstack:every-cloud"
)
EVERY_FIELD_KEY = SSHKey(name="cert", data="-----BEGIN CERTIFICATE-----\nMIIB\n", type="x509")
EVERY_FIELD_OPTIONS = MetadataOptions(
    http_tokens="required", http_endpoint="disabled", http_put_response_hop_limit=7, instance_metadata_tags="enabled"
)
EVERY_FIELD_INSTANCE = Instance(
    uuid="0f0e0d0c-0b0a-4908-8706-050403020100",
    name="Ünïcode Näme ☃",
    hostname="every-field.example",
    project_id="proj-ü",
    availability_zone="zone-2",
    region="Région",
    instance_type="m9.huge",
    image_id="img-42",
    launch_index=4,
    created_at=datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    metadata={"rôle": "web", "": "empty key"},
    keys=(EVERY_FIELD_KEY,),
    user_data=b"\x1f\x8b\x08\x00binary\xff\x00",
    vendor_data={"nested": {"list": [1, 2.5, True, None, "s"]}},
    tags={"env": "prod"},
    security_groups=("default", "web"),
    ports=(EVERY_FIELD_PORT,),
    metadata_options=EVERY_FIELD_OPTIONS,
    architecture="aarch64",
    source="libvirt:qemu+ssh://host/system?keyfile=/k",
)
EVERY_FIELD: tuple[Any, ...] = (
    EVERY_FIELD_NETWORK,
    EVERY_FIELD_SUBNET,
    EVERY_FIELD_SUBNET.host_routes[0],
    EVERY_FIELD_ROUTER,
    EVERY_FIELD_INSTANCE,
    EVERY_FIELD_PORT,
    EVERY_FIELD_KEY,
    EVERY_FIELD_OPTIONS,
)
EVERY_FIELD_INVENTORY = Inventory(
    source="every-field",
    networks=(EVERY_FIELD_NETWORK,),
    routers=(EVERY_FIELD_ROUTER,),
    instances=(EVERY_FIELD_INSTANCE,),
)
