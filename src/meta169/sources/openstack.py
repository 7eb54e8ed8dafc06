"""OpenStack as a source: Nova's servers and Neutron's networks, read with openstacksdk.

The cloud is found the way every OpenStack tool finds it: ``clouds.yaml``
(``--cloud NAME`` or ``OS_CLOUD``) or the ``OS_*`` variables; the registry source
is ``openstack:<cloud name>`` (``envvars`` for the variables alone).

The mapping is pure and works on the APIs' own JSON field names, exactly as the API
references print them (:func:`describe`):

- a Neutron network is a network: id, name, project, MTU, and its subnets (CIDR,
  gateway, ``enable_dhcp``, DNS name servers, host routes, ``ipv6_address_mode`` or
  else ``ipv6_ra_mode``);
- a Neutron router is a router on the networks of its interface ports (the device
  owners in :data:`ROUTER_INTERFACE_OWNERS`; the gateway port is the outside);
- a Nova server is an instance: uuid, name, ``OS-EXT-SRV-ATTR:hostname``, project,
  ``OS-EXT-AZ:availability_zone``, the flavor's name (embedded since microversion
  2.47, else looked up in the flavor list), image id, metadata, its key pair's public
  key (looked up by name and owner, microversion 2.10), ``OS-EXT-SRV-ATTR:user_data``
  (base64; admin only, microversion 2.3), tags (2.26; a tag becomes a key with an
  empty value), security group names, launch index, creation time, and as ports the
  Neutron ports it owns (``device_owner`` ``compute:*``) with their MACs and fixed IPs.

openstacksdk negotiates the newest microversion both sides know; fields an older
microversion or a non-admin view leaves out keep the model's defaults. A server in a
Nova cell that does not answer is listed (microversion 2.69 and later) with status
``UNKNOWN`` and no name or addresses (:func:`unanswered_servers`): its instance is
kept as it is, never changed or removed for it.

:func:`watch_openstack` syncs on a timer: Nova and Neutron announce changes only
over AMQP notifications, which meta169 does not consume.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

from meta169.errors import ConfigError, Meta169Error, SourceError
from meta169.inventory import Inventory
from meta169.inventory.schema import INSTANCE, KEY, NETWORK, PORT, ROUTER, Where
from meta169.model import Instance, Network, Router
from meta169.registry.base import Registry
from meta169.sources.reconcile import SyncResult, sync_registry

log = logging.getLogger("meta169.sources.openstack")

# A router's ports on its internal networks [neutron-lib constants.ROUTER_INTERFACE_OWNERS].
ROUTER_INTERFACE_OWNERS: Final = (
    "network:router_interface",
    "network:router_interface_distributed",
    "network:ha_router_replicated_interface",
)
# Nova's server fields that fill one instance field each: Nova's name -> inventory field.
SERVER_FIELDS: Final[Mapping[str, str]] = {
    "id": "uuid",
    "name": "name",
    "OS-EXT-SRV-ATTR:hostname": "hostname",
    "tenant_id": "project_id",
    "OS-EXT-AZ:availability_zone": "availability_zone",
    "OS-EXT-SRV-ATTR:launch_index": "launch_index",
    "created": "created_at",
    "metadata": "metadata",
    "OS-EXT-SRV-ATTR:user_data": "user_data_b64",
}


def source_name(cloud: str) -> str:
    return f"openstack:{cloud}"


@dataclass(frozen=True, slots=True)
class CloudData:
    """What the APIs returned, as their JSON objects: the input of :func:`describe`."""

    networks: Sequence[Mapping[str, Any]] = ()
    subnets: Sequence[Mapping[str, Any]] = ()
    ports: Sequence[Mapping[str, Any]] = ()
    routers: Sequence[Mapping[str, Any]] = ()
    servers: Sequence[Mapping[str, Any]] = ()
    # Flavor id -> name, for servers listed before microversion 2.47.
    flavors: Mapping[str, str] = field(default_factory=dict)
    # (user id, key pair name) -> the key pair object.
    keypairs: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    region: str = ""


# -- the pure part ----------------------------------------------------------------------------


def describe(data: CloudData, source: str) -> Inventory:
    """The inventory a cloud's API answers describe, every entry owned by ``source``;
    servers of a cell that does not answer (:func:`unanswered_servers`) are left out."""
    subnets_of: dict[str, list[Mapping[str, Any]]] = {}
    for subnet in data.subnets:
        subnets_of.setdefault(str(subnet.get("network_id")), []).append(subnet)
    networks = tuple(network_from(n, subnets_of.get(str(n.get("id")), []), source) for n in data.networks)
    routers = tuple(router_from(r, data.ports, source) for r in data.routers)
    instances = tuple(
        instance_from(s, data.ports, data.flavors, data.keypairs, data.region, source)
        for s in data.servers
        if not _unanswered(s)
    )
    return Inventory(source=source, networks=networks, routers=routers, instances=instances)


def unanswered_servers(data: CloudData) -> tuple[str, ...]:
    """The ids of the servers Nova listed without their details, their cell not answering.

    Since microversion 2.69 such a server is a minimal construct: id, status
    ``UNKNOWN``, tenant, creation time, no name and no addresses [nova api-guide
    "Handling Down Cells"; doc/api_samples/servers/v2.69/servers-details-resp.json].
    """
    return tuple(str(s["id"]) for s in data.servers if _unanswered(s) and s.get("id"))


def _unanswered(server: Mapping[str, Any]) -> bool:
    # A server whose cell answers has a name, even an empty one; the SDK gives None
    # for a field the API left out.
    return server.get("status") == "UNKNOWN" and server.get("name") is None


def network_from(network: Mapping[str, Any], subnets: Sequence[Mapping[str, Any]], source: str) -> Network:
    where = Where(source, f"network {network.get('name') or ''} ({network.get('id')})".replace(" ()", ""))
    # Neutron lists a network's subnets in its "subnets" ids; keep that order.
    order = {sid: i for i, sid in enumerate(network.get("subnets") or ())}
    ordered = sorted(subnets, key=lambda s: order.get(s.get("id"), len(order)))
    doc: dict[str, Any] = {
        "id": network.get("id"),
        "name": network.get("name") or "",
        "project_id": network.get("project_id") or network.get("tenant_id") or "",
        "subnets": [_subnet_doc(s) for s in ordered],
        "source": source,
    }
    if network.get("mtu"):
        doc["mtu"] = network["mtu"]
    return NETWORK.parse(doc, where)


def _subnet_doc(subnet: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "cidr": subnet.get("cidr"),
        "gateway": subnet.get("gateway_ip"),
        "dhcp": subnet.get("enable_dhcp", True),
        "dns": list(subnet.get("dns_nameservers") or ()),
        "host_routes": [
            {"destination": r.get("destination"), "nexthop": r.get("nexthop")} for r in subnet.get("host_routes") or ()
        ],
    }
    # Neutron's address mode says how hosts get addresses; the RA mode alone still
    # tells SLAAC from DHCPv6 [neutron api-ref, subnets: ipv6_address_mode, ipv6_ra_mode].
    mode = subnet.get("ipv6_address_mode") or subnet.get("ipv6_ra_mode")
    if mode:
        doc["ipv6_mode"] = mode
    return doc


def router_from(router: Mapping[str, Any], ports: Sequence[Mapping[str, Any]], source: str) -> Router:
    where = Where(source, f"router {router.get('name') or ''} ({router.get('id')})".replace(" ()", ""))
    networks: list[str] = []
    for port in ports:
        if port.get("device_id") == router.get("id") and port.get("device_owner") in ROUTER_INTERFACE_OWNERS:
            net = str(port.get("network_id"))
            if net not in networks:
                networks.append(net)
    doc = {
        "id": router.get("id"),
        "project_id": router.get("project_id") or router.get("tenant_id") or "",
        "networks": networks,
        "source": source,
    }
    return ROUTER.parse(doc, where)


def instance_from(
    server: Mapping[str, Any],
    ports: Sequence[Mapping[str, Any]],
    flavors: Mapping[str, str],
    keypairs: Mapping[tuple[str, str], Mapping[str, Any]],
    region: str,
    source: str,
) -> Instance:
    """The instance a Nova server describes, with the Neutron ports it owns."""
    where = Where(source, f"server {server.get('name')} ({server.get('id')})")
    values: dict[str, Any] = {"source": source}
    for nova, key in SERVER_FIELDS.items():
        raw = server.get(nova)
        if raw is None or (raw == "" and nova != "name"):
            continue  # left out by this microversion or policy, or empty
        f = INSTANCE.lookup(key)
        values[f.attr] = f.codec.parse(raw, where / nova)
    if "uuid" not in values:
        (where / "id").fail("is required")
    # Checks only the model makes (a host name's form) name the Nova field they are about.
    for nova, key in SERVER_FIELDS.items():
        f = INSTANCE.lookup(key)
        if f.located and f.attr in values:
            with (where / nova).checking():
                Instance(uuid=values["uuid"], name=values.get("name") or "?", **{f.attr: values[f.attr]})
    if region:
        values["region"] = region
    image = server.get("image")
    if isinstance(image, Mapping) and image.get("id"):
        values["image_id"] = INSTANCE.lookup("image_id").codec.parse(image["id"], where / "image.id")
    flavor = server.get("flavor")
    if isinstance(flavor, Mapping):
        name = flavor.get("original_name") or flavors.get(str(flavor.get("id")))
        if name:
            values["instance_type"] = INSTANCE.lookup("instance_type").codec.parse(name, where / "flavor")
        else:
            log.warning(
                "%s: flavor %s of server %s is not in the flavor list", source, flavor.get("id"), values["uuid"]
            )
    tags = server.get("tags")
    if tags:
        values["tags"] = INSTANCE.lookup("tags").codec.parse({str(t): "" for t in tags}, where / "tags")
    groups = server.get("security_groups") or ()
    names = list(dict.fromkeys(str(g.get("name")) for g in groups if isinstance(g, Mapping) and g.get("name")))
    if names:
        values["security_groups"] = INSTANCE.lookup("security_groups").codec.parse(names, where / "security_groups")
    key_name = server.get("key_name")
    if key_name:
        pair = keypairs.get((str(server.get("user_id") or ""), str(key_name)))
        if pair is None:
            log.warning("%s: key pair %s of server %s is gone; serving no key", source, key_name, values["uuid"])
        else:
            doc = {"name": key_name, "data": pair.get("public_key"), "type": pair.get("type") or "ssh"}
            values["keys"] = (KEY.parse(doc, where / "key_name"),)
    values["ports"] = _ports(server, ports, where)
    with where.checking():
        return Instance(**values)


def _ports(server: Mapping[str, Any], ports: Sequence[Mapping[str, Any]], where: Where) -> tuple[Any, ...]:
    mine = [
        p
        for p in ports
        if p.get("device_id") == server.get("id") and str(p.get("device_owner") or "").startswith("compute:")
    ]
    # Nova lists addresses in the order the interfaces were attached; ports have no order.
    macs: list[str] = []
    for addresses in (server.get("addresses") or {}).values():
        for address in addresses or ():
            mac = str(address.get("OS-EXT-IPS-MAC:mac_addr") or "").lower()
            if mac and mac not in macs:
                macs.append(mac)
    mine.sort(key=lambda p: (macs.index(p["mac_address"]) if p.get("mac_address") in macs else len(macs), p["id"]))
    out: list[Any] = []
    for index, port in enumerate(mine):
        ips = [ip["ip_address"] for ip in port.get("fixed_ips") or () if ip.get("ip_address")]
        if not ips:
            continue  # a port whose address is not allocated yet
        doc = {
            "id": port.get("id"),
            "network": port.get("network_id"),
            "mac": port.get("mac_address"),
            "ips": ips,
            "device_number": index,
        }
        out.append(PORT.parse(doc, where / f"port {port.get('id')}"))
    return tuple(out)


# -- the IO part: openstacksdk -----------------------------------------------------------------


def _sdk() -> ModuleType:
    try:
        import openstack
    except ImportError as exc:
        raise SourceError("openstacksdk is not installed (pip install openstacksdk)", source="openstack") from exc
    module: ModuleType = openstack
    return module


@contextlib.contextmanager
def _sdk_calls(source: str, what: str) -> Iterator[None]:
    """openstacksdk's own deprecation notices silenced (they are for its developers,
    not for whoever runs a sync), its exceptions translated."""
    import keystoneauth1.exceptions
    import openstack.exceptions
    import openstack.warnings

    with warnings.catch_warnings():
        for category in (
            openstack.warnings.OpenStackDeprecationWarning,
            openstack.warnings.OpenStackWarning,
            # RemovedInSDK50Warning and its kin: the SDK warns about its own internals.
            getattr(openstack.warnings, "_RemovedInSDKWarning", openstack.warnings.OpenStackWarning),
        ):
            warnings.filterwarnings("ignore", category=category)
        try:
            yield
        except openstack.exceptions.ConfigException as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except (openstack.exceptions.SDKException, keystoneauth1.exceptions.ClientException) as exc:
            raise SourceError(f"cannot {what}: {exc}", source=source) from exc


# Seconds an API request may wait for its reply when clouds.yaml (api_timeout) and
# OS_API_TIMEOUT set nothing: openstacksdk's default is none, and a Nova or Neutron
# that accepted a request and never answers would hold the sync for ever (the service
# only restarted by its watchdog). Per request, not per sync: a page of a long
# server list gets all of it.
API_TIMEOUT_S = 60.0


def connect(cloud: str | None) -> Any:
    """A connection to ``cloud`` (clouds.yaml), or to what OS_CLOUD / OS_* name, its
    requests bounded by the cloud's api_timeout or else :data:`API_TIMEOUT_S`."""
    openstack = _sdk()
    with _sdk_calls(source_name(cloud) if cloud else "openstack", "read the cloud configuration"):
        region = openstack.config.get_cloud_region(cloud=cloud)
        # Read when the connection makes its session, on its first request.
        if region.config.get("api_timeout") is None:
            region.config["api_timeout"] = API_TIMEOUT_S
        return openstack.connection.Connection(config=region)


