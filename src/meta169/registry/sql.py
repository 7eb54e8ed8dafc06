"""The registry on SQL: SQLite (default) and PostgreSQL, through SQLAlchemy Core.

Writes run in one transaction that first bumps the revision row, so writers are
serialized and every revision's change-log rows commit with it. Reads run in a
snapshot (SQLite's read transaction in WAL mode, PostgreSQL's REPEATABLE READ).
Driver and SQLAlchemy exceptions are translated to RegistryError here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import operator
import select
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.pool import QueuePool

from meta169.errors import (
    AmbiguousCaller,
    Conflict,
    NotFound,
    RegistryError,
    RegistryUnavailable,
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
from meta169.registry.base import Batch, Changes, Notice, Resolution
from meta169.registry.integrity import SHOWN, narrows, network_in_use, require_ports_within
from meta169.registry.schema import Migration, migrate

T = TypeVar("T")
P = ParamSpec("P")

# How long a SQLite writer waits for another process's write lock (`meta169 import`
# while `serve` runs) before giving up with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 10_000

_WRITE = "meta169_write"

# Values per ``IN (...)`` list: SQLite before 3.32 allowed 999 bound parameters.
_CHUNK = 500


def create_engine(url: str | sa.URL) -> Engine:
    """An engine set up for the registry: SQLite in WAL mode with foreign keys on."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    engine = sa.create_engine(parsed, connect_args=pg_connect_defaults(parsed))
    # A PostgreSQL restart must not turn the next request into an error: a pooled
    # connection is checked on checkout as pool_pre_ping would, but pinged only when
    # it may be dead (see _pg_checkout), not with a round trip on every read.
    event.listen(engine, "checkin", _pg_on_checkin)
    event.listen(engine, "checkout", _pg_checkout(engine.dialect))
    event.listen(engine, "handle_error", _pg_on_error)
    return engine


# libpq parameters (www.postgresql.org/docs/current/libpq-connect.html) a registry URL
# may set itself: without them a server that vanished from the network holds a
# connect for minutes and a query on an established connection for the kernel's
# retransmission timeout (about 15 minutes), and serve answers nobody meanwhile.
PG_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
}


def pg_connect_defaults(url: sa.URL) -> dict[str, Any]:
    """The connection parameters of :data:`PG_CONNECT_DEFAULTS` that ``url`` leaves unset."""
    return {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in url.query}


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


# SQLSTATEs of a session the server ended or will not serve (PostgreSQL's
# documentation, Appendix A): class 08 "connection exception", and admin_shutdown,
# crash_shutdown and cannot_connect_now (a restart, pg_terminate_backend, a crash).
_PG_SESSION_ENDED_CLASS = "08"
_PG_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})


def _session_lost(dialect: sa.Dialect, exc: Any, dbapi_conn: Any) -> bool:
    """Whether a driver error means the session cannot be used again: SQLAlchemy's own
    test (for PostgreSQL: libpq marked the connection bad) or, on PostgreSQL,
    :func:`_pg_session_ended`."""
    if dialect.is_disconnect(exc, dbapi_conn, None):
        return True
    return dialect.name == "postgresql" and _pg_session_ended(dialect, exc)


def _pg_session_ended(dialect: sa.Dialect, exc: BaseException) -> bool:
    """What SQLAlchemy's psycopg dialect misses: it asks only whether libpq marked the
    connection bad, and psycopg can fail first on the socket while libpq still counts a
    command in progress ("connection socket closed": poll reported an error or a
    hang-up, seen when pg_terminate_backend ends a session). A ROLLBACK on that
    connection then fails too, and the pool would keep it. An OperationalError without
    a SQLSTATE is the client library's own (the socket, not the server: a statement or
    lock timeout carries 57014 or 55P03), so it counts as lost as well."""
    if not isinstance(exc, dialect.loaded_dbapi.OperationalError):
        return False
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        return True
    return bool(sqlstate.startswith(_PG_SESSION_ENDED_CLASS) or sqlstate in _PG_SESSION_ENDED)


def _pg_on_error(ctx: sa.engine.ExceptionContext) -> None:
    """The engine's error hook: a statement's error on an ended session invalidates its
    connection (and the pool's older ones), so no ROLLBACK is sent on it and a read is
    made again on a fresh one (:func:`_read_again_when_lost`). Errors while connecting
    (no connection yet) are left alone: making them again would double a connect
    timeout."""
    if ctx.is_disconnect or ctx.connection is None:
        return
    if _pg_session_ended(ctx.dialect, ctx.original_exception):
        ctx.is_disconnect = True


# A pooled PostgreSQL connection idle longer than this is pinged on checkout even
# when its socket is quiet.
PG_PING_IDLE_S = 5.0
_PG_IDLE_SINCE = "meta169_idle_since"


def _pg_on_checkin(dbapi_conn: Any, record: Any) -> None:
    if record is not None:
        record.info[_PG_IDLE_SINCE] = time.monotonic()


def _pg_checkout(dialect: sa.Dialect) -> Callable[[Any, Any, Any], None]:
    """The pool's checkout listener: ping a pooled connection that may be dead, and on
    a lost one raise InvalidatePoolError, so the pool reconnects this and every older
    connection (what pool_pre_ping does on a failed ping).

    A server that ends a session (a restart or shutdown, pg_terminate_backend,
    idle_session_timeout) sends a FATAL error and closes the socket, which makes an
    idle socket readable: polling it costs no round trip, where pool_pre_ping's
    ``SELECT 1`` cost one on every read (about a third of resolving a caller, see
    docs/benchmarks.md). What a quiet socket cannot tell, a peer gone without a word
    (a middlebox dropped the flow), a ping after PG_PING_IDLE_S of idleness still
    finds, as before.
    """
    error: Any = dialect.loaded_dbapi.Error

    def on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle = time.monotonic() - record.info.get(_PG_IDLE_SINCE, time.monotonic())
        if idle < PG_PING_IDLE_S and not _readable(dbapi_conn, error):
            return
        try:
            dialect.do_ping(dbapi_conn)
        except error as exc:
            if _session_lost(dialect, exc, dbapi_conn):
                raise sa.exc.InvalidatePoolError(f"pooled connection lost: {exc}") from exc
            raise

    return on_checkout


