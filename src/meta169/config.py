"""The process configuration, built once at the edge (flags, env, files) and passed down.

Nothing below the CLI reads environment variables or global state; each role gets
the frozen object it needs. Parsing helpers here turn strings from flags into typed
values and raise :class:`ConfigError` with a message naming the flag.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meta169.api.http import Limits
from meta169.api.identity import Binding
from meta169.api.ratelimit import RateLimit
from meta169.api.tokens import KeyRing
from meta169.api.vendordata import DynamicTarget
from meta169.errors import ConfigError
from meta169.model import MetadataOptions

DEFAULT_PORT = 8775  # Nova's metadata API port (nova.conf metadata_listen_port).


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


@dataclass(frozen=True, slots=True)
class ServeConfig:
    registry_url: str
    listeners: tuple[ListenerSpec, ...]
    limits: Limits = field(default_factory=Limits)
    static_vendor_data: dict[str, Any] = field(default_factory=dict)
    account_id: str = "000000000000"
    # How often serve asks the registry whether anything changed; an import in
    # another process shows within this interval (plus one query).
    poll_interval: float = 0.5
    # Shared with meta169 proxy for TCP proxy listeners (per-request HMAC). Never
    # printed: repr=False keeps it out of logs and tracebacks.
    proxy_secret: bytes | None = field(default=None, repr=False)
    # IMDSv2 token keys; None: one random key made before workers fork.
    token_keys: KeyRing | None = field(default=None, repr=False)
    default_metadata_options: MetadataOptions = field(default_factory=MetadataOptions)
    # Per-instance request rate; None disables it (benchmarks only).
    rate_limit: RateLimit | None = field(default_factory=RateLimit)
    # Shared with a stock Neutron metadata agent (metadata_proxy_shared_secret).
    neutron_secret: bytes | None = field(default=None, repr=False)
    # identity-key.pem (mode 0600) and identity-cert.pem; None: identity documents
    # are served unsigned (meta169.identity).
    identity_key_dir: Path | None = None
    # vendor_data2.json's dynamic parts (Nova's vendordata_dynamic_targets).
    vendordata_targets: tuple[DynamicTarget, ...] = ()
    vendordata_timeout: float = 2.0


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


def read_secret_file(path: Path, *, what: str) -> bytes:
    """Read a secret from a file that only its owner can read.

    Secrets never come from argv (visible in ``ps``) or the environment (visible in
    /proc/PID/environ to the same user and often logged by supervisors).
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what}: {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{what}: {path} is owned by uid {st.st_uid}, not by this user or root")
    secret = data.strip()
    if len(secret) < 16:
        raise ConfigError(f"{what}: {path} holds {len(secret)} bytes; use at least 16 random bytes")
    return secret
