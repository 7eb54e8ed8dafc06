"""PostgreSQL credentials never in argv, against a real server that asks for a password.

The fixture's server trusts every local connection; here one role gets a password and
a pg_hba.conf line of its own (scram-sha-256), so a connection that does not bring the
right password fails. Then the same ``meta169 instance list`` succeeds with the
password from ``[registry] password-file``, from libpq's PGPASSFILE, and through a
libpq service file (``postgresql:///?service=NAME``, PGSERVICEFILE).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest_postgres import PostgresServer
from tests.integration.serving import meta169_argv

pytestmark = pytest.mark.postgres

ROLE = "meta169_pw"
PASSWORD = "s3cret-for-the-meta169-tests"
DATABASE = "meta169_tests"
HBA_LINE = f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n"


@dataclass(frozen=True)
class PasswordServer:
    server: PostgresServer
    schema: str

    @property
    def url(self) -> str:
        """A URL without a password."""
        s = self.server
        return f"postgresql://{ROLE}@{s.host}:{s.port}/{DATABASE}?options=-csearch_path%3D{self.schema}"


def _admin(server: PostgresServer, *statements: str) -> None:
    import psycopg

    with psycopg.connect(server.conninfo(DATABASE), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def _refuses_without_password(server: PostgresServer) -> bool:
    import psycopg

    try:
        psycopg.connect(f"host={server.host} port={server.port} user={ROLE} dbname={DATABASE} password=wrong").close()
    except psycopg.OperationalError:
        return True
    return False


@pytest.fixture(scope="module")
def password_server(postgres_server: PostgresServer) -> Iterator[PasswordServer]:
    schema = f"config_pw_{os.getpid()}"
    _admin(
        postgres_server,
        f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'",
        f"CREATE SCHEMA {schema} AUTHORIZATION {ROLE}",
    )
    hba = postgres_server.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(HBA_LINE + original)  # first match wins: this role must bring its password
    _admin(postgres_server, "SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while not _refuses_without_password(postgres_server):
        assert time.monotonic() < deadline, "pg_hba.conf reload did not take effect"
        time.sleep(0.05)
    try:
        yield PasswordServer(postgres_server, schema)
    finally:
        hba.write_text(original)
        _admin(postgres_server, "SELECT pg_reload_conf()", f"DROP SCHEMA {schema} CASCADE", f"DROP ROLE {ROLE}")


def _meta169(
    tmp_path: Path, config: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "meta169.toml"
    path.write_text(config)
    path.chmod(0o600)
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("META169_", "PG")) or k == "META169_REQUIRE_E2E"
    }
    # Neither ~/.pgpass nor a service file of the machine's may help a test along.
    environ.update({"PGPASSFILE": str(tmp_path / "no-pgpass"), "PGSERVICEFILE": str(tmp_path / "no-service")})
    environ.update(env or {})
    argv = meta169_argv("--config", str(path), *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=environ)


def _secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _connects(tmp_path: Path, config: str, env: dict[str, str] | None = None) -> None:
    # Opening the registry logs in and migrates the schema: the password was accepted.
    result = _meta169(tmp_path, config, "instance", "list", env=env)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_config_postgres_without_the_password_is_refused(tmp_path: Path, password_server: PasswordServer) -> None:
    result = _meta169(tmp_path, f'[registry]\nurl = "{password_server.url}"\n', "instance", "list")
    assert result.returncode == 3
    assert "registry" in result.stderr


def test_config_postgres_password_file_joined_in_the_process(tmp_path: Path, password_server: PasswordServer) -> None:
    secret = _secret(tmp_path / "registry.password", PASSWORD + "\n")
    _connects(tmp_path, f'[registry]\nurl = "{password_server.url}"\npassword-file = "{secret}"\n')
    # The same from the flag, and never a word of the password in what is printed.
    result = _meta169(
        tmp_path,
        f'[registry]\nurl = "{password_server.url}"\n',
        "--registry-password-file",
        str(secret),
        "config",
        "show",
    )
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert f'password-file = "{secret}"  # flag' in result.stdout


def test_config_postgres_password_file_must_be_private(tmp_path: Path, password_server: PasswordServer) -> None:
    secret = _secret(tmp_path / "registry.password", PASSWORD)
    secret.chmod(0o644)
    result = _meta169(
        tmp_path, f'[registry]\nurl = "{password_server.url}"\npassword-file = "{secret}"\n', "instance", "list"
    )
    assert result.returncode == 2
    assert f"chmod 600 {secret}" in result.stderr


def test_config_postgres_pgpassfile_passes_through(tmp_path: Path, password_server: PasswordServer) -> None:
    s = password_server.server
    pgpass = _secret(tmp_path / "pgpass", f"{s.host}:{s.port}:{DATABASE}:{ROLE}:{PASSWORD}\n")
    _connects(tmp_path, f'[registry]\nurl = "{password_server.url}"\n', env={"PGPASSFILE": str(pgpass)})


@pytest.mark.parametrize("password_from", ["pgpass", "password-file"])
def test_config_postgres_service_file_passes_through(
    tmp_path: Path, password_server: PasswordServer, password_from: str
) -> None:
    s = password_server.server
    service = _secret(
        tmp_path / "pg_service.conf",
        f"[meta169]\nhost={s.host}\nport={s.port}\ndbname={DATABASE}\nuser={ROLE}\n"
        f"options=-csearch_path={password_server.schema}\n",
    )
    config = '[registry]\nurl = "postgresql:///?service=meta169"\n'
    env = {"PGSERVICEFILE": str(service)}
    if password_from == "pgpass":
        env["PGPASSFILE"] = str(_secret(tmp_path / "pgpass", f"*:*:*:{ROLE}:{PASSWORD}\n"))
    else:
        config += f'password-file = "{_secret(tmp_path / "registry.password", PASSWORD)}"\n'
    _connects(tmp_path, config, env=env)