def _dicts(resources: Any) -> list[dict[str, Any]]:
    return [r.to_dict(original_names=True, computed=False) for r in resources]


def read_openstack(conn: Any, source: str, *, all_projects: bool = True) -> CloudData:
    """The networks, subnets, ports, routers and servers a connection sees, with the
    flavors and key pairs those servers name."""
    with _sdk_calls(source, "list networks"):
        networks = _dicts(conn.network.networks())
    with _sdk_calls(source, "list subnets"):
        subnets = _dicts(conn.network.subnets())
    with _sdk_calls(source, "list ports"):
        ports = _dicts(conn.network.ports())
    with _sdk_calls(source, "list routers"):
        routers = _dicts(conn.network.routers())
    with _sdk_calls(source, "list servers"):
        servers = _dicts(conn.compute.servers(details=True, all_projects=all_projects))
    flavors: dict[str, str] = {}
    if any(isinstance(s.get("flavor"), Mapping) and not s["flavor"].get("original_name") for s in servers):
        with _sdk_calls(source, "list flavors"):
            flavors = {str(f.id): str(f.name) for f in conn.compute.flavors(details=True)}
    keypairs: dict[tuple[str, str], Mapping[str, Any]] = {}
    import openstack.exceptions

    for server in servers:
        key = (str(server.get("user_id") or ""), str(server.get("key_name") or ""))
        if not key[1] or key in keypairs:
            continue
        try:
            with _sdk_calls(source, f"read key pair {key[1]}"):
                pair = conn.compute.get_keypair(key[1], user_id=key[0] or None)
        except SourceError as exc:
            if isinstance(exc.__cause__, openstack.exceptions.NotFoundException):
                continue  # deleted since the server booted with it
            raise
        keypairs[key] = {"name": pair.name, "type": pair.type, "public_key": pair.public_key}
    region = str(getattr(conn.config, "region_name", None) or "")
    return CloudData(networks, subnets, ports, routers, servers, flavors, keypairs, region)