def _readable(dbapi_conn: Any, error: Any) -> bool:
    """Whether an idle connection's socket has something to read (an error, or the
    end of the stream), or cannot be polled at all (closed: the ping decides)."""
    try:
        poller = select.poll()
        poller.register(dbapi_conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, TypeError, error):
        return True


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except sa.exc.IntegrityError as exc:
        # Only the driver's message: the statement and its parameters may hold user
        # data or passwords.
        raise Conflict(f"{action}: {exc.orig}") from exc
    except sa.exc.DBAPIError as exc:
        # OperationalError: the connection was refused, lost or timed out (PEP 249's
        # "errors related to the database's operation"), or SQLite was locked.
        unreachable = isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or exc.connection_invalidated
        error = RegistryUnavailable if unreachable else RegistryError
        raise error(f"{action}: {exc.orig.__class__.__name__}: {exc.orig}") from exc
    except (sa.exc.DisconnectionError, sa.exc.TimeoutError) as exc:
        raise RegistryUnavailable(f"{action}: {exc.__class__.__name__}: {exc}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise RegistryError(f"{action}: {exc.__class__.__name__}: {exc}") from exc


def _read_again_when_lost(
    read: Callable[Concatenate[SqlRegistry, P], T],
) -> Callable[Concatenate[SqlRegistry, P], T]:
    """A read that failed on a pooled connection the driver found lost is made again
    once, on a fresh pool.

    A session the server ended can look alive for a moment: the server's message
    has not reached the socket when the pool checks it (a restart, or
    pg_terminate_backend, racing the next read). Its pooled siblings went the same
    way, so the pool is emptied first. Reads only: a write that failed may have
    reached the server, and its caller decides."""

    @functools.wraps(read)
    def again(self: SqlRegistry, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return read(self, *args, **kwargs)
        except RegistryUnavailable as exc:
            if not _connection_lost(exc):
                raise
            self.engine.dispose()
            return read(self, *args, **kwargs)

    return again


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
        self._resolve_sql = _ResolveStatements(engine.dialect)
        # PostgreSQL: every write notifies listeners on this channel (see _notify).
        self._notifies = engine.dialect.name == "postgresql"
        self._channel: str | None = None
        self._single_engine: Engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if self._notifies else engine
        )

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

    @property
    def reads_in_process(self) -> bool:
        """SQLite on a file: each thread reads through a connection of its own (an
        in-memory SQLite database is one per connection, so it stays on its thread)."""
        return self._engine.dialect.name == "sqlite" and isinstance(self._engine.pool, QueuePool)

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
            conn.info.pop(_NETWORKS_WRITTEN, None)
            yield conn, revision
            if self._notifies:
                if self._channel is None:
                    self._channel = channel_name(conn.execute(sa.select(sa.func.current_schema())).scalar_one())
                _notify(conn, self._channel, revision, networks=conn.info.pop(_NETWORKS_WRITTEN, False))

    # -- writes ---------------------------------------------------------------------

    def put_network(self, network: Network) -> None:
        with self._writing(f"cannot store network {network.id}") as (conn, revision):
            narrowed = _narrowed(conn, [network])
            _store_network(conn, network)
            _require_ports_within(conn, narrowed)
            _log(conn, revision, None)

    def put_router(self, router: Router) -> None:
        with self._writing(f"cannot store router {router.id}") as (conn, revision):
            _store_router(conn, router)
            _log(conn, revision, None)

    def put_instance(self, instance: Instance) -> None:
        instance = stored_instance(instance)
        with self._writing(f"cannot store instance {instance.uuid}") as (conn, revision):
            ports_changed = _store_instances(conn, [instance])
            _log(conn, revision, instance.uuid)
            if ports_changed:
                _log(conn, revision, None)

    def delete_instance(self, uuid: str) -> None:
        with self._writing(f"cannot delete instance {uuid}") as (conn, revision):
            removed, had_ports = _remove_instances(conn, [uuid])
            if not removed:
                raise NotFound(f"no instance {uuid}")
            _log(conn, revision, uuid)
            if had_ports:
                _log(conn, revision, None)

    def delete_network(self, network_id: str) -> None:
        with self._writing(f"cannot delete network {network_id}") as (conn, revision):
            if not _remove_network(conn, network_id):
                raise NotFound(f"no network {network_id}")
            _log(conn, revision, None)

    def delete_router(self, router_id: str) -> None:
        with self._writing(f"cannot delete router {router_id}") as (conn, revision):
            if not _remove_router(conn, router_id):
                raise NotFound(f"no router {router_id}")
            _log(conn, revision, None)

    def apply_batch(self, batch: Batch) -> int:
        """Every write of ``batch`` in one transaction and one revision: the rows go
        in with one multi-row statement per table (executemany), not one
        transaction per object, so 100,000 instances take seconds, and a failure
        anywhere (a Conflict, the database) rolls all of it back.

        A network stored with subnets that may hold fewer addresses than before is
        a Conflict when, after the batch's other writes, a port address on it lies
        outside all of them (:mod:`meta169.registry.integrity`): one read of that
        network's addresses, in this transaction, so no writer gets in between."""
        if not len(batch):
            return self.revision()
        instances = [stored_instance(i) for i in batch.instances]
        with self._writing(f"cannot write a batch of {len(batch)} changes") as (conn, revision):
            changed, topology = _remove_instances(conn, batch.delete_instances)
            narrowed = _narrowed(conn, batch.networks)
            for network in batch.networks:
                _store_network(conn, network)
            for router in batch.routers:
                _store_router(conn, router)
            topology = _store_instances(conn, instances) or topology or bool(batch.networks or batch.routers)
            changed += [i.uuid for i in instances]
            for router_id in batch.delete_routers:
                topology = _remove_router(conn, router_id) or topology
            for network_id in batch.delete_networks:
                topology = _remove_network(conn, network_id) or topology
            _require_ports_within(conn, narrowed)
            rows: list[dict[str, Any]] = [{"revision": revision, "instance_uuid": uuid} for uuid in changed]
            if topology:
                rows.append({"revision": revision, "instance_uuid": None})
            if rows:
                _insert_rows(conn, t.change_log, rows)
        return revision

    # -- reads ----------------------------------------------------------------------

    @_read_again_when_lost
    def get_instance(self, uuid: str) -> Instance:
        with self._reading(f"cannot read instance {uuid}") as conn:
            found = _load_instances(conn, [uuid])
        if not found:
            raise NotFound(f"no instance {uuid}")
        return found[0]

    @_read_again_when_lost
    def get_network(self, network_id: str) -> Network:
        with self._reading(f"cannot read network {network_id}") as conn:
            found = _load_networks(conn, network_id)
        if not found:
            raise NotFound(f"no network {network_id}")
        return found[0]

    @_read_again_when_lost
    def get_router(self, router_id: str) -> Router:
        with self._reading(f"cannot read router {router_id}") as conn:
            found = _load_routers(conn, router_id)
        if not found:
            raise NotFound(f"no router {router_id}")
        return found[0]

    @_read_again_when_lost
    def list_instances(self, *, limit: int | None = None, marker: str | None = None) -> Sequence[Instance]:
        if limit is not None and limit < 0:
            raise ValidationError(f"limit must be >= 0, not {limit}")
        if limit == 0:
            return []
        with self._reading("cannot list instances") as conn:
            return _load_instances(conn, None, after=marker, limit=limit)

    @_read_again_when_lost
    def count_instances(self) -> int:
        with self._reading("cannot count instances") as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t.instances)).scalar_one())

    @_read_again_when_lost
    def has_instances(self) -> bool:
        with self._reading("cannot read the registry") as conn:
            return conn.execute(sa.select(t.instances.c.uuid).limit(1)).first() is not None

    @_read_again_when_lost
    def list_networks(self) -> Sequence[Network]:
        with self._reading("cannot list networks") as conn:
            return _load_networks(conn, None)

    @_read_again_when_lost
    def list_routers(self) -> Sequence[Router]:
        with self._reading("cannot list routers") as conn:
            return _load_routers(conn, None)

    @_read_again_when_lost
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

    @_read_again_when_lost
    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        """One query per scope (and per ``_CHUNK`` callers): each caller's port IP
        joined to its instance, the instance's ports and their IPs."""
        batches = _resolve_batches(callers)
        return _resolutions(callers, self._resolve_batches(batches, len(callers)))

    def _resolve_batches(self, batches: Sequence[_ResolveBatch], count: int) -> dict[_HitKey, dict[str, Instance]]:
        found: dict[_HitKey, dict[str, Instance]] = {}
        # One statement needs no snapshot: it runs without BEGIN and COMMIT (PostgreSQL
        # in autocommit, SQLite's own read transaction of one statement).
        single = len(batches) <= 1
        engine = self._single_engine if single else self._read_engine
        with (
            _translated(f"cannot resolve {count} callers"),
            engine.connect() as conn,
            contextlib.nullcontext() if single else conn.begin(),
        ):
            for (network_id, router_id), chunk in batches:
                for ip, owners in _resolve_rows(conn, self._resolve_sql, network_id, router_id, chunk).items():
                    found[(network_id, router_id, ip)] = owners
        return found

    @_read_again_when_lost
    def get_instances(self, uuids: Iterable[str]) -> Sequence[Instance]:
        wanted = sorted(set(uuids))
        with self._reading(f"cannot read {len(wanted)} instances") as conn:
            return [i for chunk in _chunks(wanted) for i in _load_instances(conn, chunk)]

    @_read_again_when_lost
    def port_owners(self, network_ids: Sequence[str]) -> Sequence[tuple[str, str, str]]:
        i = t.port_ips.c
        with self._reading(f"cannot read the addresses of {len(network_ids)} networks") as conn:
            return [
                (row.network_id, row.ip, row.instance_uuid)
                for chunk in _chunks(sorted(set(network_ids)))
                for row in conn.execute(
                    sa.select(i.network_id, i.ip, i.instance_uuid)
                    .where(i.network_id.in_(chunk))
                    .distinct()
                    .order_by(i.network_id, i.ip, i.instance_uuid)
                )
            ]

    @_read_again_when_lost
    def get_networks(self, network_ids: Iterable[str]) -> dict[str, Network]:
        wanted = sorted(set(network_ids))
        with self._reading(f"cannot read {len(wanted)} networks") as conn:
            return {n.id: n for chunk in _chunks(wanted) for n in _load_networks_in(conn, chunk)}

    def change_feed(self) -> PgChangeFeed | None:
        if not self._notifies:
            return None
        return PgChangeFeed(self._engine)

    def async_reader(self, *, timeout: float) -> PgAsyncReader | None:
        if self._engine.dialect.name != "postgresql":
            return None
        return PgAsyncReader(self._engine, self._resolve_sql, timeout=timeout)

    # -- passwords ------------------------------------------------------------------

    @_read_again_when_lost
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

    @_read_again_when_lost
    def revision(self) -> int:
        with self._reading("cannot read the registry revision") as conn:
            return _current_revision(conn)

    @_read_again_when_lost
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


