"""The systemd notification protocol (sd_notify(3)), for ``Type=notify`` units.

A service tells its manager it is ready, what it is doing, that it is alive and
that it reloads or stops by sending datagrams of ``KEY=VALUE`` lines to the Unix
socket named in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Without that variable every call is a no-op, so the servers call these
unconditionally. Written here rather than taken from a library: the protocol is one
``sendto`` per message, and the ``systemd`` Python binding needs libsystemd headers
to build.

The environment is read once, by :meth:`Notifier.from_environ` at the edge, and the
object is passed down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("meta169.sdnotify")


@dataclass(frozen=True, slots=True)
class Notifier:
    """Where notifications go (None: not under a notify-aware manager) and how often
    the watchdog wants a ping (None: no watchdog)."""

    socket_path: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        text = env.get("WATCHDOG_USEC")
        # WATCHDOG_PID, when set, names the process the watchdog is meant for.
        pid = env.get("WATCHDOG_PID")
        if text and text.isdigit() and int(text) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(text)
        return cls(path, usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str | int) -> bool:
        """Send one message; False when there is nowhere to send or it failed (logged)."""
        if self.socket_path is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        address = "\0" + self.socket_path[1:] if self.socket_path.startswith("@") else self.socket_path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, address)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.socket_path, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match the reload with READY=1.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "") -> bool:
        return self.send(STOPPING=1, STATUS=status) if status else self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)


async def ping_watchdog(notifier: Notifier) -> None:
    """Send WATCHDOG=1 every ``watchdog_interval`` until cancelled; returns at once without a watchdog.

    Run it as a task on the server's own event loop: a loop that stops turning stops
    the pings, and systemd restarts the service.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