def sync_openstack(
    registry: Registry,
    cloud: str | None = None,
    *,
    dry_run: bool = False,
    all_projects: bool = True,
    connection: Any = None,
    adopt: Iterable[str] = (),
) -> SyncResult:
    """Make ``registry`` match the cloud for source ``openstack:<cloud name>``.

    Every listing is read in full before anything is planned: one that fails, on its
    first page or a later one, raises SourceError and nothing is written, so a
    failure is never taken for an empty cloud. Servers of a cell that does not answer
    keep their instances as they are.
    """
    conn = connect(cloud) if connection is None else connection
    try:
        source = connection_source(conn, cloud)
        data = read_openstack(conn, source, all_projects=all_projects)
    finally:
        if connection is None:
            with contextlib.suppress(Exception):
                conn.close()
    unanswered = unanswered_servers(data)
    if unanswered:
        log.warning(
            "%s: %d servers are in a Nova cell that does not answer (listed as UNKNOWN without details); "
            "their instances stay as they are until it answers",
            source,
            len(unanswered),
        )
    desired = describe(data, source)
    return sync_registry(registry, desired, source, dry_run=dry_run, adopt=adopt, keep=unanswered)


def connection_source(conn: Any, cloud: str | None) -> str:
    """The registry source of a connection: ``openstack:<its cloud's name>``."""
    return source_name(str(conn.config.name or cloud or "envvars"))