def _connection_lost(exc: RegistryError) -> bool:
    """Whether ``exc`` came from a connection the driver found lost (and invalidated)."""
    cause = exc.__cause__
    return isinstance(cause, sa.exc.DBAPIError) and bool(cause.connection_invalidated)


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
    present = _present(conn, t.networks.c.id, wanted)
    missing = [n for n in wanted if n not in present]
    if missing:
        raise Conflict(f"{who} refers to unknown network(s) {', '.join(missing)}")


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _matching(conn: Connection, column: sa.Column[Any], values: Sequence[str]) -> Iterator[sa.ColumnElement[bool]]:
    """Conditions that together say ``column IN values``: one array parameter on
    PostgreSQL (``= ANY(...)``; an IN list of 100,000 parameters costs the driver a
    second to send), ``_CHUNK`` values per IN list on SQLite."""
    if not values:
        return
    if conn.dialect.name == "postgresql":
        yield column == sa.any_(sa.bindparam(None, list(values), type_=ARRAY(sa.Text)))
        return
    for chunk in _chunks(values):
        yield column.in_(chunk)


def _present(conn: Connection, column: sa.Column[Any], values: Sequence[str]) -> set[str]:
    """Which of ``values`` the column holds."""
    found: set[str] = set()
    for condition in _matching(conn, column, values):
        found.update(conn.execute(sa.select(column).where(condition).distinct()).scalars())
    return found


def _store_network(conn: Connection, network: Network) -> None:
    _mark_networks_written(conn)
    row = {"project_id": network.project_id, "name": network.name, "mtu": network.mtu, "source": network.source}
    if _exists(conn, t.networks.c.id, network.id):
        conn.execute(t.networks.update().where(t.networks.c.id == network.id).values(**row))
        conn.execute(t.subnets.delete().where(t.subnets.c.network_id == network.id))
    else:
        conn.execute(t.networks.insert().values(id=network.id, **row))
    if network.subnets:
        conn.execute(t.subnets.insert(), [_subnet_row(network.id, seq, s) for seq, s in enumerate(network.subnets)])


