"""What only the SQL backends have: migrations, the schema, processes, driver errors."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from meta169.errors import ConfigError, RegistryError, SchemaError
from meta169.model import Caller, Instance, Network, Port
from meta169.registry import open_registry, sqlalchemy_url, sqlite_path
from meta169.registry import schema as t
from meta169.registry.schema import Migration, load_migrations, migrate
from meta169.registry.sql import SqlRegistry, create_engine

UUID_A = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"


def _versions(url: str) -> list[tuple[int, str]]:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.schema_version.c.version, t.schema_version.c.name).order_by(t.schema_version.c.version)
            )
            return [(int(v), str(n)) for v, n in rows]
    finally:
        engine.dispose()


def _reopen(url: str) -> SqlRegistry:
    registry = open_registry(url, create=True)
    assert isinstance(registry, SqlRegistry)
    return registry


def test_registry_migrations_are_applied_once(sql_url: str) -> None:
    shipped = load_migrations()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    _reopen(sql_url).close()
    registry = _reopen(sql_url)
    registry.put_network(Network("net-a"))
    registry.close()
    _reopen(sql_url).close()
    assert _versions(sql_url) == [(m.version, m.name) for m in shipped]
    registry = _reopen(sql_url)
    try:
        assert registry.get_network("net-a") == Network("net-a")
    finally:
        registry.close()


def test_registry_pending_migration_is_applied_on_open(sql_url: str) -> None:
    _reopen(sql_url).close()
    shipped = load_migrations()
    extra = Migration(len(shipped) + 1, "extra_table", ("CREATE TABLE extra (x INTEGER)",))
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        assert migrate(engine, [*shipped, extra]) == extra.version
        assert migrate(engine, [*shipped, extra]) == extra.version
        assert "extra" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert _versions(sql_url)[-1] == (extra.version, "extra_table")
    # This code does not know step len+1: the database is newer than it.
    with pytest.raises(SchemaError, match=f"version {extra.version} is newer"):
        open_registry(sql_url)


def test_registry_refuses_a_newer_schema_version(sql_url: str) -> None:
    _reopen(sql_url).close()
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        with engine.begin() as conn:
            conn.execute(t.schema_version.insert().values(version=999, name="future", applied_at="x"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match="999 is newer"):
        open_registry(sql_url)


def test_registry_refuses_a_schema_step_it_did_not_write(sql_url: str) -> None:
    _reopen(sql_url).close()
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        with engine.begin() as conn:
            conn.execute(t.schema_version.update().values(name="someone_else"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaError, match="not built by meta169"):
        open_registry(sql_url)


def test_registry_failed_migration_is_a_schema_error_and_rolls_back(sql_url: str) -> None:
    broken = Migration(1, "broken", ("CREATE TABLE ok_table (x INTEGER)", "CREATE TABLE ("))
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        with pytest.raises(SchemaError, match="001_broken"):
            migrate(engine, [broken])
        assert "ok_table" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_registry_tables_match_what_migrations_build(sql_url: str) -> None:
    _reopen(sql_url).close()
    engine = create_engine(sqlalchemy_url(sql_url))
    try:
        inspector = sa.inspect(engine)
        assert set(inspector.get_table_names()) == set(t.metadata.tables)
        for name, table in t.metadata.tables.items():
            columns = {c["name"]: c for c in inspector.get_columns(name)}
            assert list(columns) == [c.name for c in table.columns], name
            for column in table.columns:
                if column.primary_key:
                    continue  # SQLite reports INTEGER PRIMARY KEY as nullable
                assert columns[column.name]["nullable"] == column.nullable, (name, column.name)
            assert set(inspector.get_pk_constraint(name)["constrained_columns"]) == {
                c.name for c in table.primary_key
            }, name
        lookup = [i for i in inspector.get_indexes("port_ips") if i["name"] == "port_ips_lookup"]
        assert [i["column_names"] for i in lookup] == [["network_id", "ip"]]
    finally:
        engine.dispose()


def test_registry_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    registry = _reopen(f"sqlite://{tmp_path / 'r.db'}")
    try:
        with registry.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    finally:
        registry.close()


def test_registry_open_creates_parent_directories_only_when_asked(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'a' / 'b' / 'registry.db'}"
    with pytest.raises(ConfigError, match="does not exist"):
        open_registry(url, create=True)
    assert not (tmp_path / "a").exists()
    open_registry(url, create=True, create_directory=True).close()
    assert sqlite_path(url).is_file()


def test_registry_sqlite_write_from_another_process_is_seen(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    server = _reopen(url)
    try:
        server.put_network(
            Network("net-a"),
        )
        rev = server.revision()
        # A separate interpreter, as `meta169 import` would be, while this handle
        # stays open and has just read.
        script = textwrap.dedent(
            f"""
            import ipaddress
            from meta169.model import Instance, Port
            from meta169.registry import open_registry
            registry = open_registry({url!r})
            registry.put_instance(Instance({UUID_A!r}, "web", ports=(
                Port("net-a", "fa:16:3e:00:00:05", (ipaddress.ip_address("10.0.0.5"),)),)))
            registry.close()
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        assert server.revision() == rev + 1
        caller = Caller(ipaddress.ip_address("10.0.0.5"), network_id="net-a")
        assert server.resolve(caller).uuid == UUID_A
        assert server.changed_since(rev).instances == frozenset({UUID_A})
    finally:
        server.close()


def test_registry_sqlite_reader_holding_a_snapshot_does_not_block_a_writer(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    reader = _reopen(url)
    writer = _reopen(url)
    try:
        with reader.engine.begin() as conn:
            # An open read transaction: WAL lets the writer commit meanwhile.
            conn.execute(sa.select(t.registry_revision.c.revision)).scalar_one()
            writer.put_network(Network("net-a"))
            writer.put_instance(
                Instance(
                    UUID_A,
                    "web",
                    ports=(Port("net-a", "fa:16:3e:00:00:05", (ipaddress.ip_address("10.0.0.5"),)),),
                )
            )
        assert reader.revision() == 2
    finally:
        reader.close()
        writer.close()


def test_registry_file_that_is_not_a_database_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a SQLite database, just text" * 100)
    with pytest.raises(RegistryError, match=r"junk\.db"):
        open_registry(f"sqlite://{path}")


def test_registry_unreachable_postgres_is_a_registry_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # Bound but not listening: connecting is refused at once.
        with pytest.raises(RegistryError, match="cannot open registry") as info:
            open_registry(f"postgresql://meta169:s3cret@127.0.0.1:{port}/nothing?connect_timeout=5")
    assert "s3cret" not in str(info.value)
    assert not isinstance(info.value, SchemaError)


def test_registry_driver_errors_become_registry_errors(sql_url: str) -> None:
    registry = _reopen(sql_url)
    try:
        with registry.engine.begin() as conn:
            conn.execute(t.registry_revision.delete())
        with pytest.raises(RegistryError) as info:
            registry.put_network(Network("net-a"))
        assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError)
    finally:
        registry.close()
