"""Where instances live. Backends: in-memory, SQLite (default), PostgreSQL.

Owns storage, schema migrations and caller resolution. Knows nothing of HTTP or
rendering. ``open_registry(url)`` picks the backend from a URL:

- ``memory://``: process memory (tests, demos);
- ``sqlite:///abs/path.db`` (``sqlite:////abs/path.db`` too): a SQLite file;
  relative paths are refused, a daemon's working directory is no place for its
  database. Nothing is created unless asked: a URL with a typo must fail, not start
  an empty registry that answers every guest 404. A created file is mode 0600 and
  a created directory 0700 (the registry holds user data and instance passwords);
  an existing file or directory others can read or write is reported with the
  ``chmod`` that fixes it;
- ``postgresql://user@host:port/db`` or ``postgresql+psycopg://...``: PostgreSQL
  through psycopg 3; ``postgresql:///?service=NAME`` for a libpq service file.
  The password comes from a password file joined at the CLI edge, or from libpq's
  own ``~/.pgpass`` / ``PGPASSFILE``, never from argv.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from meta169.errors import ConfigError
from meta169.model import Instance
from meta169.registry._common import DEFAULT_CHANGE_LOG_SIZE
from meta169.registry.base import Batch, Changes, Registry

__all__ = [
    "Batch",
    "Changes",
    "Registry",
    "default_registry_url",
    "describe_registry_url",
    "iter_instances",
    "open_registry",
    "permission_warnings",
    "prepare_sqlite_file",
    "sqlalchemy_url",
    "sqlite_path",
]

_URL_HELP = "use memory://, sqlite:///absolute/path.db or postgresql://user@host/dbname"

log = logging.getLogger("meta169.registry")

# The registry holds user data, keys and instance passwords: owner only.
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def open_registry(
    url: str,
    *,
    create: bool = False,
    create_directory: bool = False,
    change_log_size: int = DEFAULT_CHANGE_LOG_SIZE,
) -> Registry:
    """Open the registry ``url`` names, applying pending schema migrations.

    A SQLite file must exist unless ``create`` (then it is made, mode 0600), and its
    directory must exist unless ``create_directory`` too (then it is made, mode
    0700); ``meta169 import`` creates the file, and the directory only when it is
    the default data directory. Raises ConfigError for a URL it cannot use or a
    file or directory that is missing, SchemaError for a database written by a
    newer meta169, RegistryError when the database cannot be reached.
    """
    if _scheme(url) == "memory":
        if url.lower() not in ("memory://", "memory:"):
            raise ConfigError(f"registry URL {url!r}: memory:// takes no path or options")
        from meta169.registry.memory import MemoryRegistry

        return MemoryRegistry(change_log_size=change_log_size)

    from meta169.registry.sql import SqlRegistry

    engine_url = sqlalchemy_url(url)
    if engine_url.get_backend_name() != "sqlite" or not engine_url.database:
        return SqlRegistry.open(engine_url, change_log_size=change_log_size)
    path = Path(engine_url.database)
    created = prepare_sqlite_file(path, create=create, create_directory=create_directory)
    try:
        return SqlRegistry.open(engine_url, change_log_size=change_log_size)
    except BaseException:
        if created:  # a half-made registry would pass for an empty one next time
            for leftover in (path, *(path.with_name(path.name + sfx) for sfx in ("-wal", "-shm", "-journal"))):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        raise


def iter_instances(registry: Registry, *, page: int = 1000, marker: str | None = None) -> Iterator[Instance]:
    """Every instance after ``marker`` in uuid order, read ``page`` at a time, so a
    walk of 100,000 instances never holds more than one page."""
    if page < 1:
        raise ValueError("page must be >= 1")
    while True:
        found = registry.list_instances(limit=page, marker=marker)
        yield from found
        if len(found) < page:
            return
        marker = found[-1].uuid


def prepare_sqlite_file(path: Path, *, create: bool, create_directory: bool) -> bool:
    """Check (or make) a SQLite registry's directory and file before SQLite opens it.

    SQLite itself would create a missing file with the process umask (0644 for
    most). Returns True when the file was created here. Logs a warning naming the
    ``chmod`` for a file group or others can read, or a directory they can write.
    """
    parent = path.parent
    if not parent.is_dir():
        if parent.exists():
            raise ConfigError(f"registry {path}: {parent} is not a directory")
        if not create_directory:
            raise ConfigError(
                f"registry {path}: directory {parent} does not exist; check the registry URL "
                f"(meta169 creates no directory but the default one, on import)"
            )
        try:
            parent.mkdir(mode=DIRECTORY_MODE, parents=True)
            os.chmod(parent, DIRECTORY_MODE)  # mkdir's mode is reduced by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"registry {path}: cannot create {parent}: {exc.strerror}") from exc
        log.info("created the registry directory %s (mode 0700)", parent)
    created = False
    if not path.exists():
        if not create:
            raise ConfigError(
                f"registry {path} does not exist; check the registry URL, or create it with 'meta169 import FILE'"
            )
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
            created = True
        except FileExistsError:  # another import made it meanwhile
            pass
        except OSError as exc:
            raise ConfigError(f"registry {path}: cannot create it: {exc.strerror}") from exc
    for warning in permission_warnings(path):
        # Once per process: the proxy opens the registry every second.
        if warning not in _SAID:
            _SAID.add(warning)
            log.warning("%s", warning)
    return created


_SAID: set[str] = set()


def permission_warnings(path: Path) -> list[str]:
    """What is too open about a registry file and its directory, each with the fix."""
    found: list[str] = []
    try:
        mode = path.stat().st_mode
    except OSError:
        return found
    if stat.S_ISREG(mode) and mode & 0o077:
        found.append(
            f"registry {path} is readable by group or others (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path}"
        )
    try:
        dir_mode = path.parent.stat().st_mode
    except OSError:
        return found
    # Others who can write the directory can replace the file (a sticky directory
    # such as /tmp protects the files of each owner).
    if dir_mode & 0o022 and not dir_mode & stat.S_ISVTX:
        found.append(
            f"registry directory {path.parent} is writable by group or others "
            f"(mode {stat.S_IMODE(dir_mode):04o}): run chmod 700 {path.parent}"
        )
    return found


def describe_registry_url(url: str) -> str:
    """The registry URL for messages: never with its password."""
    if _scheme(url) in ("postgresql", "postgresql+psycopg"):
        try:
            return sa.make_url(url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            return "a malformed PostgreSQL URL"
    return url


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
        # A libpq service (postgresql:///?service=NAME) names the database in the
        # service file (PGSERVICEFILE, ~/.pg_service.conf), which libpq reads itself.
        if not parsed.database and "service" not in parsed.query:
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
