"""libvirt as a source: its domains are instances, its networks are networks.

A domain becomes an instance: its UUID, name, architecture and interfaces (MACs), and
what its ``<metadata>`` holds in meta169's XML namespace, :data:`NAMESPACE`::

    <metadata>
      <meta169:instance xmlns:meta169="https://meta169.dev/xmlns/instance/1">
        <meta169:hostname>web-1</meta169:hostname>
        <meta169:project>demo</meta169:project>
        <meta169:key name="alice">ssh-ed25519 AAAA... alice@example</meta169:key>
        <meta169:tag name="role">web</meta169:tag>
        <meta169:meta name="team">blue</meta169:meta>
        <meta169:user-data>#cloud-config ...</meta169:user-data>
        <meta169:vendor-data>{"motd": "hello"}</meta169:vendor-data>
        <meta169:network>net-a</meta169:network>   <!-- first interface -->
        <meta169:ip>10.0.0.5</meta169:ip>           <!-- first interface -->
        <meta169:port mac="52:54:00:00:00:02" network="net-b"><meta169:ip>10.1.0.5</meta169:ip></meta169:port>
      </meta169:instance>
    </metadata>

Every child is optional (:data:`TEXT_ELEMENTS` and :func:`parse_metadata` list
them); values are checked by the inventory schema's codecs, so the rules are the
inventory's and an error names the source, the domain and the element.

An interface's network is, in order: its ``<meta169:port network=...>``, the
top-level ``<meta169:network>`` (first interface), the libvirt network it is
attached to (``<interface type='network'>``, or a bridge that is a libvirt network's
bridge). Its IPs: the port's or top-level ``<meta169:ip>``, else the libvirt
network's static DHCP hosts (``<host mac=... ip=...>``, known before the guest
boots) and the network's DHCP leases (``virNetworkGetDHCPLeases``). An interface
with no network or no IP yet has no port until it has both.

Each libvirt network with an ``<ip>`` becomes a registry network of the same name:
its subnets (address and prefix, the address as gateway when the network forwards,
DHCP when it has ``<dhcp>``, the address as DNS server unless ``<dns enable='no'>``).

The IO part: :func:`read_libvirt` reads a connection, :func:`sync_libvirt` makes the
registry match it for source ``libvirt:<uri>``, :func:`watch_libvirt` follows
domain and network events (and polls DHCP leases, which raise no event) and syncs
within a second of each.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, NoReturn

from meta169.errors import Conflict, InventoryError, Meta169Error, RegistryError, SourceError
from meta169.inventory import Inventory
from meta169.inventory.schema import INSTANCE, IP, KEY, NETWORK, PORT, Where
from meta169.model import Instance, IPAddress, Network, Subnet
from meta169.registry.base import Registry
from meta169.sources.reconcile import SyncResult, sync_registry

log = logging.getLogger("meta169.sources.libvirt")

NAMESPACE: Final = "https://meta169.dev/xmlns/instance/1"
# The prefix meta169 writes; readers go by the namespace URI, never by the prefix.
PREFIX: Final = "meta169"
DEFAULT_URI: Final = "qemu:///system"

_NS = f"{{{NAMESPACE}}}"

# <meta169:instance> children that hold one text value: element -> inventory field.
TEXT_ELEMENTS: Final[Mapping[str, str]] = {
    "hostname": "hostname",
    "project": "project_id",
    "availability-zone": "availability_zone",
    "region": "region",
    "instance-type": "instance_type",
    "image": "image_id",
}
# The other children: named mappings, one element per entry, and the rest.
_NAMED_MAPS: Final[Mapping[str, str]] = {"tag": "tags", "meta": "metadata"}
_OTHER_ELEMENTS: Final = ("key", "user-data", "vendor-data", "network", "ip", "port")
ELEMENTS: Final = (*TEXT_ELEMENTS, *_NAMED_MAPS, *_OTHER_ELEMENTS)


def source_name(uri: str) -> str:
    """The registry source of a libvirt connection: ``libvirt:<uri>``."""
    return f"libvirt:{uri}"


# -- the pure part: XML to model objects ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interface:
    """One ``<interface>`` of a domain: its MAC and what it is plugged into."""

    mac: str
    network: str | None = None
    bridge: str | None = None


@dataclass(frozen=True, slots=True)
class Domain:
    """What a domain's XML says that meta169 uses."""

    uuid: str
    name: str
    architecture: str | None = None
    interfaces: tuple[Interface, ...] = ()
    metadata: ET.Element | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class LibvirtNetwork:
    """A libvirt network: its bridge, the registry network it becomes (None without
    an ``<ip>``), and its static DHCP hosts by MAC."""

    name: str
    bridge: str | None = None
    network: Network | None = None
    hosts: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)


