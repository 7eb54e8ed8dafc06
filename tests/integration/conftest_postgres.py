"""A real, throw-away PostgreSQL server for the tests: a pytest plugin module.

Register it from tests/conftest.py with ``pytest_plugins``. Fixtures:

- ``postgres_server`` (session): initdb + pg_ctl start in a private temp dir, on a
  free port of 127.0.0.1, Unix socket in the temp dir; always stopped with
  ``pg_ctl stop -m immediate`` on that data dir and the dir removed.
- ``postgres_url`` (function): a fresh, empty schema per test, first on the
  search path, dropped afterwards; yields a SQLAlchemy URL string
  (postgresql+psycopg://.../meta169_tests?options=-csearch_path%3D<schema>).
- ``sql_url`` (function, parametrized): a fresh registry URL for each SQL backend,
  a SQLite file and a PostgreSQL database (marked ``postgres``), for tests that
  must hold on both.

Missing server binaries skip the test, or fail it when META169_REQUIRE_E2E=1
(:func:`tests.capabilities.require`). PostgreSQL refuses to run as root, so as
root the server runs as the 'postgres' user (or 'nobody'); with neither, that is a
missing capability too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.capabilities import require
from tests.processes import free_port

_BINARIES = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "meta169"
_TEST_DATABASE = "meta169_tests"
_START_ATTEMPTS = 3
# Speed over durability: the data dir is deleted after the session anyway.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "16MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


@dataclass(frozen=True)
class PostgresServer:
    bindir: Path
    datadir: Path
    host: str
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{_SUPERUSER}@{self.host}:{self.port}/{database}"

    def conninfo(self, database: str) -> str:
        return f"host={self.host} port={self.port} user={_SUPERUSER} dbname={database}"


def find_postgres_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: newest packaged one, else PATH."""

    def version(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in path.parent.name.split("."))
        except ValueError:
            return (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        # pg_ctl looks for postgres next to its own resolved path.
        candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _BINARIES):
            return bindir
    return None


def _run_as() -> dict[str, Any]:
    """subprocess arguments that drop root; empty when not root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    require("PostgreSQL as root", False, "neither a 'postgres' nor a 'nobody' user exists to run the server as")


def _run(argv: list[str], cwd: Path, drop: dict[str, Any]) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False, **drop)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")


def _start(bindir: Path, root: Path, drop: dict[str, Any]) -> PostgresServer:
    datadir = root / "data"
    sockdir = root / "sock"
    sockdir.mkdir()
    if drop:
        for path in (root, sockdir):
            os.chown(path, drop["user"], drop["group"])
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            _SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ],
        root,
        drop,
    )
    conf = datadir / "postgresql.conf"
    base = conf.read_text()
    last_error = ""
    for _ in range(_START_ATTEMPTS):
        # The port is free now; another process could take it before postgres binds,
        # so a failed start retries with a new one.
        port = free_port()
        settings = {**_SETTINGS, "port": str(port), "unix_socket_directories": f"'{sockdir}'"}
        conf.write_text(base + "\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        try:
            _run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "30",
                    "-D",
                    str(datadir),
                    "-l",
                    str(root / "postgres.log"),
                ],
                root,
                drop,
            )
        except RuntimeError as exc:
            log = root / "postgres.log"
            last_error = f"{exc}\n{log.read_text() if log.exists() else ''}"
            continue
        return PostgresServer(bindir=bindir, datadir=datadir, host="127.0.0.1", port=port)
    raise RuntimeError(f"PostgreSQL did not start: {last_error}")


def _stop(bindir: Path, root: Path, drop: dict[str, Any]) -> None:
    datadir = root / "data"
    if (datadir / "postmaster.pid").exists():
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _run([str(bindir / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(datadir)], root, drop)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_postgres_bindir()
    if bindir is None:
        require("PostgreSQL", False, "server binaries (initdb, pg_ctl, postgres) not found")
    drop = _run_as()
    # Not under pytest's tmp dirs: those are 0700 root and the server user must
    # reach its socket and data dirs.
    root = Path(tempfile.mkdtemp(prefix="meta169-pg-"))
    try:
        server = _start(bindir, root, drop)
        import psycopg

        with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {_TEST_DATABASE}")
        yield server
    finally:
        _stop(bindir, root, drop)
        shutil.rmtree(root, ignore_errors=True)


_schema_counter = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    import psycopg
    from psycopg import sql

    # A schema per test, first on the search path: as isolated as a database for
    # the registry's unqualified tables, and ~1 ms instead of CREATE DATABASE's
    # ~250 ms (its checkpoint or WAL copy of the template).
    schema = f"test_{os.getpid()}_{next(_schema_counter)}"
    conninfo = postgres_server.conninfo(_TEST_DATABASE)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{postgres_server.url(_TEST_DATABASE)}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            # A leaked connection holding locks fails here instead of hanging.
            conn.execute("SET lock_timeout = '5s'")
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))


def end_other_sessions(url: str) -> int:
    """End every other session on the test database at once, as a PostgreSQL restart
    (or an operator's pg_terminate_backend) would; how many were ended."""
    import sqlalchemy as sa

    with sa.create_engine(url, poolclass=sa.NullPool).connect() as admin:
        return int(
            admin.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalar_one()
        )
