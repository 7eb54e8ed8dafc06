"""One HTTP exchange with the metadata service, on the standard library only.

The socket is connected here, not inside :mod:`http.client`, so that a failed
connect is told apart precisely: ``refused`` (something answered with a reset),
``timeout`` (nothing answered at all), ``unreachable`` (EHOSTUNREACH or
ENETUNREACH: an ICMP error, or no ARP answer for an on-link address, which is how
the seed's guest failed). The doctor's probes read these reasons. Every failure
is a :class:`~meta169.errors.ClientError`; an HTTP error status is not a failure
here, it is a :class:`Reply`.
"""

from __future__ import annotations

import errno
import http.client
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meta169.client.url import Endpoint
from meta169.errors import ClientError

# user-data is at most 64 KiB and documents are small; a bigger reply is not ours.
MAX_REPLY = 4 << 20
USER_AGENT = "meta169-client/1"

_UNREACHABLE = frozenset((errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN))


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP reply: status, lower-cased headers, whole body."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Transport(Protocol):
    """Sends one request and returns the reply; raises ``ClientError`` on failure."""

    def __call__(self, method: str, path: str, headers: Mapping[str, str], *, body: bytes | None = None) -> Reply: ...


def classify_connect_error(exc: OSError) -> str:
    """The ``ClientError.reason`` for an exception raised by ``connect``."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if exc.errno in _UNREACHABLE:
        return "unreachable"
    return "connect"


def _scope_id(endpoint: Endpoint, url: str) -> int:
    # Resolved here rather than by getaddrinfo, which takes "%zone" on link-local
    # addresses only; the zone is an interface name or index (RFC 4007 section 11).
    if not endpoint.zone:
        return 0
    if endpoint.zone.isdigit():
        return int(endpoint.zone)
    try:
        return socket.if_nametoindex(endpoint.zone)
    except OSError as exc:
        raise ClientError(f"no interface {endpoint.zone!r} for the zone", reason="connect", url=url) from exc


def open_connection(endpoint: Endpoint, timeout: float) -> socket.socket:
    """A TCP socket connected to ``endpoint`` within ``timeout`` seconds.

    Address literals are never resolved through DNS (``AI_NUMERICHOST``); a zone
    (``%eth0``) becomes the IPv6 scope id of the socket address.
    """
    flags = socket.AI_NUMERICHOST if endpoint.address is not None else 0
    url = endpoint.url("")
    scope = _scope_id(endpoint, url)
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=flags)
    except socket.gaierror as exc:
        raise ClientError(f"cannot resolve {endpoint.host}: {exc}", reason="connect", url=url) from exc
    last: ClientError | None = None
    for family, kind, proto, _, resolved in infos:
        sockaddr = (resolved[0], resolved[1], 0, scope) if scope and family == socket.AF_INET6 else resolved
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            reason = classify_connect_error(exc)
            text = "connect timed out" if reason == "timeout" else (exc.strerror or str(exc))
            last = ClientError(f"{text} (after {timeout:g}s)" if reason == "timeout" else text, reason=reason, url=url)
            last.__cause__ = exc
            continue
        return sock
    assert last is not None  # getaddrinfo returns at least one entry or raises
    raise last


class _Connection(http.client.HTTPConnection):
    """An HTTPConnection over a socket we connected ourselves."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__("unused", timeout=timeout)
        self.sock = sock

    def connect(self) -> None:  # pragma: no cover - the socket is already connected
        raise http.client.NotConnected("connection closed")


@dataclass(frozen=True, slots=True)
class HTTPTransport:
    """One connection per request: a metadata crawl is a few dozen tiny requests."""

    endpoint: Endpoint
    timeout: float = 2.0
    user_agent: str = USER_AGENT
    connect: Callable[[Endpoint, float], socket.socket] = open_connection

    def __call__(self, method: str, path: str, headers: Mapping[str, str], *, body: bytes | None = None) -> Reply:
        url = self.endpoint.url(path)
        sock = self.connect(self.endpoint, self.timeout)
        conn = _Connection(sock, self.timeout)
        try:
            conn.putrequest(method, self.endpoint.path(path), skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.endpoint.host_header)
            conn.putheader("User-Agent", self.user_agent)
            conn.putheader("Accept", "*/*")
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is not None or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read(MAX_REPLY + 1)
            if len(data) > MAX_REPLY:
                raise ClientError(f"reply larger than {MAX_REPLY} bytes", reason="protocol", url=url)
            return Reply(resp.status, data, {k.lower(): v for k, v in resp.getheaders()})
        except TimeoutError as exc:
            raise ClientError(f"no reply within {self.timeout:g}s", reason="read-timeout", url=url) from exc
        except (http.client.HTTPException, ConnectionError) as exc:
            raise ClientError(f"bad or cut-short reply: {exc!r}", reason="protocol", url=url) from exc
        except OSError as exc:
            raise ClientError(f"connection failed: {exc.strerror or exc}", reason="connect", url=url) from exc
        finally:
            conn.close()
