"""The inventory format as data: every kind of entry and every field it holds.

A :class:`Kind` (network, subnet, host route, router, instance, port, key, metadata
options) is a model class and a table of :class:`Field` rows: the document key, the
model attribute it fills, the :class:`Codec` that parses and dumps its value, and
whether it is required. Parsing (:mod:`.parse`), dumping and export (:mod:`.dump`),
and through them the admin API's bodies, walk these tables and nothing else, so a
new field is one row here plus its model attribute (and its SQL column where the
registry stores it).

Defaults are the model's: an absent field is left to the dataclass default, and a
dump writes every field that holds a value, so a dump parses back to equal objects.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, date, datetime
from typing import Any, Final, Generic, NoReturn, Protocol, TypeVar, cast, get_args

from meta169.errors import InventoryError, ValidationError
from meta169.model import (
    DEFAULT_SOURCE,
    MAX_USER_DATA,
    MAX_USER_DATA_B64,
    HostRoute,
    HttpTokens,
    Instance,
    Ipv6Mode,
    KeyType,
    MetadataOptions,
    Network,
    Port,
    Router,
    SSHKey,
    Subnet,
    Toggle,
    check_id,
    check_source,
    normalize_mac,
    parse_ip,
    parse_network,
)

M = TypeVar("M")


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


# What a codec's dump returns for "leave this key out" (an optional value that is unset).
OMIT: Final = _Omit()


def type_name(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


@dataclass(frozen=True, slots=True)
class Where:
    """A place in a document: the file, the entry (``instances[0] (web-1)``), the field."""

    source: str
    entry: str = ""
    field: str = ""

    def __truediv__(self, key: str | int) -> Where:
        if isinstance(key, int):
            return Where(self.source, self.entry, f"{self.field}[{key}]")
        return Where(self.source, self.entry, f"{self.field}.{key}" if self.field else key)

    def fail(self, message: str) -> NoReturn:
        raise InventoryError(message, source=self.source, entry=self.entry, field=self.field)

    @contextmanager
    def checking(self) -> Iterator[None]:
        """A model's ValidationError raised inside is reported here."""
        try:
            yield
        except InventoryError:
            raise
        except ValidationError as exc:
            self.fail(str(exc))


class Codec(Protocol):
    """How one value is read from a document and written back."""

    @property
    def noun(self) -> str:
        """What the value is, for messages: "IP address"."""

    def parse(self, value: object, where: Where) -> Any:
        """The model value for ``value`` (never None); InventoryError at ``where`` if invalid."""

    def dump(self, value: Any) -> object:
        """The document value (JSON types only), or OMIT."""


def check_mapping(value: object, known: tuple[str, ...], where: Where) -> dict[Any, Any]:
    """``value`` as a mapping whose keys are all ``known``; an unknown key names the closest."""
    if not isinstance(value, dict):
        where.fail(f"must be a mapping, not {type_name(value)}")
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
            (where / str(key)).fail(f"unknown field{hint}")
    return value


# -- scalar codecs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scalar:
    """A codec made of two functions; ``noun`` names what a document holds there."""

    noun: str
    parse_fn: Callable[[object, Where], Any]
    dump_fn: Callable[[Any], object] = str

    def parse(self, value: object, where: Where) -> Any:
        return self.parse_fn(value, where)

    def dump(self, value: Any) -> object:
        return self.dump_fn(value)


def _text(value: object, where: Where) -> str:
    if not isinstance(value, str):
        where.fail(f"must be a string, not {type_name(value)} (quote it in YAML)")
    _check_storable(value, where)
    return value


