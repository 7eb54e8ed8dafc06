"""The SQL schema: migrations that build it and the Core tables that query it.

Migrations are plain SQL files, ``migrations/NNN_name.sql``, applied in order and
recorded in ``schema_version``. The SQL is written once for SQLite and PostgreSQL
(see the first migration's header). The :data:`metadata` tables below mirror what
the migrations build; a test compares them with the reflected database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from meta169.errors import SchemaError

_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Any constant works; it keeps two processes from migrating one PostgreSQL at once.
_PG_MIGRATION_LOCK = 0x6D657461  # "meta"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: its version, name and the statements it runs."""

    version: int
    name: str
    statements: tuple[str, ...]


def split_statements(sql: str) -> tuple[str, ...]:
    """Split a migration file into statements: each ends with ';' at a line's end."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        current.append(line.rstrip())
        if stripped.endswith(";"):
            statements.append("\n".join(current).rstrip().removesuffix(";").rstrip())
            current = []
    if current:
        raise SchemaError(f"migration ends inside a statement: {' '.join(current)[:80]!r}")
    return tuple(statements)


def load_migrations() -> tuple[Migration, ...]:
    """The migrations shipped with this version, in order, numbered 1..n."""
    folder = resources.files("meta169.registry").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match[1]), match[2], split_statements(entry.read_text(encoding="utf-8"))))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations are not numbered 1..n: {[m.version for m in found]}")
    return tuple(found)


_SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


def migrate(engine: Engine | Connection, migrations: Sequence[Migration] | None = None) -> int:
    """Apply pending migrations in one transaction; return the schema version.

    Raises SchemaError when the database holds a version this code does not know
    (it was written by a newer meta169) or a step fails.
    """
    steps = tuple(load_migrations() if migrations is None else migrations)
    known = {m.version: m for m in steps}
    latest = max(known, default=0)
    if isinstance(engine, Connection):
        _migrate_in(engine, steps, known, latest)
    else:
        with engine.begin() as conn:
            _migrate_in(conn, steps, known, latest)
    return latest


def _migrate_in(conn: Connection, steps: Sequence[Migration], known: dict[int, Migration], latest: int) -> None:
    if conn.dialect.name == "postgresql":
        # Transaction-scoped: released at commit or rollback.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    conn.exec_driver_sql(_SCHEMA_VERSION_DDL)
    applied = {
        int(row.version): str(row.name)
        for row in conn.execute(sa.select(schema_version.c.version, schema_version.c.name))
    }
    unknown = sorted(v for v in applied if v not in known)
    if unknown:
        raise SchemaError(
            f"database schema version {max(unknown)} is newer than this meta169 knows "
            f"(up to {latest}); upgrade meta169 before using this database"
        )
    for version, name in applied.items():
        if known[version].name != name:
            raise SchemaError(
                f"database schema step {version} is {name!r}, this meta169 expects "
                f"{known[version].name!r}: the database was not built by meta169"
            )
    for step in steps:
        if step.version in applied:
            continue
        try:
            for statement in step.statements:
                conn.exec_driver_sql(statement)
        except sa.exc.SQLAlchemyError as exc:
            raise SchemaError(
                f"migration {step.version:03d}_{step.name} failed: {exc.__class__.__name__}: "
                f"{getattr(exc, 'orig', exc)}"
            ) from exc
        conn.execute(
            schema_version.insert().values(
                version=step.version,
                name=step.name,
                applied_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
        )


metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("applied_at", sa.Text, nullable=False),
)

registry_revision = sa.Table(
    "registry_revision",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

change_log = sa.Table(
    "change_log",
    metadata,
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("instance_uuid", sa.String(36)),
)

networks = sa.Table(
    "networks",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("project_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("mtu", sa.Integer, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
)

subnets = sa.Table(
    "subnets",
    metadata,
    sa.Column("network_id", sa.String(128), sa.ForeignKey("networks.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("cidr", sa.Text, nullable=False),
    sa.Column("gateway", sa.Text),
    sa.Column("dhcp", sa.Boolean, nullable=False),
    sa.Column("dns", sa.Text, nullable=False),
    sa.Column("host_routes", sa.Text, nullable=False),
    sa.Column("ipv6_mode", sa.Text),
)

routers = sa.Table(
    "routers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("project_id", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
)

router_networks = sa.Table(
    "router_networks",
    metadata,
    sa.Column("router_id", sa.String(128), sa.ForeignKey("routers.id"), primary_key=True),
    sa.Column("network_id", sa.String(128), sa.ForeignKey("networks.id"), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("uuid", sa.String(36), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("project_id", sa.Text, nullable=False),
    sa.Column("availability_zone", sa.Text, nullable=False),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("instance_type", sa.Text, nullable=False),
    sa.Column("image_id", sa.Text, nullable=False),
    sa.Column("launch_index", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("metadata_json", sa.Text, nullable=False),
    sa.Column("keys_json", sa.Text, nullable=False),
    sa.Column("user_data", sa.LargeBinary),
    sa.Column("vendor_data_json", sa.Text),
    sa.Column("tags_json", sa.Text, nullable=False),
    sa.Column("security_groups_json", sa.Text, nullable=False),
    sa.Column("metadata_options_json", sa.Text),
    sa.Column("architecture", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
)

ports = sa.Table(
    "ports",
    metadata,
    sa.Column("instance_uuid", sa.String(36), sa.ForeignKey("instances.uuid"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("id", sa.String(128), nullable=False),
    sa.Column("network_id", sa.String(128), sa.ForeignKey("networks.id"), nullable=False),
    sa.Column("mac", sa.String(17), nullable=False),
    sa.Column("device_number", sa.Integer, nullable=False),
)

port_ips = sa.Table(
    "port_ips",
    metadata,
    sa.Column("instance_uuid", sa.String(36), primary_key=True),
    sa.Column("port_seq", sa.Integer, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("network_id", sa.String(128), sa.ForeignKey("networks.id"), nullable=False),
    sa.Column("ip", sa.String(45), nullable=False),
)

passwords = sa.Table(
    "passwords",
    metadata,
    sa.Column("instance_uuid", sa.String(36), sa.ForeignKey("instances.uuid"), primary_key=True),
    sa.Column("password", sa.Text, nullable=False),
)