def _parse_xml(text: str, where: Where) -> ET.Element:
    try:
        # libvirt's own output, from the connection the operator named.
        return ET.fromstring(text)  # noqa: S314
    except ET.ParseError as exc:
        where.fail(f"is not well-formed XML: {exc}")


def parse_domain(xml: str, source: str) -> Domain:
    """The parts of a domain's XML (``virDomainGetXMLDesc``) meta169 uses."""
    root = _parse_xml(xml, Where(source, "a domain"))
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip()
    where = Where(source, f"domain {name or '?'} ({uuid or '?'})")
    interfaces: list[Interface] = []
    for index, element in enumerate(root.findall("devices/interface")):
        mac_element = element.find("mac")
        if mac_element is None or not mac_element.get("address"):
            continue  # libvirt assigns every interface a MAC when it defines the domain
        raw = mac_element.get("address", "")
        mac = PORT.lookup("mac").codec.parse(raw, where / f"devices/interface[{index}]/mac")
        src = element.find("source")
        kind = element.get("type")
        interfaces.append(
            Interface(
                mac=mac,
                network=src.get("network") if src is not None and kind == "network" else None,
                bridge=src.get("bridge") if src is not None and kind == "bridge" else None,
            )
        )
    metadata = root.find(f"metadata/{_NS}instance")
    os_type = root.find("os/type")
    return Domain(
        uuid=uuid,
        name=name,
        architecture=os_type.get("arch") if os_type is not None else None,
        interfaces=tuple(interfaces),
        metadata=metadata,
    )


def parse_network(xml: str, source: str) -> LibvirtNetwork:
    """A libvirt network's XML (``virNetworkGetXMLDesc``) as a registry network."""
    root = _parse_xml(xml, Where(source, "a network"))
    name = (root.findtext("name") or "").strip()
    where = Where(source, f"network {name or '?'}")
    bridge_element = root.find("bridge")
    bridge = bridge_element.get("name") if bridge_element is not None else None
    forwards = root.find("forward") is not None
    dns_element = root.find("dns")
    dns_enabled = dns_element is None or dns_element.get("enable", "yes") != "no"
    subnets: list[Subnet] = []
    hosts: dict[str, list[IPAddress]] = {}
    for index, ip_element in enumerate(root.findall("ip")):
        at = where / f"ip[{index}]"
        address_text = ip_element.get("address", "")
        prefix = ip_element.get("prefix") or ip_element.get("netmask")
        try:
            interface = ipaddress.ip_interface(f"{address_text}/{prefix}" if prefix else address_text)
        except ValueError:
            at.fail(f"address {address_text!r} with prefix {prefix!r} is not an IP interface")
        if prefix is None and interface.version == 4:
            at.fail("has no prefix or netmask")
        dhcp = ip_element.find("dhcp")
        with at.checking():
            subnets.append(
                Subnet(
                    cidr=interface.network,
                    gateway=interface.ip if forwards else None,
                    dhcp=dhcp is not None,
                    dns=(interface.ip,) if dns_enabled else (),
                    # libvirt's dnsmasq answers DHCPv6 with <dhcp>, else only sends RAs.
                    ipv6_mode=None if interface.version == 4 else ("dhcpv6-stateful" if dhcp is not None else "slaac"),
                )
            )
        for h_index, host in enumerate(dhcp.findall("host") if dhcp is not None else ()):
            if host.get("mac") and host.get("ip"):
                here = at / f"dhcp/host[{h_index}]"
                mac = PORT.lookup("mac").codec.parse(host.get("mac"), here / "mac")
                hosts.setdefault(mac, []).append(IP.parse(host.get("ip"), here / "ip"))
    network: Network | None = None
    if subnets:
        mtu_element = root.find("mtu")
        network_id = NETWORK.lookup("id").codec.parse(name, where / "name")
        with where.checking():
            network = Network(
                id=network_id,
                name=name,
                mtu=int(mtu_element.get("size", "1500")) if mtu_element is not None else 1500,
                subnets=tuple(subnets),
                source=source,
            )
    return LibvirtNetwork(name=name, bridge=bridge, network=network, hosts={m: tuple(v) for m, v in hosts.items()})


