"""Where instances live. Backends: in-memory, SQLite (default), PostgreSQL.

Owns storage, schema migrations and caller resolution. Knows nothing of HTTP or
rendering. ``open_registry(url)`` picks the backend from a URL:

- ``memory://``: process memory (tests, demos);
- ``sqlite:///abs/path.db`` (``sqlite:////abs/path.db`` too): a SQLite file, parent
  directories created; relative paths are refused, a daemon's working directory is
  no place for its database;
- ``postgresql://user:password@host:port/db`` or ``postgresql+psycopg://...``:
  PostgreSQL through psycopg 3.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from meta169.errors import ConfigError
from meta169.registry._common import DEFAULT_CHANGE_LOG_SIZE
from meta169.registry.base import Changes, Registry

__all__ = [
    "Changes",
    "Registry",
    "default_registry_url",
    "open_registry",
    "sqlalchemy_url",
    "sqlite_path",
]

_URL_HELP = "use memory://, sqlite:///absolute/path.db or postgresql://user@host/dbname"


def open_registry(url: str, *, change_log_size: int = DEFAULT_CHANGE_LOG_SIZE) -> Registry:
    """Open the registry ``url`` names, applying pending schema migrations.

    Raises ConfigError for a URL it cannot use, SchemaError for a database written
    by a newer meta169, RegistryError when the database cannot be reached.
    """
    if _scheme(url) == "memory":
        if url.lower() not in ("memory://", "memory:"):
            raise ConfigError(f"registry URL {url!r}: memory:// takes no path or options")
        from meta169.registry.memory import MemoryRegistry

        return MemoryRegistry(change_log_size=change_log_size)

    from meta169.registry.sql import SqlRegistry

    engine_url = sqlalchemy_url(url)
    if engine_url.get_backend_name() == "sqlite" and engine_url.database:
        parent = Path(engine_url.database).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"registry {url}: cannot create {parent}: {exc.strerror}") from exc
    return SqlRegistry.open(engine_url, change_log_size=change_log_size)


def sqlalchemy_url(url: str) -> sa.URL:
    """The SQLAlchemy URL for a ``sqlite:`` or ``postgresql:`` registry URL.

    Registry URLs spell SQLite paths as absolute paths (``sqlite:///var/lib/x.db``
    is /var/lib/x.db), where SQLAlchemy would read three slashes as a relative path.
    """
    scheme = _scheme(url)
    if scheme == "sqlite":
        return sa.URL.create("sqlite", database=str(sqlite_path(url)))
    if scheme in ("postgresql", "postgresql+psycopg"):
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigError(f"registry URL for PostgreSQL is malformed ({_URL_HELP})") from exc
        if not parsed.database:
            raise ConfigError(f"registry URL {parsed.render_as_string(hide_password=True)} names no database")
        return parsed.set(drivername="postgresql+psycopg")
    # Never echo the whole URL: it may carry a password.
    shown = f"URL scheme {scheme!r}" if scheme else "URL without a scheme"
    raise ConfigError(f"unsupported registry {shown}: {_URL_HELP}")


def _scheme(url: str) -> str:
    return url.partition(":")[0].lower() if ":" in url else ""


def sqlite_path(url: str) -> Path:
    """The absolute file path in a ``sqlite:`` registry URL; ConfigError otherwise."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "sqlite" or not sep:
        raise ConfigError(f"registry URL {url!r} is not a sqlite:/// URL")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"registry URL {url!r}: sqlite URLs take no options")
    if not rest.startswith("/"):
        raise ConfigError(f"registry URL {url!r}: give an absolute path, sqlite:///var/lib/meta169/registry.db")
    # sqlite:///p and SQLAlchemy's sqlite:////p both mean the absolute path /p.
    path = Path("/" + rest.lstrip("/"))
    if path == Path("/") or rest.endswith("/"):
        raise ConfigError(f"registry URL {url!r} names a directory, not a database file")
    return path


def default_registry_url(*, euid: int, home: Path | str, xdg_data_home: str | None = None) -> str:
    """The SQLite registry used when none is configured.

    root: /var/lib/meta169/registry.db; anyone else: $XDG_DATA_HOME/meta169/registry.db,
    with XDG_DATA_HOME defaulting to ~/.local/share (XDG Base Directory spec, which
    also says to ignore a relative value). The caller reads the environment.
    """
    if euid == 0:
        base = Path("/var/lib")
    elif xdg_data_home and Path(xdg_data_home).is_absolute():
        base = Path(xdg_data_home)
    else:
        base = Path(home) / ".local" / "share"
    return f"sqlite://{base / 'meta169' / 'registry.db'}"
