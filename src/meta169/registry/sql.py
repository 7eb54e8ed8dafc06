"""The registry on SQL: SQLite (default) and PostgreSQL, through SQLAlchemy Core.

Writes run in one transaction that first bumps the revision row, so writers are
serialized and every revision's change-log rows commit with it. Reads run in a
snapshot (SQLite's read transaction in WAL mode, PostgreSQL's REPEATABLE READ).
Driver and SQLAlchemy exceptions are translated to RegistryError here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, Row

from meta169.errors import (
    AmbiguousCaller,
    Conflict,
    NotFound,
    RegistryError,
    UnknownCaller,
    ValidationError,
)
from meta169.model import (
    Caller,
    HostRoute,
    Instance,
    IPAddress,
    Ipv6Mode,
    MetadataOptions,
    Network,
    Port,
    Router,
    SSHKey,
    Subnet,
    parse_ip,
    parse_network,
)
from meta169.registry import schema as t
from meta169.registry._common import (
    DEFAULT_CHANGE_LOG_SIZE,
    beyond_horizon,
    full_changes,
    stored_instance,
)
from meta169.registry.base import Changes
from meta169.registry.schema import Migration, migrate

# How long a SQLite writer waits for another process's write lock (`meta169 import`
# while `serve` runs) before giving up with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 10_000

_WRITE = "meta169_write"


def create_engine(url: str | sa.URL) -> Engine:
    """An engine set up for the registry: SQLite in WAL mode with foreign keys on."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    # pre_ping: a PostgreSQL restart must not turn the next request into an error.
    return sa.create_engine(parsed, pool_pre_ping=True)


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself: pysqlite's implicit
    # transactions cannot take the write lock up front (SQLAlchemy docs,
    # "Serializable isolation / Savepoints / Transactional DDL" for pysqlite).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL lets one process write while others read (sqlite.org/wal.html).
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the lock at BEGIN so the busy timeout applies; a deferred
    # transaction that later upgrades to a write can fail at once with SQLITE_BUSY.
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except sa.exc.IntegrityError as exc:
        # Only the driver's message: the statement and its parameters may hold user
        # data or passwords.
        raise Conflict(f"{action}: {exc.orig}") from exc
    except sa.exc.DBAPIError as exc:
        raise RegistryError(f"{action}: {exc.orig.__class__.__name__}: {exc.orig}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise RegistryError(f"{action}: {exc.__class__.__name__}: {exc}") from exc


class SqlRegistry:
    """A :class:`~meta169.registry.base.Registry` in a SQLite or PostgreSQL database.

    Build it with :meth:`open`, which migrates the schema; the constructor does no IO.
    """

    def __init__(self, engine: Engine, *, change_log_size: int = DEFAULT_CHANGE_LOG_SIZE) -> None:
        if change_log_size < 1:
            raise ValueError("change_log_size must be >= 1")
        self._engine = engine
        self._write_engine = engine.execution_options(**{_WRITE: True})
        if engine.dialect.name == "postgresql":
            # A snapshot for reads that span several statements; read-only
            # REPEATABLE READ transactions never fail with serialization errors.
            self._read_engine: Engine = engine.execution_options(isolation_level="REPEATABLE READ")
        else:
            self._read_engine = engine
        self._log_size = change_log_size

    @classmethod
    def open(
        cls,
        url: str | sa.URL,
        *,
        change_log_size: int = DEFAULT_CHANGE_LOG_SIZE,
        migrations: Sequence[Migration] | None = None,
    ) -> SqlRegistry:
        """Connect, apply pending migrations and return the registry.

        Raises SchemaError when the database was written by a newer meta169, and
        RegistryError when the database cannot be reached.
        """
        engine = create_engine(url)
        try:
            with (
                _translated(f"cannot open registry {_safe_url(engine.url)}"),
                engine.execution_options(**{_WRITE: True}).begin() as conn,
            ):
                migrate(conn, migrations)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, change_log_size=change_log_size)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def _reading(self, action: str) -> Iterator[Connection]:
        with _translated(action), self._read_engine.begin() as conn:
            yield conn

    @contextmanager
    def _writing(self, action: str) -> Iterator[tuple[Connection, int]]:
        with _translated(action), self._write_engine.begin() as conn:
            # First statement: in PostgreSQL the row lock serializes writers.
            conn.execute(
                t.registry_revision.update()
                .where(t.registry_revision.c.id == 1)
                .values(revision=t.registry_revision.c.revision + 1)
            )
            revision = _current_revision(conn)
            conn.execute(t.change_log.delete().where(t.change_log.c.revision <= revision - self._log_size))
            yield conn, revision

    # -- writes ---------------------------------------------------------------------

    def put_network(self, network: Network) -> None:
        with self._writing(f"cannot store network {network.id}") as (conn, revision):
            row = {
                "project_id": network.project_id,
                "name": network.name,
                "mtu": network.mtu,
                "source": network.source,
            }
            if _exists(conn, t.networks.c.id, network.id):
                conn.execute(t.networks.update().where(t.networks.c.id == network.id).values(**row))
                conn.execute(t.subnets.delete().where(t.subnets.c.network_id == network.id))
            else:
                conn.execute(t.networks.insert().values(id=network.id, **row))
            if network.subnets:
                conn.execute(
                    t.subnets.insert(),
                    [_subnet_row(network.id, seq, s) for seq, s in enumerate(network.subnets)],
                )
            _log(conn, revision, None)

    def put_router(self, router: Router) -> None:
        with self._writing(f"cannot store router {router.id}") as (conn, revision):
            _require_networks(conn, router.network_ids, f"router {router.id}")
            row = {"project_id": router.project_id, "source": router.source}
            if _exists(conn, t.routers.c.id, router.id):
                conn.execute(t.routers.update().where(t.routers.c.id == router.id).values(**row))
                conn.execute(t.router_networks.delete().where(t.router_networks.c.router_id == router.id))
            else:
                conn.execute(t.routers.insert().values(id=router.id, **row))
            if router.network_ids:
                conn.execute(
                    t.router_networks.insert(),
                    [
                        {"router_id": router.id, "network_id": net, "seq": seq}
                        for seq, net in enumerate(router.network_ids)
                    ],
                )
            _log(conn, revision, None)

    def put_instance(self, instance: Instance) -> None:
        instance = stored_instance(instance)
        row = _instance_row(instance)
        with self._writing(f"cannot store instance {instance.uuid}") as (conn, revision):
            _require_networks(conn, sorted({p.network_id for p in instance.ports}), f"instance {instance.uuid}")
            uuid = instance.uuid
            if _exists(conn, t.instances.c.uuid, uuid):
                old_ports = _load_ports(conn, [uuid]).get(uuid, ())
                # Update in place: a replace must keep the guest's password.
                conn.execute(t.instances.update().where(t.instances.c.uuid == uuid).values(**row))
                conn.execute(t.port_ips.delete().where(t.port_ips.c.instance_uuid == uuid))
                conn.execute(t.ports.delete().where(t.ports.c.instance_uuid == uuid))
            else:
                old_ports = ()
                conn.execute(t.instances.insert().values(uuid=uuid, **row))
            _insert_ports(conn, uuid, instance.ports)
            _log(conn, revision, uuid)
            if old_ports != instance.ports:
                _log(conn, revision, None)

    def delete_instance(self, uuid: str) -> None:
        with self._writing(f"cannot delete instance {uuid}") as (conn, revision):
            if not _exists(conn, t.instances.c.uuid, uuid):
                raise NotFound(f"no instance {uuid}")
            had_ports = _exists(conn, t.ports.c.instance_uuid, uuid)
            conn.execute(t.port_ips.delete().where(t.port_ips.c.instance_uuid == uuid))
            conn.execute(t.ports.delete().where(t.ports.c.instance_uuid == uuid))
            conn.execute(t.passwords.delete().where(t.passwords.c.instance_uuid == uuid))
            conn.execute(t.instances.delete().where(t.instances.c.uuid == uuid))
            _log(conn, revision, uuid)
            if had_ports:
                _log(conn, revision, None)

    def delete_network(self, network_id: str) -> None:
        with self._writing(f"cannot delete network {network_id}") as (conn, revision):
            if not _exists(conn, t.networks.c.id, network_id):
                raise NotFound(f"no network {network_id}")
            users = (
                conn.execute(
                    sa.select(t.ports.c.instance_uuid)
                    .where(t.ports.c.network_id == network_id)
                    .distinct()
                    .order_by(t.ports.c.instance_uuid)
                )
                .scalars()
                .all()
            )
            if users:
                raise Conflict(f"network {network_id} has ports of instances {', '.join(users)}")
            routers = (
                conn.execute(
                    sa.select(t.router_networks.c.router_id)
                    .where(t.router_networks.c.network_id == network_id)
                    .order_by(t.router_networks.c.router_id)
                )
                .scalars()
                .all()
            )
            if routers:
                raise Conflict(f"network {network_id} is attached to routers {', '.join(routers)}")
            conn.execute(t.subnets.delete().where(t.subnets.c.network_id == network_id))
            conn.execute(t.networks.delete().where(t.networks.c.id == network_id))
            _log(conn, revision, None)

    def delete_router(self, router_id: str) -> None:
        with self._writing(f"cannot delete router {router_id}") as (conn, revision):
            if not _exists(conn, t.routers.c.id, router_id):
                raise NotFound(f"no router {router_id}")
            conn.execute(t.router_networks.delete().where(t.router_networks.c.router_id == router_id))
            conn.execute(t.routers.delete().where(t.routers.c.id == router_id))
            _log(conn, revision, None)

    # -- reads ----------------------------------------------------------------------

    def get_instance(self, uuid: str) -> Instance:
        with self._reading(f"cannot read instance {uuid}") as conn:
            found = _load_instances(conn, [uuid])
        if not found:
            raise NotFound(f"no instance {uuid}")
        return found[0]

    def get_network(self, network_id: str) -> Network:
        with self._reading(f"cannot read network {network_id}") as conn:
            found = _load_networks(conn, network_id)
        if not found:
            raise NotFound(f"no network {network_id}")
        return found[0]

    def get_router(self, router_id: str) -> Router:
        with self._reading(f"cannot read router {router_id}") as conn:
            found = _load_routers(conn, router_id)
        if not found:
            raise NotFound(f"no router {router_id}")
        return found[0]

    def list_instances(self) -> Sequence[Instance]:
        with self._reading("cannot list instances") as conn:
            return _load_instances(conn, None)

    def list_networks(self) -> Sequence[Network]:
        with self._reading("cannot list networks") as conn:
            return _load_networks(conn, None)

    def list_routers(self) -> Sequence[Router]:
        with self._reading("cannot list routers") as conn:
            return _load_routers(conn, None)

    def resolve(self, caller: Caller) -> Instance:
        ip = str(caller.ip)
        query = sa.select(t.port_ips.c.instance_uuid).where(t.port_ips.c.ip == ip).distinct()
        if caller.network_id is not None:
            query = query.where(t.port_ips.c.network_id == caller.network_id)
        else:
            query = query.join(t.router_networks, t.router_networks.c.network_id == t.port_ips.c.network_id).where(
                t.router_networks.c.router_id == caller.router_id
            )
        with self._reading(f"cannot resolve {ip} on {caller.scope}") as conn:
            uuids = sorted(conn.execute(query).scalars())
            if len(uuids) == 1:
                return _load_instances(conn, uuids)[0]
        if not uuids:
            raise UnknownCaller(caller.scope, ip)
        raise AmbiguousCaller(caller.scope, ip, uuids)

    # -- passwords ------------------------------------------------------------------

    def get_password(self, uuid: str) -> str:
        with self._reading(f"cannot read password of {uuid}") as conn:
            if not _exists(conn, t.instances.c.uuid, uuid):
                raise NotFound(f"no instance {uuid}")
            password = conn.execute(
                sa.select(t.passwords.c.password).where(t.passwords.c.instance_uuid == uuid)
            ).scalar_one_or_none()
        return password or ""

    def set_password(self, uuid: str, password: str) -> None:
        with self._writing(f"cannot set password of {uuid}") as (conn, revision):
            if not _exists(conn, t.instances.c.uuid, uuid):
                raise NotFound(f"no instance {uuid}")
            current = conn.execute(
                sa.select(t.passwords.c.password).where(t.passwords.c.instance_uuid == uuid)
            ).scalar_one_or_none()
            if current:
                raise Conflict(f"instance {uuid} already has a password")
            if current is None:
                conn.execute(t.passwords.insert().values(instance_uuid=uuid, password=password))
            else:
                conn.execute(t.passwords.update().where(t.passwords.c.instance_uuid == uuid).values(password=password))
            _log(conn, revision, uuid)

    def clear_password(self, uuid: str) -> None:
        with self._writing(f"cannot clear password of {uuid}") as (conn, revision):
            if not _exists(conn, t.instances.c.uuid, uuid):
                raise NotFound(f"no instance {uuid}")
            conn.execute(t.passwords.delete().where(t.passwords.c.instance_uuid == uuid))
            _log(conn, revision, uuid)

    # -- change tracking ------------------------------------------------------------

    def revision(self) -> int:
        with self._reading("cannot read the registry revision") as conn:
            return _current_revision(conn)

    def changed_since(self, revision: int) -> Changes:
        with self._reading("cannot read the change log") as conn:
            current = _current_revision(conn)
            if beyond_horizon(revision, current, self._log_size):
                uuids = conn.execute(sa.select(t.instances.c.uuid)).scalars().all()
                logged = (
                    conn.execute(
                        sa.select(t.change_log.c.instance_uuid)
                        .where(t.change_log.c.instance_uuid.is_not(None))
                        .distinct()
                    )
                    .scalars()
                    .all()
                )
                return full_changes(current, [*uuids, *logged])
            # Bounded above too: a writer may commit between the two statements.
            rows = (
                conn.execute(
                    sa.select(t.change_log.c.instance_uuid)
                    .where(t.change_log.c.revision > revision, t.change_log.c.revision <= current)
                    .distinct()
                )
                .scalars()
                .all()
            )
        return Changes(
            revision=current,
            instances=frozenset(u for u in rows if u is not None),
            topology=any(u is None for u in rows),
        )


