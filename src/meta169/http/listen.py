"""Where a server listens and whom a listener trusts: addresses, bindings, sockets.

Shared by serve, the proxy and the admin API. A :class:`Binding` names the trust
source of a listener:

- ``network``: the TCP peer address, scoped to one network (direct mode);
- ``router``: the TCP peer address, scoped to the router's networks;
- ``proxy``: a trusted ``meta169 proxy`` stamps the identity in headers; trust comes
  from the Unix socket's file permissions (or a per-request HMAC over TCP);
- ``neutron``: a stock Neutron metadata agent names the instance in ``X-Instance-ID``
  and proves it with ``X-Instance-ID-Signature``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meta169.errors import ConfigError, ValidationError
from meta169.model import check_id

DEFAULT_PORT = 8775  # Nova's metadata API port (nova.conf metadata_listen_port).

BindingKind = Literal["network", "router", "proxy", "neutron"]


@dataclass(frozen=True, slots=True)
class Binding:
    kind: BindingKind
    id: str = ""

    def __post_init__(self) -> None:
        if self.kind in ("network", "router"):
            check_id(self.kind, self.id)
        elif self.kind not in ("proxy", "neutron"):
            raise ValidationError(f"unknown listener binding {self.kind!r}")

    @property
    def scope(self) -> str:
        return f"{self.kind} {self.id}" if self.id else self.kind


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A TCP ``host:port`` or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix_path: Path | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    address: ListenAddress
    binding: Binding


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (127.0.0.1) or ``unix:/path``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError("--listen unix: needs a path")
        return ListenAddress(unix_path=Path(path))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT or unix:PATH")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen {text!r}: port out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return ListenAddress(host=host, port=port)


def metrics_listen_address(text: str | None) -> ListenAddress | None:
    """``--metrics-listen``: None (off) or a TCP address (Prometheus scrapes over TCP)."""
    if not text:
        return None
    address = parse_listen(text)
    if address.unix_path is not None:
        raise ConfigError("--metrics-listen: expected HOST:PORT (Prometheus scrapes over TCP)")
    return address


# Connections waiting to be accepted. Given again to create_server: uvloop listens
# anew with its own backlog (100 by default), which a burst of per-request
# connections (Neutron's haproxy, a proxy opening its pool) overflows into EAGAIN.
LISTEN_BACKLOG = 4096


def open_listen_socket(address: ListenAddress, *, reuse_port: bool = False) -> socket.socket:
    """Bind a listening socket (TCP or Unix); errors name the address."""
    if address.unix_path is not None:
        return _open_unix(address.unix_path)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _open_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        else:
            raise ConfigError(f"cannot listen on unix:{path}: a non-socket file is in the way")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o117)  # srw-rw----: trust comes from who may connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock
