"""Inventory files: YAML or JSON lists of networks, routers and instances.

:func:`parse_inventory` turns text into validated model objects (pure);
:func:`load_inventory` reads a file; :func:`apply_inventory` writes an inventory to
a registry, idempotently. Every problem is an InventoryError that names the file,
the entry (``instances[0] (web-1)``) and the field (``ports[0].ips[0]``). Unknown
fields are errors, so a typo never silently drops data.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast, get_args

import yaml

from meta169.errors import AmbiguousCaller, InventoryError, NotFound, ValidationError
from meta169.model import (
    MAX_USER_DATA,
    MAX_USER_DATA_B64,
    Caller,
    HostRoute,
    Instance,
    IPAddress,
    Ipv6Mode,
    KeyType,
    MetadataOptions,
    Network,
    Port,
    Router,
    SSHKey,
    Subnet,
    check_id,
    normalize_mac,
    parse_ip,
    parse_network,
)
from meta169.registry.base import Registry

Format = Literal["yaml", "json"]

_TOP = ("networks", "routers", "instances")
_NETWORK = ("id", "project_id", "name", "mtu", "subnets")
_SUBNET = ("cidr", "gateway", "dhcp", "dns", "host_routes", "ipv6_mode")
_HOST_ROUTE = ("destination", "nexthop")
_ROUTER = ("id", "project_id", "networks")
_INSTANCE = (
    "uuid", "name", "hostname", "project_id", "availability_zone", "region",
    "instance_type", "image_id", "launch_index", "created_at", "metadata", "keys",
    "user_data", "user_data_b64", "vendor_data", "tags", "security_groups", "ports",
    "metadata_options", "architecture",
)  # fmt: skip
_KEY = ("name", "type", "data")
_PORT = ("network", "mac", "ips", "id", "device_number")
_METADATA_OPTIONS = (
    "http_tokens", "http_endpoint", "http_put_response_hop_limit", "instance_metadata_tags",
)  # fmt: skip
_IPV6_MODES: tuple[str, ...] = get_args(Ipv6Mode)
_KEY_TYPES: tuple[str, ...] = get_args(KeyType)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Inventory:
    """A parsed inventory: model objects in file order, and where they came from."""

    source: str
    networks: tuple[Network, ...] = ()
    routers: tuple[Router, ...] = ()
    instances: tuple[Instance, ...] = ()


@dataclass(frozen=True, slots=True)
class KindCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What :func:`apply_inventory` did per kind, and the registry revision after it."""

    networks: KindCounts = field(default_factory=KindCounts)
    routers: KindCounts = field(default_factory=KindCounts)
    instances: KindCounts = field(default_factory=KindCounts)
    revision: int = 0

    @property
    def changed(self) -> int:
        return sum(k.created + k.updated for k in (self.networks, self.routers, self.instances))


def format_import_report(report: ImportReport) -> str:
    """One line per kind, for the CLI."""
    return (
        "\n".join(
            f"{kind}: {c.created} created, {c.updated} updated, {c.unchanged} unchanged"
            for kind, c in (
                ("networks", report.networks),
                ("routers", report.routers),
                ("instances", report.instances),
            )
        )
        + f"\nregistry revision: {report.revision}"
    )


# -- reading ----------------------------------------------------------------------------


def load_inventory(path: str | Path, fmt: Format | None = None) -> Inventory:
    """Read and parse an inventory file; the format comes from the extension, else sniffed."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", source=source) from exc
    except OSError as exc:
        raise InventoryError(f"cannot read: {exc.strerror}", source=source) from exc
    if fmt is None:
        suffix = path.suffix.lower()
        fmt = "json" if suffix == ".json" else "yaml" if suffix in (".yaml", ".yml") else None
    return parse_inventory(text, source=source, fmt=fmt)


def parse_inventory(text: str, *, source: str = "<inventory>", fmt: Format | None = None) -> Inventory:
    """Parse inventory text (YAML or JSON; sniffed when ``fmt`` is None) into model objects."""
    if fmt is None:
        fmt = "json" if text.lstrip().startswith(("{", "[")) else "yaml"
    document = _load_json(text, source) if fmt == "json" else _load_yaml(text, source)
    return _parse_document(document, source)


def _load_json(text: str, source: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise InventoryError(f"duplicate key {key!r}", source=source)
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}", source=source) from exc


try:  # libyaml's parser is about ten times faster than the pure-Python one
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _StrictLoader(_SafeLoader):
    """A safe loader that refuses duplicate mapping keys (PyYAML keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a safe loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise InventoryError(f"{where}invalid YAML: {exc.problem or exc}", source=source) from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"invalid YAML: {exc}", source=source) from exc