def _store_router(conn: Connection, router: Router) -> None:
    _mark_networks_written(conn)
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
            [{"router_id": router.id, "network_id": net, "seq": seq} for seq, net in enumerate(router.network_ids)],
        )


def _store_instances(conn: Connection, instances: Sequence[Instance]) -> bool:
    """Insert or replace ``instances`` (already :func:`stored_instance`) with their
    ports, a statement per table for all of them; whether any port was added,
    changed or removed (topology)."""
    if not instances:
        return False
    wanted = sorted({p.network_id for i in instances for p in i.ports})
    missing = set(wanted) - _present(conn, t.networks.c.id, wanted)
    if missing:
        first = next(i for i in instances if any(p.network_id in missing for p in i.ports))
        unknown = sorted({p.network_id for p in first.ports} & missing)
        raise Conflict(f"instance {first.uuid} refers to unknown network(s) {', '.join(unknown)}")
    uuids = [i.uuid for i in instances]
    existing = _present(conn, t.instances.c.uuid, uuids)
    port_rows: list[dict[str, Any]] = []
    ip_rows: list[dict[str, Any]] = []
    for instance in instances:
        _port_rows(instance.uuid, instance.ports, port_rows, ip_rows)
    topology = any(i.ports for i in instances if i.uuid not in existing)
    replaced = [u for u in uuids if u in existing]
    if replaced:
        if not topology:
            new = {_port_key(p, i) for p, i in _with_ips(port_rows, ip_rows) if p["instance_uuid"] in existing}
            topology = new != _stored_port_keys(conn, replaced)
        for condition in _matching(conn, t.port_ips.c.instance_uuid, replaced):
            conn.execute(t.port_ips.delete().where(condition))
        for condition in _matching(conn, t.ports.c.instance_uuid, replaced):
            conn.execute(t.ports.delete().where(condition))
        # Updated in place, never deleted and inserted: a replace keeps the guest's password.
        rows = [{"b_uuid": i.uuid, **_instance_row(i)} for i in instances if i.uuid in existing]
        update = (
            t.instances.update()
            .where(t.instances.c.uuid == sa.bindparam("b_uuid"))
            .values({name: sa.bindparam(name) for name in rows[0] if name != "b_uuid"})
        )
        conn.execute(update, rows)
    added = [{"uuid": i.uuid, **_instance_row(i)} for i in instances if i.uuid not in existing]
    if added:
        _insert_rows(conn, t.instances, added)
    if port_rows:
        _insert_rows(conn, t.ports, port_rows)
    if ip_rows:
        _insert_rows(conn, t.port_ips, ip_rows)
    return topology


def _insert_rows(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each with the same keys, column names of ``table``) in bulk:
    PostgreSQL's COPY, SQLite's executemany, without SQLAlchemy's per-row work
    (with it, 100,000 instances took 2.5 times as long on SQLite, 4 on PostgreSQL).

    The values are those SQLAlchemy would bind for these column types: text, int,
    bytes and None only.
    """
    if not rows:
        return
    columns = list(rows[0])
    # itemgetter of one key returns the value, not a 1-tuple.
    values = list(map(operator.itemgetter(*columns), rows)) if len(columns) > 1 else [(r[columns[0]],) for r in rows]
    if conn.dialect.name != "postgresql":
        # The statement SQLAlchemy would run ("INSERT INTO t (a, b) VALUES (?, ?)"),
        # handed to the driver's executemany with plain tuples.
        insert = table.insert().compile(dialect=conn.dialect, column_keys=columns)
        conn.exec_driver_sql(str(insert), values)
        return
    from psycopg import sql

    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(sql.Identifier(table.c[name].name) for name in columns)
    )
    # COPY runs on the DBAPI connection, in the transaction SQLAlchemy opened on it,
    # and its errors are psycopg's own: translated here as _translated does.
    dbapi, driver = conn.dialect.loaded_dbapi, conn.connection.driver_connection
    if driver is None:
        raise RegistryError(f"{table.name}: the database connection is closed")
    try:
        with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:
            for value in values:
                copy.write_row(value)
    except dbapi.IntegrityError as exc:
        raise Conflict(f"{table.name}: {exc}") from exc
    except dbapi.Error as exc:
        raise RegistryError(f"{table.name}: {exc.__class__.__name__}: {exc}") from exc


def _with_ips(
    port_rows: list[dict[str, Any]], ip_rows: list[dict[str, Any]]
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    by_port = {(p["instance_uuid"], p["seq"]): p for p in port_rows}
    for ip_row in ip_rows:
        yield by_port[ip_row["instance_uuid"], ip_row["port_seq"]], ip_row


_PortKey = tuple[str, int, str, str, str, int, int, str]


def _port_key(port: Mapping[str, Any], ip: Mapping[str, Any]) -> _PortKey:
    return (
        str(port["instance_uuid"]),
        int(port["seq"]),
        str(port["id"]),
        str(port["network_id"]),
        str(port["mac"]),
        int(port["device_number"]),
        int(ip["seq"]),
        str(ip["ip"]),
    )


def _stored_port_keys(conn: Connection, uuids: Sequence[str]) -> set[_PortKey]:
    """The stored ports of ``uuids``, one key per port address, to compare with new ones."""
    p, i = t.ports.c, t.port_ips.c
    found: set[_PortKey] = set()
    for condition in _matching(conn, p.instance_uuid, uuids):
        query = sa.select(
            p.instance_uuid, p.seq, p.id, p.network_id, p.mac, p.device_number, i.seq.label("ip_seq"), i.ip
        ).join_from(t.ports, t.port_ips, sa.and_(i.instance_uuid == p.instance_uuid, i.port_seq == p.seq))
        found.update(
            (row.instance_uuid, row.seq, row.id, row.network_id, row.mac, row.device_number, row.ip_seq, row.ip)
            for row in conn.execute(query.where(condition))
        )
    return found


def _remove_instances(conn: Connection, uuids: Sequence[str]) -> tuple[list[str], bool]:
    """Delete those of ``uuids`` that exist, with their ports and passwords: which
    existed, and whether any of them had ports."""
    present = sorted(_present(conn, t.instances.c.uuid, list(uuids)))
    had_ports = bool(_present(conn, t.ports.c.instance_uuid, present))
    for table, column in (
        (t.port_ips, t.port_ips.c.instance_uuid),
        (t.ports, t.ports.c.instance_uuid),
        (t.passwords, t.passwords.c.instance_uuid),
        (t.instances, t.instances.c.uuid),
    ):
        for condition in _matching(conn, column, present):
            conn.execute(table.delete().where(condition))
    return present, had_ports


def _remove_router(conn: Connection, router_id: str) -> bool:
    """Delete the router if it exists; whether it did."""
    _mark_networks_written(conn)
    if not _exists(conn, t.routers.c.id, router_id):
        return False
    conn.execute(t.router_networks.delete().where(t.router_networks.c.router_id == router_id))
    conn.execute(t.routers.delete().where(t.routers.c.id == router_id))
    return True


def _remove_network(conn: Connection, network_id: str) -> bool:
    """Delete the network if it exists; whether it did. Conflict while ports or
    routers use it."""
    _mark_networks_written(conn)
    if not _exists(conn, t.networks.c.id, network_id):
        return False
    p = t.ports.c
    first = sa.select(p.instance_uuid).where(p.network_id == network_id).distinct().order_by(p.instance_uuid)
    users = conn.execute(first.limit(SHOWN)).scalars().all()
    routers = (
        conn.execute(
            sa.select(t.router_networks.c.router_id)
            .where(t.router_networks.c.network_id == network_id)
            .order_by(t.router_networks.c.router_id)
        )
        .scalars()
        .all()
    )
    if users or routers:
        count = len(users)
        if count == SHOWN:  # perhaps more: count them (the ports_network index)
            count = conn.execute(
                sa.select(sa.func.count(sa.distinct(p.instance_uuid))).where(p.network_id == network_id)
            ).scalar_one()
        names = _instance_names(conn, users)
        raise network_in_use(network_id, [(uuid, names.get(uuid, "")) for uuid in users], count, routers)
    conn.execute(t.subnets.delete().where(t.subnets.c.network_id == network_id))
    conn.execute(t.networks.delete().where(t.networks.c.id == network_id))
    return True


def _narrowed(conn: Connection, networks: Sequence[Network]) -> dict[str, Network]:
    """Those of ``networks``, about to be stored, whose subnets may hold fewer
    addresses than the stored ones' (:func:`~meta169.registry.integrity.narrows`)."""
    wanted = sorted({n.id for n in networks if n.subnets})  # without subnets: any IP
    if not wanted:
        return {}
    stored = {n.id: n for chunk in _chunks(wanted) for n in _load_networks_in(conn, chunk)}
    return {n.id: n for n in networks if narrows(stored.get(n.id), n)}


