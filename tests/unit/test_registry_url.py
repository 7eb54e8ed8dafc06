"""Registry URLs: which backend, which file, and the errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from meta169.errors import ConfigError
from meta169.registry import (
    Registry,
    default_registry_url,
    open_registry,
    sqlalchemy_url,
    sqlite_path,
)
from meta169.registry.memory import MemoryRegistry
from meta169.registry.sql import SqlRegistry, create_engine


def test_registry_url_memory_opens_a_memory_registry() -> None:
    registry = open_registry("memory://")
    assert isinstance(registry, MemoryRegistry)
    assert isinstance(registry, Registry)
    assert registry.revision() == 0


def test_registry_url_sql_registry_satisfies_the_protocol() -> None:
    # The constructor does no IO: no connection is made until first use.
    engine = create_engine(sa.URL.create("sqlite", database="/nonexistent/dir/never-opened.db"))
    assert isinstance(SqlRegistry(engine), Registry)
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/meta169/registry.db", "/var/lib/meta169/registry.db"),
        ("sqlite:////var/lib/meta169/registry.db", "/var/lib/meta169/registry.db"),
        ("SQLITE:///tmp/x.db", "/tmp/x.db"),
    ],
)
def test_registry_url_sqlite_paths_are_absolute(url: str, path: str) -> None:
    assert sqlite_path(url) == Path(path)
    assert sqlalchemy_url(url) == sa.URL.create("sqlite", database=path)


@pytest.mark.parametrize(
    "url",
    ["postgresql://meta:pw@db.example:5433/meta169", "postgresql+psycopg://meta:pw@db.example:5433/meta169"],
)
def test_registry_url_postgresql_uses_psycopg(url: str) -> None:
    parsed = sqlalchemy_url(url)
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.host, parsed.port, parsed.database, parsed.username) == (
        "db.example",
        5433,
        "meta169",
        "meta",
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "without a scheme"),
        ("registry.db", "without a scheme"),
        ("mysql://u@h/db", "scheme 'mysql'"),
        ("postgresql+asyncpg://u@h/db", r"scheme 'postgresql\+asyncpg'"),
        ("memory://x", "memory:// takes no path"),
        ("sqlite://relative.db", "absolute path"),
        ("sqlite:registry.db", "not a sqlite:/// URL"),
        ("sqlite:///", "directory"),
        ("sqlite:///var/lib/meta169/", "directory"),
        ("sqlite:///tmp/x.db?mode=ro", "no options"),
        ("postgresql://u:pw@host", "names no database"),
    ],
)
def test_registry_url_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_registry(url)


def test_registry_url_errors_never_show_the_password() -> None:
    for url in ("postgresql://u:hunter2@host", "mysql://u:hunter2@host/db"):
        with pytest.raises(ConfigError) as info:
            open_registry(url)
        assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("euid", "xdg", "expected"),
    [
        (0, None, "/var/lib/meta169/registry.db"),
        (0, "/home/ops/.data", "/var/lib/meta169/registry.db"),
        (1000, None, "/home/ops/.local/share/meta169/registry.db"),
        (1000, "", "/home/ops/.local/share/meta169/registry.db"),
        (1000, "/srv/data", "/srv/data/meta169/registry.db"),
        # The XDG Base Directory spec: a relative value is invalid and ignored.
        (1000, "relative/data", "/home/ops/.local/share/meta169/registry.db"),
    ],
)
def test_registry_url_default_follows_user_and_xdg(euid: int, xdg: str | None, expected: str) -> None:
    url = default_registry_url(euid=euid, home="/home/ops", xdg_data_home=xdg)
    assert url == f"sqlite://{expected}"
    assert sqlite_path(url) == Path(expected)