def _check_storable(value: str, where: Where) -> None:
    # PostgreSQL text cannot hold NUL, and no database takes a lone surrogate (JSON's
    # "\ud800" decodes to one): refuse here rather than half-way through an import.
    if "\x00" in value:
        where.fail("must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where.fail("is not valid Unicode (it holds a lone surrogate)")


def _nonempty_text(value: object, where: Where) -> str:
    text = _text(value, where)
    if not text:
        where.fail("must not be empty")
    return text


def _integer(value: object, where: Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        where.fail(f"must be an integer, not {type_name(value)}")
    return value


# The registry keeps counts in SQL INTEGER columns: 32 bits in PostgreSQL.
MAX_COUNT = 2**31 - 1


def _count(value: object, where: Where) -> int:
    number = _integer(value, where)
    if number < 0:
        where.fail("must be >= 0")
    if number > MAX_COUNT:
        where.fail(f"must be at most {MAX_COUNT}")
    return number


def _boolean(value: object, where: Where) -> bool:
    if not isinstance(value, bool):
        where.fail(f"must be true or false, not {type_name(value)}")
    return value


def _ip(value: object, where: Where) -> object:
    if not isinstance(value, str):
        where.fail(f"must be an IP address string, not {type_name(value)}")
    with where.checking():
        return parse_ip(value)


def _cidr(value: object, where: Where) -> object:
    if not isinstance(value, str):
        where.fail(f"must be a string, not {type_name(value)}")
    with where.checking():
        return parse_network(value)


def _mac(value: object, where: Where) -> str:
    if not isinstance(value, str):
        # YAML 1.1 reads an unquoted all-digit MAC such as 12:34:56:10:20:30 as a
        # base-60 integer.
        where.fail(f"must be a string, not {type_name(value)} (quote MAC addresses in YAML)")
    with where.checking():
        return normalize_mac(value)


def _uuid(value: object, where: Where) -> str:
    text = _text(value, where)
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        where.fail(f"{text!r} is not a UUID")


def _timestamp(value: object, where: Where) -> datetime:
    # YAML turns unquoted timestamps into datetime or date; JSON leaves strings.
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            where.fail(f"{value!r} is not an ISO 8601 timestamp")
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    where.fail(f"must be an ISO 8601 timestamp, not {type_name(value)}")


def _string_map(value: object, where: Where) -> dict[str, str]:
    if not isinstance(value, dict):
        where.fail(f"must be a mapping, not {type_name(value)}")
    for k, v in value.items():
        if not isinstance(k, str):
            where.fail(f"key {k!r} must be a string (quote it in YAML)")
        _check_storable(k, where)
        _text(v, where / k)
    return dict(value)


def _json_object(value: object, where: Where) -> dict[str, Any]:
    if not isinstance(value, dict):
        where.fail(f"must be a mapping (vendor_data.json is a JSON object), not {type_name(value)}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        where.fail(f"must hold only JSON values (quote dates in YAML): {exc}")
    return value


def _check_size(data: bytes, where: Where) -> bytes:
    if len(data) > MAX_USER_DATA:
        where.fail(
            f"is {len(data)} bytes; Nova's limit is {MAX_USER_DATA_B64} bytes base64-encoded ({MAX_USER_DATA} raw)"
        )
    return data


def _user_data_text(value: object, where: Where) -> bytes:
    if not isinstance(value, str):
        where.fail(f"must be a string (a YAML '|' block keeps it verbatim), not {type_name(value)}")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        where.fail("is not valid Unicode (it holds a lone surrogate)")
    return _check_size(data, where)


def _user_data_b64(value: object, where: Where) -> bytes:
    if not isinstance(value, str):
        where.fail(f"must be a base64 string, not {type_name(value)}")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        where.fail(f"is not valid base64: {exc}")
    return _check_size(data, where)


def _as_text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# User data is written as text when it is UTF-8 (cloud-config, scripts), else base64.
def _dump_user_data_text(data: bytes | None) -> object:
    text = _as_text(data)
    return OMIT if text is None else text


def _dump_user_data_b64(data: bytes | None) -> object:
    if data is None or _as_text(data) is not None:
        return OMIT
    return base64.b64encode(data).decode("ascii")


def _same(value: Any) -> object:
    return value


def _source(value: object, where: Where) -> str:
    text = _text(value, where)
    with where.checking():
        return check_source(text)


TEXT = Scalar("string", _text, _same)
NAME = Scalar("non-empty string", _nonempty_text, _same)
INTEGER = Scalar("integer", _integer, _same)
COUNT = Scalar("integer >= 0", _count, _same)
BOOLEAN = Scalar("true or false", _boolean, _same)
IP = Scalar("IP address", _ip)
CIDR = Scalar("network in CIDR form", _cidr)
MAC = Scalar("MAC address", _mac)
UUID = Scalar("UUID", _uuid)
TIMESTAMP = Scalar("ISO 8601 timestamp", _timestamp, lambda t: t.isoformat())
STRING_MAP = Scalar("mapping of strings", _string_map, dict)
JSON_OBJECT = Scalar("JSON object", _json_object, dict)
USER_DATA_TEXT = Scalar("string", _user_data_text, _dump_user_data_text)
USER_DATA_B64 = Scalar("base64 string", _user_data_b64, _dump_user_data_b64)
# Who owns the entry in the registry (inventory, admin, file:/PATH, libvirt:URI,
# openstack:CLOUD). The default, inventory, is left out of a dump: it parses back the same.
SOURCE = Scalar("source", _source, lambda value: OMIT if value == DEFAULT_SOURCE else value)


@dataclass(frozen=True, slots=True)
class Ident:
    """An id of ``kind`` (network, router, port): 1-128 chars of [A-Za-z0-9_.:-]."""

    kind: str

    @property
    def noun(self) -> str:
        return f"{self.kind} id"

    def parse(self, value: object, where: Where) -> str:
        if not isinstance(value, str):
            where.fail(f"must be a string, not {type_name(value)} (quote it in YAML)")
        with where.checking():
            return check_id(self.kind, value)

    def dump(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a model Literal's values."""

    choices: tuple[str, ...]
    noun: str = "choice"

    def parse(self, value: object, where: Where) -> str:
        text = _text(value, where)
        if text not in self.choices:
            where.fail(f"must be one of {', '.join(self.choices)}, not {text!r}")
        return text

    def dump(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Nullable:
    """A value the model may leave as None; None is left out of a dump."""

    codec: Codec

    @property
    def noun(self) -> str:
        return self.codec.noun

    def parse(self, value: object, where: Where) -> Any:
        return self.codec.parse(value, where)

    def dump(self, value: Any) -> object:
        return OMIT if value is None else self.codec.dump(value)


@dataclass(frozen=True, slots=True)
class ListOf:
    """A list, model side a tuple.

    ``unique`` refuses an item listed twice; ``unique_by`` names a field of the entries
    that no two may share (``ports`` by ``mac``).
    """

    item: Codec
    nonempty: bool = False
    unique: bool = False
    unique_by: str = ""

    def __post_init__(self) -> None:
        if self.unique_by and not (isinstance(self.item, Kind) and self.unique_by in self.item.keys):
            raise ValueError(f"unique_by={self.unique_by!r} names no field of {self.item.noun}")

    @property
    def noun(self) -> str:
        return f"list of {self.item.noun}"

    def parse(self, value: object, where: Where) -> tuple[Any, ...]:
        if not isinstance(value, list):
            where.fail(f"must be a list, not {type_name(value)}")
        if self.nonempty and not value:
            where.fail(f"must list at least one {self.item.noun}")
        items = tuple(self.item.parse(raw, where / i) for i, raw in enumerate(value))
        if self.unique:
            first: dict[object, int] = {}
            for index, item in enumerate(items):
                seen = first.setdefault(item, index)
                if seen != index:
                    (where / index).fail(f"{item} is listed twice (also {(where / seen).field})")
        if self.unique_by:
            attr = cast(Kind[Any], self.item).lookup(self.unique_by).attr
            owners: dict[object, int] = {}
            for index, item in enumerate(items):
                key = getattr(item, attr)
                seen = owners.setdefault(key, index)
                if seen != index:
                    (where / index / self.unique_by).fail(f"{key} is also used by {(where / seen).field}")
        return items

    def dump(self, value: tuple[Any, ...]) -> object:
        return [self.item.dump(item) for item in value]


# -- kinds ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a kind's mapping.

    ``attr`` is the model attribute it fills (the key when empty); two fields may fill
    one attribute (``user_data``, ``user_data_b64``), and a document gives at most one
    of them. A ``located`` field is checked by the model with only the kind's required
    fields beside it, so an error the model finds in it names this field.
    """

    key: str
    codec: Codec
    attr: str = ""
    required: bool = False
    located: bool = False

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.key)


@dataclass(frozen=True, slots=True)
class Kind(Generic[M]):
    """A mapping in the document that becomes one model object (itself a codec)."""

    name: str
    model: Callable[..., M]
    fields: tuple[Field, ...]
    # The field whose value names an entry in error messages: "instances[0] (web-1)".
    label: str = ""
    # The field that identifies an entry: unique in a document, matched on import.
    ident: str = ""
    _by_key: Mapping[str, Field] = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key = {f.key: f for f in self.fields}
        if len(by_key) != len(self.fields):
            raise ValueError(f"{self.name}: duplicate field keys")
        object.__setattr__(self, "_by_key", by_key)

    @property
    def noun(self) -> str:
        return self.name

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._by_key)

    def lookup(self, key: str) -> Field:
        return self._by_key[key]

    def identify(self, value: M) -> str:
        """The value of the ``ident`` field of a model object."""
        ident: str = getattr(value, self.lookup(self.ident).attr)
        return ident

    def parse(self, value: object, where: Where) -> M:
        mapping = check_mapping(value, self.keys, where)
        for f in self.fields:
            if f.required and mapping.get(f.key) is None:
                (where / f.key).fail("is required")
        values: dict[str, Any] = {}
        given: dict[str, str] = {}
        for f in self.fields:
            raw = mapping.get(f.key)
            if raw is None:  # `key: null` is the same as leaving the key out
                continue
            here = where / f.key
            if f.attr in given:
                here.fail(f"give {given[f.attr]} or {f.key}, not both")
            given[f.attr] = f.key
            values[f.attr] = f.codec.parse(raw, here)
        identity = {f.attr: values[f.attr] for f in self.fields if f.required}
        for f in self.fields:
            if f.located and f.attr in values:
                with (where / f.key).checking():
                    self.model(**identity, **{f.attr: values[f.attr]})
        with where.checking():
            return self.model(**values)

    def dump(self, value: M) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in self.fields:
            dumped = f.codec.dump(getattr(value, f.attr))
            if dumped is not OMIT:
                out[f.key] = dumped
        return out


# -- the tables -------------------------------------------------------------------------------

HOST_ROUTE: Kind[HostRoute] = Kind(
    "host route",
    HostRoute,
    (
        Field("destination", CIDR, required=True),
        Field("nexthop", IP, required=True),
    ),
)

SUBNET: Kind[Subnet] = Kind(
    "subnet",
    Subnet,
    (
        Field("cidr", CIDR, required=True),
        Field("gateway", Nullable(IP)),
        Field("dhcp", BOOLEAN),
        Field("dns", ListOf(IP)),
        Field("host_routes", ListOf(HOST_ROUTE)),
        Field("ipv6_mode", Nullable(Choice(get_args(Ipv6Mode)))),
    ),
)

NETWORK: Kind[Network] = Kind(
    "network",
    Network,
    (
        Field("id", Ident("network"), required=True),
        Field("project_id", TEXT),
        Field("name", TEXT),
        Field("mtu", INTEGER, located=True),
        Field("subnets", ListOf(SUBNET)),
        Field("source", SOURCE),
    ),
    label="id",
    ident="id",
)

ROUTER: Kind[Router] = Kind(
    "router",
    Router,
    (
        Field("id", Ident("router"), required=True),
        Field("project_id", TEXT),
        Field("networks", ListOf(Ident("network"), unique=True), attr="network_ids"),
        Field("source", SOURCE),
    ),
    label="id",
    ident="id",
)

KEY: Kind[SSHKey] = Kind(
    "key",
    SSHKey,
    (
        Field("name", TEXT, required=True),
        Field("type", Choice(get_args(KeyType))),
        Field("data", TEXT, required=True),
    ),
)

PORT: Kind[Port] = Kind(
    "port",
    Port,
    (
        Field("network", Ident("network"), attr="network_id", required=True),
        Field("mac", MAC, required=True),
        Field("ips", ListOf(IP, nonempty=True), required=True),
        # Without one the model derives an id from the MAC; a dump writes it out.
        Field("id", Ident("port")),
        Field("device_number", COUNT),
    ),
)

METADATA_OPTIONS: Kind[MetadataOptions] = Kind(
    "metadata options",
    MetadataOptions,
    (
        Field("http_tokens", Choice(get_args(HttpTokens))),
        Field("http_endpoint", Choice(get_args(Toggle))),
        Field("http_put_response_hop_limit", INTEGER, located=True),
        Field("instance_metadata_tags", Choice(get_args(Toggle))),
    ),
)

INSTANCE: Kind[Instance] = Kind(
    "instance",
    Instance,
    (
        Field("uuid", UUID, required=True),
        Field("name", NAME, required=True),
        # Without one the model derives it from the name, as Nova does.
        Field("hostname", TEXT, located=True),
        Field("project_id", TEXT),
        Field("availability_zone", TEXT),
        Field("region", TEXT),
        Field("instance_type", TEXT),
        Field("image_id", TEXT),
        Field("architecture", TEXT),
        Field("launch_index", COUNT),
        Field("created_at", TIMESTAMP),
        Field("metadata", STRING_MAP),
        Field("keys", ListOf(KEY, unique_by="name")),
        Field("user_data", USER_DATA_TEXT),
        Field("user_data_b64", USER_DATA_B64, attr="user_data"),
        Field("vendor_data", Nullable(JSON_OBJECT)),
        Field("tags", STRING_MAP),
        Field("security_groups", ListOf(TEXT)),
        Field("ports", ListOf(PORT, unique_by="mac")),
        Field("metadata_options", Nullable(METADATA_OPTIONS)),
        Field("source", SOURCE),
    ),
    label="name",
    ident="uuid",
)

# Every kind, for tests and documentation that enumerate the format.
KINDS: tuple[Kind[Any], ...] = (NETWORK, SUBNET, HOST_ROUTE, ROUTER, INSTANCE, PORT, KEY, METADATA_OPTIONS)


@dataclass(frozen=True, slots=True)
class Inventory:
    """A parsed inventory: model objects in file order, and where they came from."""

    source: str = "<inventory>"
    networks: tuple[Network, ...] = ()
    routers: tuple[Router, ...] = ()
    instances: tuple[Instance, ...] = ()


# The top level of a document: each key lists entries of one kind, in the order they
# are parsed and applied (networks before the routers and ports that refer to them).
ENTRIES: tuple[tuple[str, Kind[Any]], ...] = (("networks", NETWORK), ("routers", ROUTER), ("instances", INSTANCE))