def _require_ports_within(conn: Connection, networks: Mapping[str, Network]) -> None:
    """Conflict when a port address on ``networks`` lies outside all of their
    subnets. Run after a batch's writes: the instances it replaced or removed count
    as they are now. One read of those networks' addresses (the port_ips_lookup
    index), never one per instance; the names only of the few the refusal names."""
    if not networks:
        return
    i = t.port_ips.c
    owners = (
        (row.network_id, row.ip, row.instance_uuid)
        for condition in _matching(conn, i.network_id, sorted(networks))
        for row in conn.execute(sa.select(i.network_id, i.ip, i.instance_uuid).where(condition))
    )
    require_ports_within(networks, owners, lambda uuids: _instance_names(conn, uuids))


def _instance_names(conn: Connection, uuids: Sequence[str]) -> dict[str, str]:
    c = t.instances.c
    return {
        row.uuid: row.name
        for condition in _matching(conn, c.uuid, uuids)
        for row in conn.execute(sa.select(c.uuid, c.name).where(condition))
    }


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
    """Every network, or the one named (an empty list when it is not there)."""
    return _load_networks_in(conn, None if network_id is None else (network_id,))


def _load_networks_in(conn: Connection, network_ids: Sequence[str] | None) -> list[Network]:
    """The networks named (all of them for None), in id order, with their subnets."""
    nq = sa.select(t.networks).order_by(t.networks.c.id)
    sq = sa.select(t.subnets).order_by(t.subnets.c.network_id, t.subnets.c.seq)
    if network_ids is not None:
        nq = nq.where(t.networks.c.id.in_(network_ids))
        sq = sq.where(t.subnets.c.network_id.in_(network_ids))
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


def _port_rows(
    uuid: str, ports: Sequence[Port], port_rows: list[dict[str, Any]], ip_rows: list[dict[str, Any]]
) -> None:
    """Append the rows of ``ports`` (of instance ``uuid``) to the two lists."""
    for port_seq, port in enumerate(ports):
        port_rows.append(
            {
                "instance_uuid": uuid,
                "seq": port_seq,
                "id": port.id,
                "network_id": port.network_id,
                "mac": port.mac,
                "device_number": port.device_number,
            }
        )
        ip_rows.extend(
            {"instance_uuid": uuid, "port_seq": port_seq, "seq": seq, "network_id": port.network_id, "ip": str(ip)}
            for seq, ip in enumerate(port.ips)
        )


def _load_ports(
    conn: Connection, uuids: Sequence[str] | None, *, between: tuple[str, str] | None = None
) -> dict[str, tuple[Port, ...]]:
    """The ports of ``uuids`` (all when None), or of the uuids ``between`` two, inclusive."""
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
    if between is not None:
        query = query.where(p.instance_uuid >= between[0], p.instance_uuid <= between[1])
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


def _load_instances(
    conn: Connection, uuids: Sequence[str] | None, *, after: str | None = None, limit: int | None = None
) -> list[Instance]:
    query = sa.select(t.instances).order_by(t.instances.c.uuid)
    if uuids is not None:
        query = query.where(t.instances.c.uuid.in_(uuids))
    if after is not None:
        query = query.where(t.instances.c.uuid > after)
    if limit is not None:
        query = query.limit(limit)
    rows = conn.execute(query).all()
    if not rows:
        return []
    if uuids is None and (after is not None or limit is not None):
        # A page: its ports by the uuid range (the primary key's prefix), not a list.
        ports = _load_ports(conn, None, between=(rows[0].uuid, rows[-1].uuid))
    else:
        ports = _load_ports(conn, uuids)
    return [_instance_from(row, ports.get(row.uuid, ())) for row in rows]