# -- helpers: plain functions of a connection ----------------------------------------


def _safe_url(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def _current_revision(conn: Connection) -> int:
    value = conn.execute(sa.select(t.registry_revision.c.revision).where(t.registry_revision.c.id == 1)).scalar_one()
    return int(value)


def _log(conn: Connection, revision: int, uuid: str | None) -> None:
    conn.execute(t.change_log.insert().values(revision=revision, instance_uuid=uuid))


def _exists(conn: Connection, column: sa.Column[Any], value: str) -> bool:
    return conn.execute(sa.select(column).where(column == value).limit(1)).first() is not None


def _require_networks(conn: Connection, network_ids: Iterable[str], who: str) -> None:
    wanted = list(network_ids)
    if not wanted:
        return
    present = set(conn.execute(sa.select(t.networks.c.id).where(t.networks.c.id.in_(wanted))).scalars())
    missing = [n for n in wanted if n not in present]
    if missing:
        raise Conflict(f"{who} refers to unknown network(s) {', '.join(missing)}")


def _subnet_row(network_id: str, seq: int, subnet: Subnet) -> dict[str, Any]:
    return {
        "network_id": network_id,
        "seq": seq,
        "cidr": str(subnet.cidr),
        "gateway": None if subnet.gateway is None else str(subnet.gateway),
        "dhcp": subnet.dhcp,
        "dns": json.dumps([str(ip) for ip in subnet.dns]),
        "host_routes": json.dumps(
            [{"destination": str(r.destination), "nexthop": str(r.nexthop)} for r in subnet.host_routes]
        ),
        "ipv6_mode": subnet.ipv6_mode,
    }


def _subnet_from(row: Row[Any]) -> Subnet:
    return Subnet(
        cidr=parse_network(row.cidr),
        gateway=None if row.gateway is None else parse_ip(row.gateway),
        dhcp=bool(row.dhcp),
        dns=tuple(parse_ip(ip) for ip in json.loads(row.dns)),
        host_routes=tuple(
            HostRoute(parse_network(r["destination"]), parse_ip(r["nexthop"])) for r in json.loads(row.host_routes)
        ),
        ipv6_mode=cast(Ipv6Mode | None, row.ipv6_mode),
    )


def _load_networks(conn: Connection, network_id: str | None) -> list[Network]:
    nq = sa.select(t.networks).order_by(t.networks.c.id)
    sq = sa.select(t.subnets).order_by(t.subnets.c.network_id, t.subnets.c.seq)
    if network_id is not None:
        nq = nq.where(t.networks.c.id == network_id)
        sq = sq.where(t.subnets.c.network_id == network_id)
    subnets: dict[str, list[Subnet]] = defaultdict(list)
    for row in conn.execute(sq):
        subnets[row.network_id].append(_subnet_from(row))
    return [
        Network(
            id=row.id,
            project_id=row.project_id,
            name=row.name,
            mtu=row.mtu,
            subnets=tuple(subnets.get(row.id, ())),
            source=row.source,
        )
        for row in conn.execute(nq)
    ]


def _load_routers(conn: Connection, router_id: str | None) -> list[Router]:
    rq = sa.select(t.routers).order_by(t.routers.c.id)
    lq = sa.select(t.router_networks).order_by(t.router_networks.c.router_id, t.router_networks.c.seq)
    if router_id is not None:
        rq = rq.where(t.routers.c.id == router_id)
        lq = lq.where(t.router_networks.c.router_id == router_id)
    links: dict[str, list[str]] = defaultdict(list)
    for row in conn.execute(lq):
        links[row.router_id].append(row.network_id)
    return [
        Router(id=row.id, network_ids=tuple(links.get(row.id, ())), project_id=row.project_id, source=row.source)
        for row in conn.execute(rq)
    ]


def _instance_row(instance: Instance) -> dict[str, Any]:
    options = instance.metadata_options
    return {
        "name": instance.name,
        "hostname": instance.hostname,
        "project_id": instance.project_id,
        "availability_zone": instance.availability_zone,
        "region": instance.region,
        "instance_type": instance.instance_type,
        "image_id": instance.image_id,
        "launch_index": instance.launch_index,
        "created_at": instance.created_at.isoformat(),
        "metadata_json": json.dumps(dict(instance.metadata)),
        "keys_json": json.dumps([{"name": k.name, "type": k.type, "data": k.data} for k in instance.keys]),
        "user_data": instance.user_data,
        "vendor_data_json": None if instance.vendor_data is None else json.dumps(instance.vendor_data),
        "tags_json": json.dumps(dict(instance.tags)),
        "security_groups_json": json.dumps(list(instance.security_groups)),
        "metadata_options_json": None
        if options is None
        else json.dumps(
            {
                "http_tokens": options.http_tokens,
                "http_endpoint": options.http_endpoint,
                "http_put_response_hop_limit": options.http_put_response_hop_limit,
                "instance_metadata_tags": options.instance_metadata_tags,
            }
        ),
        "architecture": instance.architecture,
        "source": instance.source,
    }


def _insert_ports(conn: Connection, uuid: str, ports: Sequence[Port]) -> None:
    if not ports:
        return
    conn.execute(
        t.ports.insert(),
        [
            {
                "instance_uuid": uuid,
                "seq": seq,
                "id": port.id,
                "network_id": port.network_id,
                "mac": port.mac,
                "device_number": port.device_number,
            }
            for seq, port in enumerate(ports)
        ],
    )
    conn.execute(
        t.port_ips.insert(),
        [
            {
                "instance_uuid": uuid,
                "port_seq": port_seq,
                "seq": seq,
                "network_id": port.network_id,
                "ip": str(ip),
            }
            for port_seq, port in enumerate(ports)
            for seq, ip in enumerate(port.ips)
        ],
    )


def _load_ports(conn: Connection, uuids: Sequence[str] | None) -> dict[str, tuple[Port, ...]]:
    # One query: every port has at least one IP (the model refuses a port without).
    p, i = t.ports.c, t.port_ips.c
    query = (
        sa.select(p.instance_uuid, p.seq, p.id, p.network_id, p.mac, p.device_number, i.ip)
        .join_from(
            t.ports,
            t.port_ips,
            sa.and_(i.instance_uuid == p.instance_uuid, i.port_seq == p.seq),
        )
        .order_by(p.instance_uuid, p.seq, i.seq)
    )
    if uuids is not None:
        query = query.where(p.instance_uuid.in_(uuids))
    grouped: dict[tuple[str, int], tuple[Any, list[IPAddress]]] = {}
    for row in conn.execute(query):
        grouped.setdefault((row.instance_uuid, row.seq), (row, []))[1].append(parse_ip(row.ip))
    ports: dict[str, list[Port]] = defaultdict(list)
    for (uuid, _seq), (row, ips) in grouped.items():
        ports[uuid].append(
            Port(
                network_id=row.network_id,
                mac=row.mac,
                ips=tuple(ips),
                id=row.id,
                device_number=row.device_number,
            )
        )
    return {uuid: tuple(found) for uuid, found in ports.items()}


def _load_instances(conn: Connection, uuids: Sequence[str] | None) -> list[Instance]:
    query = sa.select(t.instances).order_by(t.instances.c.uuid)
    if uuids is not None:
        query = query.where(t.instances.c.uuid.in_(uuids))
    rows = conn.execute(query).all()
    if not rows:
        return []
    ports = _load_ports(conn, uuids)
    return [_instance_from(row, ports.get(row.uuid, ())) for row in rows]


def _instance_from(row: Row[Any], ports: tuple[Port, ...]) -> Instance:
    options: Mapping[str, Any] | None = (
        None if row.metadata_options_json is None else json.loads(row.metadata_options_json)
    )
    try:
        return Instance(
            uuid=row.uuid,
            name=row.name,
            hostname=row.hostname,
            project_id=row.project_id,
            availability_zone=row.availability_zone,
            region=row.region,
            instance_type=row.instance_type,
            image_id=row.image_id,
            launch_index=row.launch_index,
            created_at=datetime.fromisoformat(row.created_at),
            metadata=json.loads(row.metadata_json),
            keys=tuple(SSHKey(name=k["name"], data=k["data"], type=k["type"]) for k in json.loads(row.keys_json)),
            user_data=None if row.user_data is None else bytes(row.user_data),
            vendor_data=None if row.vendor_data_json is None else json.loads(row.vendor_data_json),
            tags=json.loads(row.tags_json),
            security_groups=tuple(json.loads(row.security_groups_json)),
            ports=ports,
            metadata_options=None if options is None else MetadataOptions(**options),
            architecture=row.architecture,
            source=row.source,
        )
    except (ValidationError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"instance {row.uuid} in the database is unreadable: {exc}") from exc
