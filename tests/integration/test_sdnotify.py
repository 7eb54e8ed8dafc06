"""The sd_notify protocol against a real datagram socket, as systemd listens."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from meta169.sdnotify import Notifier


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    return sock


def test_sdnotify_ready_status_and_watchdog_reach_the_socket(tmp_path: Path) -> None:
    with _listener(tmp_path / "notify") as sock:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert notifier.ready("serving on 127.0.0.1:8775")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:8775"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.reloading()
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0


def test_sdnotify_abstract_socket_name() -> None:
    name = f"meta169-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_sdnotify_without_a_manager_is_silent() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and not notifier.ready() and notifier.watchdog_interval is None


def test_sdnotify_watchdog_interval_is_half_the_timeout_and_for_this_process() -> None:
    assert Notifier.from_environ({"WATCHDOG_USEC": "20000000"}).watchdog_interval == 10.0
    mine = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(mine).watchdog_interval == 10.0
    other = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(other).watchdog_interval is None


def test_sdnotify_unreachable_socket_is_a_logged_false(tmp_path: Path) -> None:
    assert not Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}).ready()