# The columns of ``instances`` in table order: a row of ``select(t.instances)`` and the
# first columns of the resolve statement below, read by position.
_INSTANCE_COLUMNS = (
    "uuid",
    "name",
    "hostname",
    "project_id",
    "availability_zone",
    "region",
    "instance_type",
    "image_id",
    "launch_index",
    "created_at",
    "metadata_json",
    "keys_json",
    "user_data",
    "vendor_data_json",
    "tags_json",
    "security_groups_json",
    "metadata_options_json",
    "architecture",
    "source",
)
if tuple(c.name for c in t.instances.c) != _INSTANCE_COLUMNS:  # pragma: no cover - caught by any test run
    raise ImportError("registry/sql.py reads the instances table by position: update _INSTANCE_COLUMNS")


def _instance_from(row: Sequence[Any], ports: tuple[Port, ...]) -> Instance:
    """The instance of a row whose first columns are :data:`_INSTANCE_COLUMNS`: a
    SQLAlchemy ``Row`` or a driver's tuple."""
    (
        uuid,
        name,
        hostname,
        project_id,
        availability_zone,
        region,
        instance_type,
        image_id,
        launch_index,
        created_at,
        metadata_json,
        keys_json,
        user_data,
        vendor_data_json,
        tags_json,
        security_groups_json,
        metadata_options_json,
        architecture,
        source,
    ) = row[: len(_INSTANCE_COLUMNS)]
    try:
        options: Mapping[str, Any] | None = None if metadata_options_json is None else json.loads(metadata_options_json)
        return Instance(
            uuid=uuid,
            name=name,
            hostname=hostname,
            project_id=project_id,
            availability_zone=availability_zone,
            region=region,
            instance_type=instance_type,
            image_id=image_id,
            launch_index=launch_index,
            created_at=datetime.fromisoformat(created_at),
            metadata=json.loads(metadata_json),
            keys=tuple(SSHKey(name=k["name"], data=k["data"], type=k["type"]) for k in json.loads(keys_json)),
            user_data=None if user_data is None else bytes(user_data),
            vendor_data=None if vendor_data_json is None else json.loads(vendor_data_json),
            tags=json.loads(tags_json),
            security_groups=tuple(json.loads(security_groups_json)),
            ports=ports,
            metadata_options=None if options is None else MetadataOptions(**options),
            architecture=architecture,
            source=source,
        )
    except (ValidationError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"instance {uuid} in the database is unreadable: {exc}") from exc


# -- caller resolution in bulk ---------------------------------------------------------------

_HIT = t.port_ips.alias("hit")
_HIT_IP = t.port_ips.alias("port_ip")
_RESOLVE = (
    sa.select(
        t.instances,
        _HIT.c.ip,
        t.ports.c.seq,
        t.ports.c.id,
        t.ports.c.network_id,
        t.ports.c.mac,
        t.ports.c.device_number,
        _HIT_IP.c.seq,
        _HIT_IP.c.ip,
    )
    .select_from(
        _HIT.join(t.instances, t.instances.c.uuid == _HIT.c.instance_uuid)
        .join(t.ports, t.ports.c.instance_uuid == t.instances.c.uuid)
        .join(
            _HIT_IP,
            sa.and_(_HIT_IP.c.instance_uuid == t.ports.c.instance_uuid, _HIT_IP.c.port_seq == t.ports.c.seq),
        )
    )
    .order_by(_HIT.c.ip, t.instances.c.uuid, t.ports.c.seq, _HIT_IP.c.seq)
)
# The columns after the instance's, by position.
_R_HIT_IP = len(_INSTANCE_COLUMNS)
_R_PORT_SEQ, _R_PORT_ID, _R_PORT_NETWORK, _R_PORT_MAC, _R_PORT_DEVICE, _R_IP_SEQ, _R_IP = range(
    _R_HIT_IP + 1, _R_HIT_IP + 8
)


@dataclass(frozen=True, slots=True)
class _DriverStatement:
    """A statement compiled once for one dialect, run on the driver's cursor with
    plain parameters: serve resolves a never-seen caller with it, where SQLAlchemy's
    statement building, cache key, execution context and result rows cost about ten
    times what the database spends (docs/benchmarks.md, "scale")."""

    sql: str
    # The bound parameters' names in their order for a positional paramstyle (SQLite's
    # qmark), else None: the driver takes them by name (psycopg's pyformat).
    positions: tuple[str, ...] | None

    @classmethod
    def compile(cls, statement: sa.Select[Any], dialect: sa.Dialect) -> _DriverStatement:
        compiled = statement.compile(dialect=dialect)
        positions = compiled.positiontup
        return cls(compiled.string, None if positions is None else tuple(positions))

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The rows, as the driver returns them; a driver error is raised as
        SQLAlchemy's DBAPIError (for :func:`_translated`), a lost connection
        invalidated first so the pool does not hand it out again."""
        args: Any = params if self.positions is None else tuple(params[name] for name in self.positions)
        dbapi_conn = conn.connection.dbapi_connection
        error = conn.dialect.loaded_dbapi.Error
        try:
            cursor = dbapi_conn.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(self.sql, args)
                return list(cursor.fetchall())
            finally:
                cursor.close()
        except error as exc:
            lost = _session_lost(conn.dialect, exc, dbapi_conn)
            if lost:
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                self.sql, None, exc, error, hide_parameters=True, connection_invalidated=lost, dialect=conn.dialect
            ) from exc


class _ResolveStatements:
    """The resolve statement by scope kind and number of IPs, compiled as first asked.

    The IPs go in an ``IN`` list, its length rounded up to a power of two (the list
    padded with its last IP): at most ten statements per scope kind, each staying in
    SQLite's statement cache, and PostgreSQL (psycopg prepares a statement run five
    times) settles on a generic plan. With an array parameter (``= ANY``) it planned
    each execution again, since a generic plan cannot know the array's length: 0.4
    to 0.8 ms of the server's time per read.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[tuple[bool, int], _DriverStatement] = {}

    def rows(self, conn: Connection, network_id: str | None, router_id: str | None, ips: Sequence[str]) -> list[Any]:
        statement, params = self.bound(network_id, router_id, ips)
        return statement.rows(conn, params)

    def bound(
        self, network_id: str | None, router_id: str | None, ips: Sequence[str]
    ) -> tuple[_DriverStatement, dict[str, Any]]:
        """The statement resolving ``ips`` in the scope, and its parameters by name."""
        by_router = network_id is None
        size = 1 << (len(ips) - 1).bit_length()
        params: dict[str, Any] = {f"ip{k}": ips[min(k, len(ips) - 1)] for k in range(size)}
        params["scope"] = router_id if by_router else network_id
        statement = self._compiled.get((by_router, size))
        if statement is None:
            statement = self._compiled[(by_router, size)] = _DriverStatement.compile(
                self._statement(by_router, size), self._dialect
            )
        return statement, params

    def _statement(self, by_router: bool, size: int) -> sa.Select[Any]:
        hit = _HIT.c.ip.in_([sa.bindparam(f"ip{k}") for k in range(size)])
        scope: sa.BindParameter[str] = sa.bindparam("scope")
        if by_router:
            networks = sa.select(t.router_networks.c.network_id).where(t.router_networks.c.router_id == scope)
            return _RESOLVE.where(hit, _HIT.c.network_id.in_(networks))
        return _RESOLVE.where(hit, _HIT.c.network_id == scope)