@dataclass(frozen=True, slots=True)
class Metadata:
    """The ``<meta169:instance>`` element, checked: inventory fields and port overrides."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    # The element each field came from, for errors the model finds.
    elements: Mapping[str, str] = field(default_factory=dict)
    network: str | None = None
    ips: tuple[IPAddress, ...] = ()
    ports: Mapping[str, tuple[str | None, tuple[IPAddress, ...]]] = field(default_factory=dict)


def parse_metadata(element: ET.Element | None, where: Where) -> Metadata:
    """Check every child of the ``<meta169:instance>`` element with the inventory codecs."""
    if element is None:
        return Metadata()
    fields: dict[str, Any] = {}
    elements: dict[str, str] = {}
    maps: dict[str, dict[str, str]] = {}
    keys: list[Any] = []
    network: str | None = None
    ips: list[IPAddress] = []
    ports: dict[str, tuple[str | None, tuple[IPAddress, ...]]] = {}
    counts: dict[str, int] = {}
    for child in element:
        tag = child.tag.removeprefix(_NS) if isinstance(child.tag, str) else ""
        if not isinstance(child.tag, str) or not child.tag.startswith(_NS) or tag not in ELEMENTS:
            _unknown(child, where)
        index = counts.get(tag, 0)
        counts[tag] = index + 1
        at = where / f"{PREFIX}:{tag}"
        text = child.text or ""
        if tag in TEXT_ELEMENTS:
            if index:
                at.fail("is given twice")
            fields[TEXT_ELEMENTS[tag]] = INSTANCE.lookup(TEXT_ELEMENTS[tag]).codec.parse(text.strip(), at)
            elements[TEXT_ELEMENTS[tag]] = at.field
        elif tag in _NAMED_MAPS:
            name = _attribute(child, "name", at / index, empty=True)
            mapping = maps.setdefault(_NAMED_MAPS[tag], {})
            if name in mapping:
                (at / index).fail(f"name {name!r} is given twice")
            mapping[name] = text
        elif tag == "key":
            entry = {"name": _attribute(child, "name", at / index), "data": text.strip()}
            if child.get("type"):
                entry["type"] = child.get("type", "")
            keys.append(KEY.parse(entry, at / index))
        elif tag == "user-data":
            if index:
                at.fail("is given twice")
            fields["user_data"] = _user_data(child, text, at)
        elif tag == "vendor-data":
            if index:
                at.fail("is given twice")
            try:
                value = json.loads(text)
            except ValueError as exc:
                at.fail(f"is not JSON: {exc}")
            fields["vendor_data"] = INSTANCE.lookup("vendor_data").codec.parse(value, at)
        elif tag == "network":
            if index:
                at.fail("is given twice")
            network = NETWORK.lookup("id").codec.parse(text.strip(), at)
        elif tag == "ip":
            ips.append(IP.parse(text.strip(), at / index))
        else:
            mac, port_network, port_ips = _port_override(child, at / index)
            if mac in ports:
                (at / index).fail(f"MAC {mac} is given twice")
            ports[mac] = (port_network, port_ips)
    fields.update(maps)
    if keys:
        names = [k.name for k in keys]
        for index, name in enumerate(names):
            if names.index(name) != index:
                (where / f"{PREFIX}:key" / index).fail(f"key name {name!r} is given twice")
        fields["keys"] = tuple(keys)
    return Metadata(fields=fields, elements=elements, network=network, ips=tuple(ips), ports=ports)


def _unknown(child: ET.Element, where: Where) -> NoReturn:
    import difflib

    tag = str(child.tag)
    local = tag.rpartition("}")[2]
    if not tag.startswith(_NS):
        where.fail(f"element {tag} is not in the {NAMESPACE} namespace")
    close = difflib.get_close_matches(local, ELEMENTS, n=1)
    hint = f" (did you mean {PREFIX}:{close[0]}?)" if close else f"; known: {', '.join(ELEMENTS)}"
    (where / f"{PREFIX}:{local}").fail(f"unknown element{hint}")


def _attribute(element: ET.Element, name: str, where: Where, *, empty: bool = False) -> str:
    value = element.get(name)
    if value is None or (not value and not empty):
        where.fail(f"needs a {name}= attribute")
    return value


def _user_data(element: ET.Element, text: str, where: Where) -> bytes:
    encoding = element.get("encoding", "text")
    if encoding == "base64":
        try:
            base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            where.fail(f"is not valid base64: {exc}")
        data: bytes = INSTANCE.lookup("user_data_b64").codec.parse(text, where)
        return data
    if encoding != "text":
        where.fail(f"encoding must be text or base64, not {encoding!r}")
    data = INSTANCE.lookup("user_data").codec.parse(text, where)
    return data


def _port_override(element: ET.Element, where: Where) -> tuple[str, str | None, tuple[IPAddress, ...]]:
    mac = PORT.lookup("mac").codec.parse(_attribute(element, "mac", where), where / "mac")
    network = element.get("network")
    if network is not None:
        network = NETWORK.lookup("id").codec.parse(network, where / "network")
    ips: list[IPAddress] = []
    for index, child in enumerate(element):
        if child.tag != f"{_NS}ip":
            (where / str(child.tag).rpartition("}")[2]).fail(f"a port holds only {PREFIX}:ip elements")
        ips.append(IP.parse((child.text or "").strip(), where / f"{PREFIX}:ip" / index))
    return mac, network, tuple(ips)


def build_instance(
    domain: Domain,
    networks: Mapping[str, LibvirtNetwork],
    leases: Mapping[tuple[str, str], tuple[IPAddress, ...]],
    source: str,
) -> Instance:
    """The instance a domain describes; ``leases`` maps (libvirt network, MAC) to IPs."""
    where = Where(source, f"domain {domain.name} ({domain.uuid})")
    uuid = INSTANCE.lookup("uuid").codec.parse(domain.uuid, where / "uuid")
    name = INSTANCE.lookup("name").codec.parse(domain.name, where / "name")
    meta = parse_metadata(domain.metadata, where / "metadata")
    by_bridge = {n.bridge: n.name for n in networks.values() if n.bridge}
    macs = {i.mac for i in domain.interfaces}
    for mac in meta.ports:
        if mac not in macs:
            (where / "metadata" / f"{PREFIX}:port").fail(f"MAC {mac} is on no interface of the domain")
    ports: list[Any] = []
    for index, interface in enumerate(domain.interfaces):
        libvirt_network = interface.network or by_bridge.get(interface.bridge or "")
        override_network, override_ips = meta.ports.get(interface.mac, (None, ()))
        network_id = override_network or (meta.network if index == 0 else None)
        known = networks.get(libvirt_network) if libvirt_network is not None else None
        if network_id is None and known is not None and known.network is not None:
            network_id = known.name
        ips = override_ips or (meta.ips if index == 0 else ())
        if not ips and libvirt_network is not None:
            found = [
                *(known.hosts.get(interface.mac, ()) if known else ()),
                *leases.get((libvirt_network, interface.mac), ()),
            ]
            ips = tuple(dict.fromkeys(found))
        if network_id is None:
            if override_ips or (index == 0 and meta.ips):
                (where / f"devices/interface[{index}]").fail(
                    f"{PREFIX}:ip is given, but the interface is on no libvirt network with an <ip>: "
                    f"add {PREFIX}:network"
                )
            continue
        if not ips:
            continue  # no address yet: a port once DHCP leases one
        ports.append(
            PORT.parse(
                {"network": network_id, "mac": interface.mac, "ips": [str(ip) for ip in ips], "device_number": index},
                where / "ports" / len(ports),
            )
        )
    # Checks only the model makes (a host name's form) name the element they are about.
    for attr, element in meta.elements.items():
        if any(f.attr == attr and f.located for f in INSTANCE.fields):
            with Where(where.source, where.entry, element).checking():
                Instance(uuid=uuid, name=name, **{attr: meta.fields[attr]})
    values: dict[str, Any] = {"uuid": uuid, "name": name, "source": source, "ports": tuple(ports), **meta.fields}
    if domain.architecture:
        values["architecture"] = domain.architecture
    with (where / "metadata").checking():
        return Instance(**values)


def describe(
    domains: Sequence[Domain],
    networks: Sequence[LibvirtNetwork],
    leases: Mapping[tuple[str, str], tuple[IPAddress, ...]],
    source: str,
) -> Inventory:
    """The inventory a libvirt connection describes, every entry owned by ``source``."""
    by_name = {n.name: n for n in networks}
    return Inventory(
        source=source,
        networks=tuple(n.network for n in sorted(networks, key=lambda n: n.name) if n.network is not None),
        instances=tuple(build_instance(d, by_name, leases, source) for d in sorted(domains, key=lambda d: d.uuid)),
    )


def metadata_element(instance: Instance, *, network: str | None = None, bare: bool = False) -> str:
    """The ``<meta169:instance>`` element that makes a domain describe ``instance``.

    For building a domain's ``<metadata>``: hostname, project, zone, region, type,
    image, keys, tags, metadata, user data and vendor data, plus ``network`` and the
    first port's IPs for the first interface when given. The inverse of
    :func:`parse_metadata`. ``bare`` leaves the namespace out, as
    ``virDomainSetMetadata`` (``virsh metadata --set``) takes the element: libvirt
    puts it and its children in the namespace passed as the call's ``uri``
    (:data:`NAMESPACE`), and refuses an element that declares one itself.
    """
    ns = "" if bare else _NS
    ET.register_namespace(PREFIX, NAMESPACE)
    root = ET.Element(f"{ns}instance")

    def add(tag: str, text: str, **attrs: str) -> ET.Element:
        child = ET.SubElement(root, f"{ns}{tag}", attrs)
        child.text = text
        return child

    for tag, attr in TEXT_ELEMENTS.items():
        add(tag, str(getattr(instance, attr)))
    for key in instance.keys:
        add("key", key.data, name=key.name, type=key.type)
    for tag, attr in _NAMED_MAPS.items():
        for name, value in getattr(instance, attr).items():
            add(tag, value, name=name)
    if instance.user_data is not None:
        try:
            add("user-data", instance.user_data.decode("utf-8"))
        except UnicodeDecodeError:
            add("user-data", base64.b64encode(instance.user_data).decode("ascii"), encoding="base64")
    if instance.vendor_data is not None:
        add("vendor-data", json.dumps(instance.vendor_data))
    if network is not None:
        add("network", network)
        primary = instance.primary_port
        for ip in primary.ips if primary is not None else ():
            add("ip", str(ip))
    return ET.tostring(root, encoding="unicode")


# -- the IO part: a libvirt connection ---------------------------------------------------------


def _binding() -> ModuleType:
    try:
        import libvirt
    except ImportError as exc:
        raise SourceError(
            "the libvirt Python binding is not installed (pip install libvirt-python)", source="libvirt"
        ) from exc
    # libvirt prints every error to stderr unless a handler takes it; ours are raised.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def _message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or exc)


def open_connection(uri: str) -> Any:
    """A connection to ``uri`` (read-write: leases and metadata need no more, but
    events need a full connection); SourceError when it cannot be made."""
    lv = _binding()
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise SourceError(f"cannot connect: {_message(exc)}", source=source_name(uri)) from exc


@contextlib.contextmanager
def _reading(source: str, what: str) -> Iterator[ModuleType]:
    lv = _binding()
    try:
        yield lv
    except lv.libvirtError as exc:
        raise SourceError(f"cannot {what}: {_message(exc)}", source=source) from exc


def _leases(lv: ModuleType, net: Any) -> list[dict[str, Any]]:
    try:
        return list(net.DHCPLeases())
    except lv.libvirtError as exc:
        # The test driver and networks without dnsmasq have no leases to give, and a
        # network undefined since it was listed has none any more.
        if exc.get_error_code() in (lv.VIR_ERR_NO_SUPPORT, lv.VIR_ERR_OPERATION_INVALID, lv.VIR_ERR_NO_NETWORK):
            return []
        raise


def read_leases(conn: Any, source: str) -> dict[tuple[str, str], tuple[IPAddress, ...]]:
    """(libvirt network name, MAC) -> the IPs its DHCP server leased to that MAC."""
    found: dict[tuple[str, str], list[IPAddress]] = {}
    with _reading(source, "read DHCP leases") as lv:
        for net in conn.listAllNetworks():
            name = net.name()
            for lease in _leases(lv, net):
                mac, addr = lease.get("mac"), lease.get("ipaddr")
                if not mac or not addr:
                    continue  # DHCPv6 leases may name a DUID and no MAC
                with contextlib.suppress(ValueError, Meta169Error):
                    key = (name, PORT.lookup("mac").codec.parse(mac, Where(source)))
                    found.setdefault(key, []).append(ipaddress.ip_address(addr))
    return {key: tuple(dict.fromkeys(ips)) for key, ips in sorted(found.items())}


def read_libvirt(conn: Any, source: str) -> Inventory:
    """Everything a connection holds, as an inventory owned by ``source``."""
    networks: list[LibvirtNetwork] = []
    with _reading(source, "list networks") as lv:
        for net in conn.listAllNetworks():
            try:
                networks.append(parse_network(net.XMLDesc(0), source))
            except lv.libvirtError as exc:
                if exc.get_error_code() != lv.VIR_ERR_NO_NETWORK:
                    raise  # else undefined since it was listed; its event brings a new sync
    leases = read_leases(conn, source)
    domains: list[Domain] = []
    with _reading(source, "list domains") as lv:
        for dom in conn.listAllDomains():
            try:
                xml = dom.XMLDesc(0)
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    continue  # undefined since it was listed; its event brings a new sync
                raise
            domains.append(parse_domain(xml, source))
    return describe(domains, networks, leases, source)


def sync_libvirt(
    registry: Registry,
    uri: str,
    *,
    dry_run: bool = False,
    connection: Any = None,
    adopt: Iterable[str] = (),
) -> SyncResult:
    """Make ``registry`` match the libvirt connection ``uri`` for source ``libvirt:<uri>``.

    ``connection`` reuses an open connection (the watch does); otherwise one is opened
    and closed here. All or nothing: an invalid domain raises before any write.
    """
    source = source_name(uri)
    conn = open_connection(uri) if connection is None else connection
    try:
        desired = read_libvirt(conn, source)
    finally:
        if connection is None:
            with contextlib.suppress(Exception):
                conn.close()
    return sync_registry(registry, desired, source, dry_run=dry_run, adopt=adopt)


_event_loop_lock = threading.Lock()
_event_loop_started = False


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per
    process; it must be registered before the connection whose events are wanted."""
    global _event_loop_started  # noqa: PLW0603 - libvirt's event loop is process-wide
    with _event_loop_lock:
        if _event_loop_started:
            return
        lv = _binding()
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                lv.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """How often the watch looks without an event: DHCP leases (which raise no libvirt
    event) every ``poll``, a full re-read every ``resync``, and a retry of a lost
    connection every ``reconnect`` seconds."""

    poll: float = 1.0
    resync: float = 60.0
    reconnect: float = 2.0
    # Events come in bursts (define, then metadata); one sync after the burst.
    settle: float = 0.05


