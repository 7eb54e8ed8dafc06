"""The service manager's end of sd_notify(3) for tests: a datagram socket of the
test's own to point NOTIFY_SOCKET at, and every message a service sent to it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Manager:
    """The manager's end of sd_notify: a datagram socket, and every message received."""

    sock: socket.socket
    path: Path
    messages: list[dict[str, str]] = field(default_factory=list)

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"service exited {proc.returncode} before {key}:\n{log.read_text()}")
            fields = self.receive(0.2)
            if fields is not None and key in fields:
                return fields
        pytest.fail(f"no {key} within {timeout}s; got {self.messages}\n{log.read_text()}")

    def drain(self) -> list[dict[str, str]]:
        """The messages waiting now."""
        got = []
        while (fields := self.receive(0.01)) is not None:
            got.append(fields)
        return got


@contextlib.contextmanager
def manager_at(path: Path) -> Iterator[Manager]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Manager(sock, path)