# (network id, router id, IP text): a caller's address in its scope.
_HitKey = tuple[str | None, str | None, str]
# (network id, router id) and the IPs of one resolve statement.
_ResolveBatch = tuple[tuple[str | None, str | None], Sequence[str]]


def _resolve_batches(callers: Sequence[Caller]) -> list[_ResolveBatch]:
    """The statements resolving ``callers``: one per scope and per ``_CHUNK`` IPs."""
    scopes: dict[tuple[str | None, str | None], set[str]] = {}
    for caller in callers:
        scopes.setdefault((caller.network_id, caller.router_id), set()).add(str(caller.ip))
    return [(scope, chunk) for scope, ips in scopes.items() for chunk in _chunks(sorted(ips)) if chunk]


def _resolutions(callers: Sequence[Caller], found: Mapping[_HitKey, Mapping[str, Instance]]) -> list[Resolution]:
    """Each caller's answer from the owners ``found`` for its address."""
    results: list[Resolution] = []
    for caller in callers:
        ip = str(caller.ip)
        owners = found.get((caller.network_id, caller.router_id, ip), {})
        if len(owners) == 1:
            results.append(next(iter(owners.values())))
        elif not owners:
            results.append(UnknownCaller(caller.scope, ip))
        else:
            results.append(AmbiguousCaller(caller.scope, ip, sorted(owners)))
    return results


def _resolve_rows(
    conn: Connection,
    statements: _ResolveStatements,
    network_id: str | None,
    router_id: str | None,
    ips: Sequence[str],
) -> dict[str, dict[str, Instance]]:
    """For each of ``ips`` owned in the scope: its owners by uuid, each read whole.

    One statement through the (network_id, ip) index: the owning port IPs joined to
    their instances, each instance's ports and their IPs (a row per port IP).
    """
    return _owners_by_ip(statements.rows(conn, network_id, router_id, ips))


def _owners_by_ip(rows: Iterable[Sequence[Any]]) -> dict[str, dict[str, Instance]]:
    """The resolve statement's rows (a row per port IP of each owner) as each IP's
    owners by uuid, each read whole."""
    # ip -> uuid -> (instance row, port seq -> (port row, {ip seq: ip}))
    grouped: dict[str, dict[str, tuple[Any, dict[int, tuple[Any, dict[int, IPAddress]]]]]] = {}
    for row in rows:
        owners = grouped.setdefault(row[_R_HIT_IP], {})
        _, ports = owners.setdefault(row[0], (row, {}))
        # An instance owning the IP twice in the scope repeats its rows: keyed, not appended.
        ports.setdefault(row[_R_PORT_SEQ], (row, {}))[1][row[_R_IP_SEQ]] = parse_ip(row[_R_IP])
    return {
        ip: {
            uuid: _instance_from(
                row,
                tuple(
                    Port(
                        network_id=port[_R_PORT_NETWORK],
                        mac=port[_R_PORT_MAC],
                        ips=tuple(addresses[k] for k in sorted(addresses)),
                        id=port[_R_PORT_ID],
                        device_number=port[_R_PORT_DEVICE],
                    )
                    for _, (port, addresses) in sorted(ports.items())
                ),
            )
            for uuid, (row, ports) in owners.items()
        }
        for ip, owners in grouped.items()
    }


# -- change notification (PostgreSQL LISTEN/NOTIFY) ------------------------------------------

# The payload must be shorter than 8000 bytes in PostgreSQL's default build
# (www.postgresql.org/docs/current/sql-notify.html); a longer list says "ask".
NOTIFY_PAYLOAD_MAX = 7999
# uuids listed at most: 36 characters, quotes and a comma each, fit in the payload.
_NOTIFY_UUIDS_MAX = 200


def channel_name(schema: str) -> str:
    """The NOTIFY channel of the registry in ``schema``: several registries may share
    one database in different schemas, and channels are per database."""
    name = "meta169" if schema == "public" else f"meta169.{schema}"
    if len(name.encode()) > 63:  # NAMEDATALEN - 1
        import hashlib

        name = f"meta169.{hashlib.sha256(schema.encode()).hexdigest()[:32]}"
    return name


def notice_payload(revision: int, since: int, uuids: Iterable[str | None], *, networks: bool = True) -> str:
    """The NOTIFY payload of a write: ``{"r": revision, "s": since, "i": [uuids],
    "t": topology, "n": networks}`` (``n``: networks or routers were written, not
    only the ports of the instances listed), or only ``r`` and ``s`` when the uuids
    do not fit."""
    listed = list(uuids)
    changed = sorted({u for u in listed if u is not None})
    topology = None in listed
    if len(changed) <= _NOTIFY_UUIDS_MAX:
        fields = {"r": revision, "s": since, "i": changed, "t": topology, "n": topology and networks}
        text = json.dumps(fields, separators=(",", ":"))
        if len(text.encode()) <= NOTIFY_PAYLOAD_MAX:
            return text
    return json.dumps({"r": revision, "s": since}, separators=(",", ":"))


def parse_notice(payload: str) -> Notice:
    """The Notice a payload of :func:`notice_payload` describes; anything else (another
    version's format) is a Notice that lists nothing, so the reader asks the change log."""
    try:
        data = json.loads(payload)
        revision, since = int(data["r"]), int(data["s"])
        uuids = data.get("i")
        if uuids is None:
            return Notice(revision, since, None)
        if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
            raise ValueError("uuids")
        topology = bool(data.get("t"))
        return Notice(
            revision, since, frozenset(uuids), topology, networks_changed=topology and data.get("n", True) is not False
        )
    except (ValueError, TypeError, KeyError):
        return Notice(0, -1, None)


