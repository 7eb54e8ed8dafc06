"""How much a client may send and how long it may take: the limits of every server.

Limits follow what a metadata client needs (cloud-init and the SDKs send a few
hundred bytes of headers and at most a 1020-byte password body), so anything far
beyond that is refused early instead of buffered.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 8192
    max_headers: int = 64
    max_url_bytes: int = 2048
    max_body_bytes: int = 16384
    # A client must finish sending a request within this many seconds once it
    # started (slowloris), and an idle keep-alive connection is closed after idle.
    request_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    max_pipelined: int = 32
    # Open connections per process and per client address; beyond them a new
    # connection is answered 503 and closed, so one guest cannot exhaust the server.
    max_connections: int = 8192
    max_connections_per_ip: int = 64