_SLICE = 0.1

# The domain events that can change what a domain describes, and network lifecycle.
_DOMAIN_EVENTS: Final = (
    "VIR_DOMAIN_EVENT_ID_LIFECYCLE",
    "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE",
    "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED",
    "VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED",
)


def watch_libvirt(
    registry: Registry,
    uri: str,
    *,
    stop: threading.Event,
    on_result: Callable[[SyncResult], None],
    on_error: Callable[[Meta169Error], None],
    dry_run: bool = False,
    timing: WatchTiming | None = None,
    adopt: Iterable[str] = (),
    wake: threading.Event | None = None,
) -> None:
    """Sync ``uri`` into ``registry`` now, on every domain or network event, when DHCP
    leases change, after every reconnect and whenever ``wake`` is set, until ``stop``
    is set.

    A sync that fails on data (an invalid domain, a conflict) or on the registry is
    reported to ``on_error`` and retried at the next event or poll; a lost connection
    is reported and reopened, and everything re-read.
    """
    timing = timing or WatchTiming()
    ensure_event_loop()
    source = source_name(uri)
    while not stop.is_set():
        try:
            conn = open_connection(uri)
        except SourceError as exc:
            on_error(exc)
            stop.wait(timing.reconnect)
            continue
        try:
            _follow(conn, registry, uri, stop, on_result, on_error, dry_run, timing, tuple(adopt), wake)
        except SourceError as exc:
            on_error(exc)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        if not stop.is_set():
            log.info("%s: reconnecting in %.1fs", source, timing.reconnect)
            stop.wait(timing.reconnect)