# -- the watch -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """A sync every ``interval`` seconds; after failures, longer waits (:meth:`delay`)."""

    interval: float = 30.0
    # Failures in a row double the wait, up to this (or the interval, if longer).
    backoff_limit: float = 300.0

    def delay(self, failures: int) -> float:
        """Seconds until the next sync after ``failures`` failed ones in a row."""
        if failures <= 0:
            return self.interval
        doubled: float = self.interval * 2.0 ** min(failures - 1, 32)
        return min(doubled, self.longest)

    @property
    def longest(self) -> float:
        """The longest wait between two syncs."""
        return max(self.interval, self.backoff_limit)


# How often a wait looks at ``stop`` and ``wake``: a stop is seen at once.
_SLICE = 0.1


def watch_openstack(
    registry: Registry,
    cloud: str | None,
    *,
    stop: threading.Event,
    on_result: Callable[[SyncResult], None],
    on_error: Callable[[Meta169Error], None],
    wake: threading.Event | None = None,
    dry_run: bool = False,
    all_projects: bool = True,
    timing: WatchTiming | None = None,
    adopt: Iterable[str] = (),
) -> None:
    """Sync ``cloud`` into ``registry`` now, then every ``timing.interval`` seconds and
    whenever ``wake`` is set, until ``stop`` is set.

    A sync that fails (the cloud unreachable, a listing that failed partway, invalid
    data, a conflict, the registry) writes nothing and removes nothing
    (:func:`sync_openstack`); it is reported to ``on_error``, logged with the time of
    the next attempt, and retried with backoff (:meth:`WatchTiming.delay`) on a new
    connection. A ConfigError (clouds.yaml, the cloud's name) is raised: waiting does
    not fix it.
    """
    timing = timing or WatchTiming()
    wake = wake if wake is not None else threading.Event()
    where = source_name(cloud or "envvars")
    conn: Any = None
    failures = 0
    try:
        while not stop.is_set():
            wake.clear()
            try:
                if conn is None:
                    conn = connect(cloud)
                    where = connection_source(conn, cloud)
                result = sync_openstack(
                    registry, cloud, dry_run=dry_run, all_projects=all_projects, connection=conn, adopt=adopt
                )
            except ConfigError:
                raise
            except Meta169Error as exc:
                failures += 1
                on_error(exc)
                if isinstance(exc, SourceError):
                    # A fresh connection next time: a new token and catalog.
                    _close(conn)
                    conn = None
                log.warning(
                    "%s: %s; %d failed in a row, nothing written or removed; next attempt in %g s",
                    where,
                    "cannot sync" if isinstance(exc, SourceError) else "sync refused",
                    failures,
                    timing.delay(failures),
                )
            else:
                failures = 0
                on_result(result)
            _wait(stop, wake, timing.delay(failures))
    finally:
        _close(conn)


def _wait(stop: threading.Event, wake: threading.Event, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stop.is_set() and not wake.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        stop.wait(min(left, _SLICE))


def _close(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