# Set in Connection.info by a write to a network or a router (not by ports only),
# for the notification to say which kind of topology changed.
_NETWORKS_WRITTEN = "meta169_networks_written"


def _mark_networks_written(conn: Connection) -> None:
    conn.info[_NETWORKS_WRITTEN] = True


def _notify(conn: Connection, channel: str, revision: int, *, networks: bool) -> None:
    # In the writing transaction: PostgreSQL delivers it at commit, in commit order,
    # and never for a transaction rolled back.
    logged = conn.execute(
        sa.select(t.change_log.c.instance_uuid)
        .where(t.change_log.c.revision == revision)
        .distinct()
        .limit(_NOTIFY_UUIDS_MAX + 2)
    ).scalars()
    # Read one past the limit: a list cut there does not fit and says "ask" instead.
    payload = notice_payload(revision, revision - 1, logged, networks=networks)
    conn.execute(sa.select(sa.func.pg_notify(channel, payload)))


def _pg_params(engine: Engine) -> dict[str, Any]:
    """psycopg's connection parameters for ``engine``'s URL, with the defaults of
    :data:`PG_CONNECT_DEFAULTS` it leaves unset: what the engine's own connections use."""
    _, params = engine.dialect.create_connect_args(engine.url)
    return {**pg_connect_defaults(engine.url), **params}


class PgAsyncReader:
    """A :class:`~meta169.registry.base.AsyncReader`: callers resolved over a psycopg
    asynchronous connection of its own, on the running loop.

    serve's first requests then wait for PostgreSQL's round trip only. Through the
    registry thread each also waited for that thread to be scheduled and to take the
    interpreter lock from a loop the load keeps busy, and again for the loop: on a
    busy core that was most of a first request's p99 (docs/benchmarks.md, "scale").
    The statements are the thread's (:class:`_ResolveStatements`), which psycopg
    prepares on this connection after a few runs.

    One read at a time on its connection: a read made while another runs waits for
    it (a lock of its own, taken before the connection is checked, since a reply
    arriving for the other read would make its socket look ended).
    """

    def __init__(self, engine: Engine, statements: _ResolveStatements, *, timeout: float) -> None:
        self._params = _pg_params(engine)
        self._where = _safe_url(engine.url)
        self._statements = statements
        self._timeout = timeout
        self._conn: Any = None
        self._lock: asyncio.Lock | None = None

    async def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        """As :meth:`SqlRegistry.resolve_many`. A connection that turns out lost (a
        server restart ended it while idle) is replaced and the read made again once,
        as the engine's pool does on checkout; a read not answered within the
        timeout drops the connection and raises RegistryUnavailable."""
        import psycopg

        batches = _resolve_batches(callers)
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with self._lock:
                reused = self._conn is not None
                try:
                    found = await self._read(batches)
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    if not reused:
                        raise
                    found = await self._read(batches)
        except TimeoutError as exc:
            raise RegistryUnavailable(
                f"cannot resolve {len(callers)} callers: {self._where} did not answer within {self._timeout:g} s"
            ) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise RegistryUnavailable(
                f"cannot resolve {len(callers)} callers: {exc.__class__.__name__}: {exc}"
            ) from exc
        except psycopg.Error as exc:
            raise RegistryError(f"cannot resolve {len(callers)} callers: {exc.__class__.__name__}: {exc}") from exc
        return _resolutions(callers, found)

    async def _read(self, batches: Sequence[_ResolveBatch]) -> dict[_HitKey, dict[str, Instance]]:
        import psycopg

        found: dict[_HitKey, dict[str, Instance]] = {}
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                # Several statements read one snapshot, as the thread's REPEATABLE READ
                # transaction does; one needs no transaction at all.
                async with contextlib.nullcontext() if len(batches) <= 1 else conn.transaction():
                    for (network_id, router_id), ips in batches:
                        statement, params = self._statements.bound(network_id, router_id, ips)
                        cursor = await conn.execute(statement.sql, params)
                        for ip, owners in _owners_by_ip(await cursor.fetchall()).items():
                            found[(network_id, router_id, ip)] = owners
        except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, asyncio.CancelledError):
            # Lost, or left in the middle of a statement: not to be used again.
            self.close()
            raise
        return found

    async def _connection(self) -> Any:
        import psycopg

        conn = self._conn
        if conn is not None and not conn.closed and not _readable(conn, psycopg.Error):
            return conn
        # None yet, or the server ended it (a FATAL message and end of stream make an
        # idle socket readable; see _pg_checkout).
        self.close()
        conn = await psycopg.AsyncConnection.connect(**self._params, autocommit=True)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        self._conn = conn
        return conn

    def close(self) -> None:
        """Close the connection (any time, also twice; the next read opens another)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            # What AsyncConnection.close does, without a loop: SiteCache closes
            # synchronously. pgconn is psycopg's documented libpq connection.
            conn.pgconn.finish()


class PgChangeFeed:
    """A :class:`~meta169.registry.base.ChangeFeed`: LISTEN on the registry's channel
    over a connection of its own (psycopg's asynchronous one, on the running loop)."""

    def __init__(self, engine: Engine) -> None:
        self._params = _pg_params(engine)
        self._where = _safe_url(engine.url)
        self._conn: Any = None

    async def connect(self) -> None:
        import psycopg
        from psycopg import sql

        await self.close()
        try:
            conn = await psycopg.AsyncConnection.connect(**self._params, autocommit=True)
        except psycopg.Error as exc:
            raise RegistryUnavailable(f"cannot listen on {self._where}: {exc.__class__.__name__}: {exc}") from exc
        try:
            cursor = await conn.execute("SELECT current_schema()")
            row = await cursor.fetchone()
            channel = channel_name(str(row[0]) if row else "public")
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            await conn.close()
            raise RegistryUnavailable(f"cannot listen on {self._where}: {exc.__class__.__name__}: {exc}") from exc
        self._conn = conn

    async def notices(self) -> AsyncIterator[Notice]:
        import psycopg

        conn = self._conn
        if conn is None:
            raise RegistryUnavailable(f"not listening on {self._where}")
        try:
            async for notify in conn.notifies():
                yield parse_notice(notify.payload)
        except psycopg.Error as exc:
            raise RegistryUnavailable(f"lost the listening connection to {self._where}: {exc}") from exc
        raise RegistryUnavailable(f"the listening connection to {self._where} closed")

    async def close(self) -> None:
        import psycopg

        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
