"""The one exception tree of meta169.

Every error raised on purpose by meta169 derives from :class:`Meta169Error`.
Foreign exceptions (sqlite3, psycopg, OSError from subprocesses, yaml) are
translated at the module boundary that met them, with ``raise ... from exc``.

::

    Meta169Error
    ├── ConfigError                 bad configuration, flags or secret files
    ├── ValidationError             a domain object or inventory entry is invalid
    │   └── InventoryError          ...with the file, entry and field that broke
    ├── RegistryError               the registry backend failed
    │   ├── NotFound                no such object
    │   │   └── UnknownCaller       no instance has this IP on this network
    │   ├── AmbiguousCaller         several instances claim this IP (a data bug)
    │   ├── Conflict                a write would contradict existing state
    │   ├── RegistryUnavailable     the database cannot be reached (refused, lost, timed out)
    │   └── SchemaError             the database schema is newer or broken
    ├── HTTPError                   carries ``status``; the server maps it to a reply
    ├── PlumbingError               a namespace, rule or daemon operation failed
    │   └── CommandFailed           a subprocess exited non-zero (argv, stderr)
    ├── ProxyError                  the proxy could not reach or trust upstream
    ├── ClientError                 the metadata client got no usable answer (``reason``, ``status``)
    ├── SourceError                 a source (libvirt, OpenStack) cannot be reached or read (``source``)
    └── LabError                    building or tearing down the lab failed
"""

from __future__ import annotations

from collections.abc import Sequence


class Meta169Error(Exception):
    """Base of every error meta169 raises on purpose."""


class ConfigError(Meta169Error):
    """Configuration, flags or a secret file are unusable."""


class ValidationError(Meta169Error, ValueError):
    """A domain object was constructed with invalid data."""


class InventoryError(ValidationError):
    """An inventory file failed validation; says where."""

    def __init__(self, message: str, *, source: str = "", entry: str = "", field: str = "") -> None:
        self.source = source
        self.entry = entry
        self.field = field
        where = ", ".join(
            part for part in (source, f"entry {entry}" if entry else "", f"field {field}" if field else "") if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class RegistryError(Meta169Error):
    """The registry backend failed."""


class NotFound(RegistryError, LookupError):
    """The requested object does not exist."""


class UnknownCaller(NotFound):
    """No instance owns ``ip`` on the network(s) the request arrived from."""

    def __init__(self, scope: str, ip: str) -> None:
        self.scope = scope
        self.ip = ip
        super().__init__(f"no instance with IP {ip} on {scope}")


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached: connection refused, lost or timed out.

    Unlike other registry errors it says nothing about the data: the same call can
    succeed once the database is back, so serve answers from its cache meanwhile.
    """


class AmbiguousCaller(RegistryError):
    """Several instances own ``ip`` within one scope: refuse rather than guess."""

    def __init__(self, scope: str, ip: str, uuids: Sequence[str]) -> None:
        self.scope = scope
        self.ip = ip
        self.uuids = tuple(uuids)
        super().__init__(f"IP {ip} on {scope} belongs to several instances: {', '.join(self.uuids)}")


class Conflict(RegistryError):
    """The write contradicts existing state (for example a password already set)."""


class SchemaError(RegistryError):
    """The database schema cannot be used by this version."""


class HTTPError(Meta169Error):
    """An error with an HTTP status; the server renders it as the reply."""

    status: int = 500

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        super().__init__(message or str(status))


class PlumbingError(Meta169Error):
    """A namespace, rule, address or daemon operation failed."""


class CommandFailed(PlumbingError):
    """A subprocess exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {stderr.strip()}")


class ProxyError(Meta169Error):
    """The proxy could not reach, or could not authenticate to, the server."""


class LabError(Meta169Error):
    """Building, using or tearing down the lab failed."""


class SourceError(Meta169Error):
    """A source of instances (libvirt, OpenStack) cannot be reached or read.

    Invalid data a source holds (a domain's metadata, a server's field) is an
    InventoryError naming the source, the object and the field instead.
    """

    def __init__(self, message: str, *, source: str) -> None:
        self.source = source
        super().__init__(f"{source}: {message}")


class ClientError(Meta169Error):
    """The metadata client (``meta169 query``, the doctor's probes) got no usable answer.

    ``reason`` says what failed: ``refused`` (RST), ``timeout`` (no answer to the
    connect), ``unreachable`` (ICMP or ARP failure: EHOSTUNREACH/ENETUNREACH),
    ``connect`` (another connect error), ``read-timeout``, ``protocol`` (not HTTP,
    cut short, too large) or ``status`` (an HTTP reply with an error ``status``).
    """

    def __init__(self, message: str, *, reason: str, url: str = "", status: int | None = None) -> None:
        self.reason = reason
        self.url = url
        self.status = status
        super().__init__(f"{url}: {message}" if url else message)
