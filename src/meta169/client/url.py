"""Where the metadata service is: ``http://HOST[:PORT][/BASE]``, IPv6 zones included.

Pure. ``http://[fe80::a9fe:a9fe%eth0]/`` names the IPv6 metadata address on one
link: a link-local address means nothing without its zone (RFC 4007 section 11),
and the zone is for the local socket only, never sent in the Host header
(RFC 6874 section 4: "the zone identifier ... MUST NOT be sent").
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from meta169.errors import ConfigError

DEFAULT_URL = "http://169.254.169.254"
IPV6_METADATA = ipaddress.IPv6Address("fe80::a9fe:a9fe")

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_ZONE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")
_BRACKETED_RE = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)\[(?P<addr>[^\]%]+)(?:%(?P<zone>[^\]]*))?\](?P<rest>.*)$"
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A metadata service base URL, split into what the socket and the request need."""

    host: str
    port: int = 80
    zone: str = ""
    base_path: str = ""

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("metadata URL has no host")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"metadata URL port {self.port} outside 1..65535")
        if self.zone and not _ZONE_RE.fullmatch(self.zone):
            raise ConfigError(f"IPv6 zone {self.zone!r} is not an interface name or index")
        if self.zone and not self.is_ipv6:
            raise ConfigError(f"a zone (%{self.zone}) needs an IPv6 address, not {self.host}")
        if self.base_path and (not self.base_path.startswith("/") or self.base_path.endswith("/")):
            raise ConfigError(f"base path {self.base_path!r} must start, and not end, with '/'")

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The host as an address, or None for a name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def socket_host(self) -> str:
        """What getaddrinfo gets: the address with its zone (``fe80::a9fe:a9fe%eth0``)."""
        return f"{self.host}%{self.zone}" if self.zone else self.host

    @property
    def host_header(self) -> str:
        """The Host header: bracketed for IPv6, never the zone, port only when not 80."""
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    def path(self, path: str) -> str:
        """The request target for ``path`` under the base path."""
        if not path.startswith("/"):
            path = "/" + path
        return self.base_path + path

    def url(self, path: str = "/") -> str:
        """A printable URL, zone included (RFC 6874 writes '%' as '%25')."""
        zone = f"%25{self.zone}" if self.zone else ""
        host = f"[{self.host}{zone}]" if self.is_ipv6 else self.host
        port = "" if self.port == 80 else f":{self.port}"
        return f"http://{host}{port}{self.path(path)}"

    def __str__(self) -> str:
        return self.url("/")


def parse_url(text: str) -> Endpoint:
    """Parse a metadata base URL; ``ConfigError`` for anything but plain ``http://``.

    The zone may be written raw (``%eth0``, as curl and people do) or encoded as
    RFC 6874 says (``%25eth0``).
    """
    raw = text.strip()
    if "://" not in raw:
        raw = "http://" + raw
    # urlsplit does not know zones: take "[addr%zone]" apart first.
    match = _BRACKETED_RE.match(raw)
    zone = ""
    if match is not None:
        zone = match.group("zone") or ""
        if zone.startswith("25") and len(zone) > 2:
            zone = zone[2:]  # RFC 6874 form: %25 is the escaped '%'
        raw = f"{match.group('head')}[{match.group('addr')}]{match.group('rest')}"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"metadata URL {text!r}: {exc}") from exc
    if parts.scheme != "http":
        raise ConfigError(f"metadata URL {text!r}: only http:// is supported (the metadata service has no TLS)")
    if parts.username or parts.password:
        raise ConfigError(f"metadata URL {text!r}: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ConfigError(f"metadata URL {text!r}: no query or fragment in a base URL")
    host = parts.hostname or ""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"metadata URL {text!r}: {host!r} is not an IPv6 address") from exc
    elif not _HOST_RE.fullmatch(host):
        raise ConfigError(f"metadata URL {text!r}: {host!r} is neither an address nor a host name")
    return Endpoint(host=host, port=port or 80, zone=zone, base_path=parts.path.rstrip("/"))
