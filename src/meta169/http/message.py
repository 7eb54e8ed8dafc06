"""Requests and replies as the servers see them, and how a reply is encoded.

Pure: no sockets. A :class:`Request` is what the parser made of the bytes; a
:class:`Response` is what a handler answers; :func:`encode_response` writes one as
HTTP/1.1 with the fixed headers every meta169 server sends.
"""

from __future__ import annotations

import email.utils
import ipaddress
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from meta169.model import IPAddress


class Request:
    """One parsed request. ``peer_key`` is the client address as the kernel spelled
    it (canonical text: a cheap, cached hash for cache keys); ``peer`` parses it only
    when something needs the address itself."""

    __slots__ = (
        "_peer",
        "body",
        "headers",
        "identity_header",
        "keep_alive",
        "method",
        "peer_key",
        "prepared",
        "raw_path",
    )

    def __init__(
        self,
        method: str,
        raw_path: bytes,
        headers: dict[str, str],
        body: bytes = b"",
        peer_key: str = "",
        keep_alive: bool = True,
        identity_header: bool = False,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.body = body
        self.peer_key = peer_key
        self.keep_alive = keep_alive
        # Whether any X-Meta169-* header came with the request (set while parsing).
        self.identity_header = identity_header
        # Bytes a fast hook already made of the request for its handler (the proxy's
        # compiled stamping writes the whole upstream request here).
        self.prepared: bytes | None = None
        self._peer: IPAddress | bool | None = False  # False: not parsed yet

    @property
    def peer(self) -> IPAddress | None:
        if self._peer is False:
            try:
                self._peer = ipaddress.ip_address(self.peer_key) if self.peer_key else None
            except ValueError:
                self._peer = None
        assert self._peer is not True
        return self._peer


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    # When set, the connection's IP TTL / hop limit is lowered to this before the
    # reply is written (IMDSv2 token replies, EC2 user guide "hop limit").
    ip_ttl: int | None = None
    head: bool = field(default=False)
    # A complete HTTP/1.1 message relayed verbatim (the proxy's upstream reply).
    raw: bytes | None = None


# A handler answers with a Response, an awaitable of one, a Later, or, on the hot
# path, a ``(head, body)`` pair from :func:`document_head` (status line and fixed
# headers already encoded; the Date line and the blank line are added when writing).
Fast = tuple[bytes, bytes]


_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _DateLine:
    """The encoded Date header line; it changes once a second, not per request."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


date_line = _DateLine()


# Status line and fixed headers per (status, type, length): a metadata site has few
# distinct documents, so the hot path joins four bytes objects instead of formatting.
_prefix_cache: dict[tuple[int, str, int], bytes] = {}


def _prefix(status: int, content_type: str, length: int) -> bytes:
    key = (status, content_type, length)
    prefix = _prefix_cache.get(key)
    if prefix is None:
        if len(_prefix_cache) > 50_000:
            _prefix_cache.clear()
        reason = _REASONS.get(status, "Unknown")
        prefix = (
            f"HTTP/1.1 {status} {reason}\r\nServer: meta169\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        ).encode()
        _prefix_cache[key] = prefix
    return prefix


def document_head(content_type: str, length: int) -> bytes:
    """The encoded status line and fixed headers of a 200 reply."""
    return _prefix(200, content_type, length)


def encode_response(resp: Response, *, keep_alive: bool) -> bytes:
    head = _prefix(resp.status, resp.content_type, len(resp.body))
    extra = b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in resp.headers) if resp.headers else b""
    if not keep_alive:
        extra += b"Connection: close\r\n"
    body = b"" if resp.head else resp.body
    return b"".join((head, date_line(), extra, b"\r\n", body))


def error_response(
    status: int, message: str = "", *, close: bool = False, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    text = message or _REASONS.get(status, "Error")
    return Response(status, (text + "\n").encode(), close=close, headers=headers)