def _follow(
    conn: Any,
    registry: Registry,
    uri: str,
    stop: threading.Event,
    on_result: Callable[[SyncResult], None],
    on_error: Callable[[Meta169Error], None],
    dry_run: bool,
    timing: WatchTiming,
    adopt: tuple[str, ...],
    wake: threading.Event | None,
) -> None:
    source = source_name(uri)
    wake = wake if wake is not None else threading.Event()
    closed = threading.Event()

    def on_event(*_args: Any) -> None:
        wake.set()

    def on_close(*_args: Any) -> None:
        closed.set()
        wake.set()

    domain_ids: list[int] = []
    network_ids: list[int] = []
    with _reading(source, "register for events") as lv:
        conn.registerCloseCallback(on_close, None)
        # Find a dead daemon within seconds even when no event is due.
        conn.setKeepAlive(5, 3)
        domain_ids += [conn.domainEventRegisterAny(None, getattr(lv, e), on_event, None) for e in _DOMAIN_EVENTS]
        network_ids.append(conn.networkEventRegisterAny(None, lv.VIR_NETWORK_EVENT_ID_LIFECYCLE, on_event, None))
    try:
        wake.set()  # everything is re-read after every (re)connect
        last_leases: object = None
        last_full = next_poll = 0.0
        while not stop.is_set() and not closed.is_set():
            # Short waits, so that a stop is seen at once whatever the poll interval.
            woke = wake.wait(_SLICE)
            if stop.is_set() or closed.is_set():
                return
            if not woke and time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + timing.poll
            if woke:
                stop.wait(timing.settle)
                wake.clear()
            leases = read_leases(conn, source)
            if not (woke or leases != last_leases or time.monotonic() - last_full >= timing.resync):
                continue
            last_leases, last_full = leases, time.monotonic()
            try:
                result = sync_libvirt(registry, uri, dry_run=dry_run, connection=conn, adopt=adopt)
            except (InventoryError, Conflict) as exc:
                on_error(exc)  # the source must change first: wait for its next event
                continue
            except RegistryError as exc:
                on_error(exc)
                last_leases = None  # the registry failed: try again at the next poll
                continue
            on_result(result)
    finally:
        for ident in domain_ids:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(ident)
        for ident in network_ids:
            with contextlib.suppress(Exception):
                conn.networkEventDeregisterAny(ident)
        with contextlib.suppress(Exception):
            conn.unregisterCloseCallback()