# -- validation helpers -------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _join(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where we are: the file and the entry; fields are passed per call."""

    source: str
    entry: str

    def fail(self, path: str, message: str) -> NoReturn:
        raise InventoryError(message, source=self.source, entry=self.entry, field=path)

    @contextmanager
    def at(self, path: str) -> Iterator[None]:
        """Model validation errors raised inside are reported at ``path``."""
        try:
            yield
        except InventoryError:
            raise
        except ValidationError as exc:
            self.fail(path, str(exc))

    def mapping(self, value: object, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, not {_type_name(value)}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(allowed)}"
                self.fail(_join(path, str(key)), f"unknown field{hint}")
        for key in required:
            if value.get(key) is None:
                self.fail(_join(path, key), "is required")
        return {k: v for k, v in value.items() if v is not None}

    def string(self, m: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
        value = m.get(key, default)
        if not isinstance(value, str):
            self.fail(_join(path, key), f"must be a string, not {_type_name(value)} (quote it in YAML)")
        return value

    def integer(self, m: Mapping[str, Any], key: str, path: str, default: int) -> int:
        value = m.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(_join(path, key), f"must be an integer, not {_type_name(value)}")
        return value

    def boolean(self, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = m.get(key, default)
        if not isinstance(value, bool):
            self.fail(_join(path, key), f"must be true or false, not {_type_name(value)}")
        return value

    def items(self, m: Mapping[str, Any], key: str, path: str) -> list[tuple[str, Any]]:
        """The elements of the list under ``key`` with their field paths."""
        value = m.get(key, [])
        here = _join(path, key)
        if not isinstance(value, list):
            self.fail(here, f"must be a list, not {_type_name(value)}")
        return [(_join(here, i), item) for i, item in enumerate(value)]

    def strings(self, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        result = []
        for where, item in self.items(m, key, path):
            if not isinstance(item, str):
                self.fail(where, f"must be a string, not {_type_name(item)}")
            result.append(item)
        return tuple(result)

    def string_map(self, m: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
        value = m.get(key, {})
        here = _join(path, key)
        if not isinstance(value, dict):
            self.fail(here, f"must be a mapping, not {_type_name(value)}")
        for k, v in value.items():
            if not isinstance(k, str):
                self.fail(here, f"key {k!r} must be a string (quote it in YAML)")
            if not isinstance(v, str):
                self.fail(_join(here, k), f"must be a string, not {_type_name(v)} (quote it in YAML)")
        return dict(value)

    def ident(self, kind: str, value: object, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_type_name(value)} (quote it in YAML)")
        with self.at(path):
            return check_id(kind, value)

    def ip(self, value: object, path: str) -> IPAddress:
        if not isinstance(value, str):
            self.fail(path, f"must be an IP address string, not {_type_name(value)}")
        with self.at(path):
            return parse_ip(value)


# -- entries ------------------------------------------------------------------------------


def _parse_document(document: Any, source: str) -> Inventory:
    top = _Entry(source, "")
    if document is None:
        return Inventory(source=source)
    body = top.mapping(document, "", _TOP)
    networks = _parse_list(body, "networks", source, _parse_network, "id")
    routers = _parse_list(body, "routers", source, _parse_router, "id")
    instances = _parse_list(body, "instances", source, _parse_instance, "name")
    inventory = Inventory(
        source=source,
        networks=tuple(n for n, _ in networks),
        routers=tuple(r for r, _ in routers),
        instances=tuple(i for i, _ in instances),
    )
    _check_unique(source, "networks", [(n.id, e) for n, e in networks], "id")
    _check_unique(source, "routers", [(r.id, e) for r, e in routers], "id")
    _check_unique(source, "instances", [(i.uuid, e) for i, e in instances], "uuid")
    _check_addresses(source, [(i, e) for i, e in instances])
    return inventory


def _label(kind: str, index: int, raw: object, name_key: str) -> str:
    name = raw.get(name_key) if isinstance(raw, dict) else None
    return f"{kind}[{index}] ({name})" if isinstance(name, str) and name else f"{kind}[{index}]"


def _parse_list(
    body: Mapping[str, Any],
    kind: str,
    source: str,
    parse: Callable[[_Entry, Any], T],
    name_key: str,
) -> list[tuple[T, str]]:
    value = body.get(kind, [])
    if not isinstance(value, list):
        _Entry(source, "").fail(kind, f"must be a list, not {_type_name(value)}")
    result = []
    for index, raw in enumerate(value):
        entry = _Entry(source, _label(kind, index, raw, name_key))
        result.append((parse(entry, raw), entry.entry))
    return result


def _check_unique(source: str, kind: str, keys: list[tuple[str, str]], key_field: str) -> None:
    first: dict[str, str] = {}
    for key, entry in keys:
        if key in first:
            _Entry(source, entry).fail(key_field, f"{key} is already defined by {kind} entry {first[key]}")
        first[key] = entry


def _check_addresses(source: str, instances: list[tuple[Instance, str]]) -> None:
    # Two instances with one IP on one network make every request from that IP
    # ambiguous; the same MAC twice on a network breaks ARP. Refuse both here.
    ips: dict[tuple[str, IPAddress], tuple[str, str]] = {}
    macs: dict[tuple[str, str], tuple[str, str]] = {}
    for instance, entry in instances:
        where = _Entry(source, entry)
        for p_index, port in enumerate(instance.ports):
            owner = macs.setdefault((port.network_id, port.mac), (instance.uuid, entry))
            if owner[0] != instance.uuid:
                where.fail(f"ports[{p_index}].mac", f"{port.mac} on {port.network_id} is also used by {owner[1]}")
            for i_index, ip in enumerate(port.ips):
                owner = ips.setdefault((port.network_id, ip), (instance.uuid, entry))
                if owner[0] != instance.uuid:
                    where.fail(
                        f"ports[{p_index}].ips[{i_index}]", f"{ip} on {port.network_id} is also used by {owner[1]}"
                    )


def _parse_network(entry: _Entry, raw: Any) -> Network:
    m = entry.mapping(raw, "", _NETWORK, required=("id",))
    network_id = entry.ident("network", m["id"], "id")
    subnets = tuple(_parse_subnet(entry, item, where) for where, item in entry.items(m, "subnets", ""))
    mtu = entry.integer(m, "mtu", "", 1500)
    with entry.at("mtu"):
        Network(id=network_id, mtu=mtu)
    with entry.at(""):
        return Network(
            id=network_id,
            project_id=entry.string(m, "project_id", ""),
            name=entry.string(m, "name", ""),
            mtu=mtu,
            subnets=subnets,
        )


def _parse_subnet(entry: _Entry, raw: Any, path: str) -> Subnet:
    m = entry.mapping(raw, path, _SUBNET, required=("cidr",))
    cidr_path = _join(path, "cidr")
    if not isinstance(m["cidr"], str):
        entry.fail(cidr_path, f"must be a string, not {_type_name(m['cidr'])}")
    with entry.at(cidr_path):
        cidr = parse_network(m["cidr"])
    gateway = entry.ip(m["gateway"], _join(path, "gateway")) if "gateway" in m else None
    dns = tuple(entry.ip(item, where) for where, item in entry.items(m, "dns", path))
    routes = []
    for where, item in entry.items(m, "host_routes", path):
        r = entry.mapping(item, where, _HOST_ROUTE, required=_HOST_ROUTE)
        dest_path = _join(where, "destination")
        if not isinstance(r["destination"], str):
            entry.fail(dest_path, f"must be a string, not {_type_name(r['destination'])}")
        with entry.at(dest_path):
            destination = parse_network(r["destination"])
        nexthop = entry.ip(r["nexthop"], _join(where, "nexthop"))
        with entry.at(where):
            routes.append(HostRoute(destination, nexthop))
    ipv6_mode = m.get("ipv6_mode")
    if ipv6_mode is not None and ipv6_mode not in _IPV6_MODES:
        entry.fail(_join(path, "ipv6_mode"), f"must be one of {', '.join(_IPV6_MODES)}, not {ipv6_mode!r}")
    with entry.at(path):
        return Subnet(
            cidr=cidr,
            gateway=gateway,
            dhcp=entry.boolean(m, "dhcp", path, True),
            dns=dns,
            host_routes=tuple(routes),
            ipv6_mode=cast(Ipv6Mode | None, ipv6_mode),
        )


def _parse_router(entry: _Entry, raw: Any) -> Router:
    m = entry.mapping(raw, "", _ROUTER, required=("id",))
    router_id = entry.ident("router", m["id"], "id")
    network_ids = tuple(entry.ident("network", item, where) for where, item in entry.items(m, "networks", ""))
    seen: dict[str, int] = {}
    for index, net in enumerate(network_ids):
        if net in seen:
            entry.fail(f"networks[{index}]", f"{net} is listed twice (also networks[{seen[net]}])")
        seen[net] = index
    with entry.at(""):
        return Router(id=router_id, network_ids=network_ids, project_id=entry.string(m, "project_id", ""))


def _parse_instance(entry: _Entry, raw: Any) -> Instance:
    m = entry.mapping(raw, "", _INSTANCE, required=("uuid", "name"))
    raw_uuid = entry.string(m, "uuid", "")
    try:
        instance_uuid = str(uuidlib.UUID(raw_uuid))
    except ValueError:
        entry.fail("uuid", f"{raw_uuid!r} is not a UUID")
    name = entry.string(m, "name", "")
    if not name:
        entry.fail("name", "must not be empty")
    hostname = entry.string(m, "hostname", "")
    with entry.at("hostname"):
        Instance(uuid=instance_uuid, name=name, hostname=hostname)
    launch_index = entry.integer(m, "launch_index", "", 0)
    if launch_index < 0:
        entry.fail("launch_index", "must be >= 0")
    options = None
    if "metadata_options" in m:
        o = entry.mapping(m["metadata_options"], "metadata_options", _METADATA_OPTIONS)
        defaults = MetadataOptions()
        with entry.at("metadata_options"):
            options = MetadataOptions(
                http_tokens=cast(Any, entry.string(o, "http_tokens", "metadata_options", defaults.http_tokens)),
                http_endpoint=cast(Any, entry.string(o, "http_endpoint", "metadata_options", defaults.http_endpoint)),
                http_put_response_hop_limit=entry.integer(
                    o, "http_put_response_hop_limit", "metadata_options", defaults.http_put_response_hop_limit
                ),
                instance_metadata_tags=cast(
                    Any,
                    entry.string(o, "instance_metadata_tags", "metadata_options", defaults.instance_metadata_tags),
                ),
            )
    with entry.at(""):
        return Instance(
            uuid=instance_uuid,
            name=name,
            hostname=hostname,
            project_id=entry.string(m, "project_id", ""),
            availability_zone=entry.string(m, "availability_zone", "", "nova"),
            region=entry.string(m, "region", "", "RegionOne"),
            instance_type=entry.string(m, "instance_type", "", "m1.small"),
            image_id=entry.string(m, "image_id", ""),
            launch_index=launch_index,
            created_at=_parse_created_at(entry, m),
            metadata=entry.string_map(m, "metadata", ""),
            keys=_parse_keys(entry, m),
            user_data=_parse_user_data(entry, m),
            vendor_data=_parse_vendor_data(entry, m),
            tags=entry.string_map(m, "tags", ""),
            security_groups=entry.strings(m, "security_groups", ""),
            ports=_parse_ports(entry, m),
            metadata_options=options,
            architecture=entry.string(m, "architecture", "", "x86_64"),
        )


def _parse_created_at(entry: _Entry, m: Mapping[str, Any]) -> datetime:
    value = m.get("created_at")
    if value is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    # YAML turns unquoted timestamps into datetime or date; JSON leaves strings.
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            entry.fail("created_at", f"{value!r} is not an ISO 8601 timestamp")
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    entry.fail("created_at", f"must be an ISO 8601 timestamp, not {_type_name(value)}")


def _parse_keys(entry: _Entry, m: Mapping[str, Any]) -> tuple[SSHKey, ...]:
    keys: list[SSHKey] = []
    names: dict[str, str] = {}
    for where, item in entry.items(m, "keys", ""):
        k = entry.mapping(item, where, _KEY, required=("name", "data"))
        key_type = entry.string(k, "type", where, "ssh")
        if key_type not in _KEY_TYPES:
            entry.fail(_join(where, "type"), f"must be one of {', '.join(_KEY_TYPES)}, not {key_type!r}")
        name = entry.string(k, "name", where)
        if name in names:
            entry.fail(_join(where, "name"), f"key name {name!r} is also used by {names[name]}")
        names[name] = where
        with entry.at(where):
            keys.append(SSHKey(name=name, data=entry.string(k, "data", where), type=cast(KeyType, key_type)))
    return tuple(keys)


def _parse_user_data(entry: _Entry, m: Mapping[str, Any]) -> bytes | None:
    if "user_data" in m and "user_data_b64" in m:
        entry.fail("user_data_b64", "give user_data or user_data_b64, not both")
    if "user_data" in m:
        path = "user_data"
        text = m["user_data"]
        if not isinstance(text, str):
            entry.fail(path, f"must be a string (a YAML '|' block keeps it verbatim), not {_type_name(text)}")
        data = text.encode("utf-8")
    elif "user_data_b64" in m:
        path = "user_data_b64"
        encoded = m["user_data_b64"]
        if not isinstance(encoded, str):
            entry.fail(path, f"must be a base64 string, not {_type_name(encoded)}")
        try:
            data = base64.b64decode("".join(encoded.split()), validate=True)
        except binascii.Error as exc:
            entry.fail(path, f"is not valid base64: {exc}")
    else:
        return None
    if len(data) > MAX_USER_DATA:
        entry.fail(
            path,
            f"is {len(data)} bytes; Nova's limit is {MAX_USER_DATA_B64} bytes base64-encoded ({MAX_USER_DATA} raw)",
        )
    return data


def _parse_vendor_data(entry: _Entry, m: Mapping[str, Any]) -> dict[str, Any] | None:
    if "vendor_data" not in m:
        return None
    value = m["vendor_data"]
    if not isinstance(value, dict):
        entry.fail("vendor_data", f"must be a mapping (vendor_data.json is a JSON object), not {_type_name(value)}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        entry.fail("vendor_data", f"must hold only JSON values (quote dates in YAML): {exc}")
    return value


def _parse_ports(entry: _Entry, m: Mapping[str, Any]) -> tuple[Port, ...]:
    ports: list[Port] = []
    macs: dict[str, str] = {}
    for where, item in entry.items(m, "ports", ""):
        p = entry.mapping(item, where, _PORT, required=("network", "mac", "ips"))
        network_id = entry.ident("network", p["network"], _join(where, "network"))
        mac_path = _join(where, "mac")
        if not isinstance(p["mac"], str):
            # YAML 1.1 reads an unquoted all-digit MAC such as 12:34:56:10:20:30 as
            # a base-60 integer.
            entry.fail(mac_path, f"must be a string, not {_type_name(p['mac'])} (quote MAC addresses in YAML)")
        with entry.at(mac_path):
            mac = normalize_mac(p["mac"])
        if mac in macs:
            entry.fail(mac_path, f"{mac} is also used by {macs[mac]}")
        macs[mac] = where
        ips = tuple(entry.ip(ip, ip_where) for ip_where, ip in entry.items(p, "ips", where))
        if not ips:
            entry.fail(_join(where, "ips"), "must list at least one IP address")
        port_id = entry.ident("port", p["id"], _join(where, "id")) if "id" in p else ""
        device_number = entry.integer(p, "device_number", where, 0)
        if device_number < 0:
            entry.fail(_join(where, "device_number"), "must be >= 0")
        with entry.at(where):
            ports.append(Port(network_id, mac, ips, id=port_id, device_number=device_number))
    return tuple(ports)


# -- applying -------------------------------------------------------------------------------


def apply_inventory(registry: Registry, inventory: Inventory) -> ImportReport:
    """Write ``inventory`` into ``registry``: networks, then routers, then instances.

    Idempotent: objects are matched by id (uuid for instances) and written only when
    they differ, so an unchanged object does not bump the registry revision. Every
    reference is checked before the first write: a port or router naming a network
    that is neither in the inventory nor in the registry, a port IP outside its
    network's subnets, or an IP another registered instance already owns on that
    network raise InventoryError and nothing is written. Objects in the registry but
    not in the inventory are left alone.
    """
    networks = {n.id: n for n in registry.list_networks()}
    routers = {r.id: r for r in registry.list_routers()}
    if len(inventory.instances) > _BULK_INSTANCES:
        # One list beats a get and a resolve per instance once the file is large.
        everything = registry.list_instances()
        instances = {i.uuid: i for i in everything}
        owners: dict[tuple[str, IPAddress], list[tuple[str, str]]] = {}
        for known in everything:
            for port in known.ports:
                for ip in port.ips:
                    owners.setdefault((port.network_id, ip), []).append((known.uuid, known.name))

        def owner_of(network_id: str, ip: IPAddress) -> list[tuple[str, str]]:
            return owners.get((network_id, ip), [])

    else:
        instances = {}
        for wanted in inventory.instances:
            with suppress(NotFound):
                instances[wanted.uuid] = registry.get_instance(wanted.uuid)

        def owner_of(network_id: str, ip: IPAddress) -> list[tuple[str, str]]:
            try:
                found = registry.resolve(Caller(ip, network_id=network_id))
            except NotFound:
                return []
            except AmbiguousCaller as exc:
                return [(uuid, "") for uuid in exc.uuids]
            return [(found.uuid, found.name)]

    _check_references(inventory, {**networks, **{n.id: n for n in inventory.networks}}, owner_of)
    return ImportReport(
        networks=_apply_kind(inventory.networks, lambda n: n.id, networks, registry.put_network),
        routers=_apply_kind(inventory.routers, lambda r: r.id, routers, registry.put_router),
        instances=_apply_kind(inventory.instances, lambda i: i.uuid, instances, registry.put_instance),
        revision=registry.revision(),
    )


# Above this many instances, apply_inventory lists the registry once.
_BULK_INSTANCES = 20


def _apply_kind(
    objects: Sequence[T],
    key: Callable[[T], str],
    current: Mapping[str, T],
    put: Callable[[T], None],
) -> KindCounts:
    created = updated = unchanged = 0
    for obj in objects:
        before = current.get(key(obj))
        if before is None:
            created += 1
        elif before == obj:
            unchanged += 1
            continue
        else:
            updated += 1
        put(obj)
    return KindCounts(created=created, updated=updated, unchanged=unchanged)


def _label_of(kind: str, index: int, name: str) -> str:
    return f"{kind}[{index}] ({name})"


def _check_references(
    inventory: Inventory,
    networks: Mapping[str, Network],
    owner_of: Callable[[str, IPAddress], list[tuple[str, str]]],
) -> None:
    source = inventory.source
    for index, router in enumerate(inventory.routers):
        for n_index, net in enumerate(router.network_ids):
            if net not in networks:
                _Entry(source, _label_of("routers", index, router.id)).fail(
                    f"networks[{n_index}]", f"unknown network {net!r}: define it under networks"
                )
    uuids = {i.uuid for i in inventory.instances}
    for index, instance in enumerate(inventory.instances):
        entry = _Entry(source, _label_of("instances", index, instance.name))
        for p_index, port in enumerate(instance.ports):
            network = networks.get(port.network_id)
            if network is None:
                entry.fail(
                    f"ports[{p_index}].network",
                    f"unknown network {port.network_id!r}: define it under networks",
                )
            for i_index, ip in enumerate(port.ips):
                where = f"ports[{p_index}].ips[{i_index}]"
                if network.subnets and network.subnet_for(ip) is None:
                    cidrs = ", ".join(str(s.cidr) for s in network.subnets)
                    entry.fail(where, f"{ip} is in no subnet of network {network.id} ({cidrs})")
                # An owner that is itself in the inventory is being rewritten anyway.
                others = [
                    f"{uuid} ({name})" if name else uuid
                    for uuid, name in owner_of(port.network_id, ip)
                    if uuid not in uuids
                ]
                if others:
                    entry.fail(
                        where,
                        f"{ip} on {port.network_id} already belongs to instance {', '.join(others)}",
                    )


def instance_to_dict(instance: Instance) -> dict[str, Any]:
    """An instance in inventory form (what ``import`` accepts), for ``instance show``."""
    out: dict[str, Any] = {
        "uuid": instance.uuid,
        "name": instance.name,
        "hostname": instance.hostname,
        "project_id": instance.project_id,
        "availability_zone": instance.availability_zone,
        "region": instance.region,
        "instance_type": instance.instance_type,
        "image_id": instance.image_id,
        "launch_index": instance.launch_index,
        "created_at": instance.created_at.isoformat(),
        "metadata": dict(instance.metadata),
        "keys": [{"name": k.name, "type": k.type, "data": k.data} for k in instance.keys],
        "tags": dict(instance.tags),
        "security_groups": list(instance.security_groups),
        "ports": [
            {
                "network": p.network_id,
                "mac": p.mac,
                "ips": [str(ip) for ip in p.ips],
                "device_number": p.device_number,
            }
            for p in instance.ports
        ],
    }
    if instance.user_data is not None:
        try:
            out["user_data"] = instance.user_data.decode("utf-8")
        except UnicodeDecodeError:
            out["user_data_b64"] = base64.b64encode(instance.user_data).decode()
    if instance.vendor_data is not None:
        out["vendor_data"] = dict(instance.vendor_data)
    if instance.metadata_options is not None:
        opts = instance.metadata_options
        out["metadata_options"] = {
            "http_tokens": opts.http_tokens,
            "http_endpoint": opts.http_endpoint,
            "http_put_response_hop_limit": opts.http_put_response_hop_limit,
            "instance_metadata_tags": opts.instance_metadata_tags,
        }
    return out


def network_to_dict(network: Network) -> dict[str, Any]:
    """A network in inventory form."""
    return {
        "id": network.id,
        "project_id": network.project_id,
        "name": network.name,
        "mtu": network.mtu,
        "subnets": [
            {
                "cidr": str(s.cidr),
                **({"gateway": str(s.gateway)} if s.gateway is not None else {}),
                "dhcp": s.dhcp,
                "dns": [str(d) for d in s.dns],
                "host_routes": [{"destination": str(r.destination), "nexthop": str(r.nexthop)} for r in s.host_routes],
                **({"ipv6_mode": s.ipv6_mode} if s.ipv6_mode else {}),
            }
            for s in network.subnets
        ],
    }


def router_to_dict(router: Router) -> dict[str, Any]:
    """A router in inventory form."""
    return {"id": router.id, "project_id": router.project_id, "networks": list(router.network_ids)}
