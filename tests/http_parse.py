"""What serve's one Python parse path (HTTPProtocol over httptools) makes of bytes.

Drives a real :class:`HTTPProtocol` through a transport that only records, so tests
get the very Request a connection would hand its handler, without a socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meta169.http.limits import Limits
from meta169.http.message import Request, Response
from meta169.http.protocol import HTTPProtocol


class RecordingTransport:
    """A transport that keeps what one connection would have sent."""

    def __init__(self, peer: str) -> None:
        self._peer = (peer, 40000) if peer else ""
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.written.extend(bytes(p) for p in parts)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def parse_request(data: bytes, peer: str = "", limits: Limits | None = None) -> Request | None:
    """The first request parsed from ``data``, or None when the parser refused it."""
    loop = asyncio.new_event_loop()
    try:
        got: list[Request] = []

        def handler(req: Request) -> Response:
            got.append(req)
            return Response(200)

        proto = HTTPProtocol(handler, limits or Limits(), loop=loop)
        proto.connection_made(RecordingTransport(peer))  # type: ignore[arg-type]
        proto.data_received(data)
        proto.connection_lost(None)
        return got[0] if got else None
    finally:
        loop.close()
