"""Suite-wide guards; the capability rule is :func:`tests.capabilities.require`.

The network guard enforces the project's first safety rule inside the test process:
from the host's network namespace nothing may connect to a non-loopback address
(169.254.169.254 above all). A thread that has entered a namespace the test created
is a different namespace and is not restricted. (uvloop's own connects bypass the
Python socket methods; test clients here use the standard library.)
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

pytest_plugins = ["tests.harness.fixtures", "tests.integration.conftest_postgres"]

# Every meta169 the suite runs (in process, as a subprocess, in the lab) reads this
# empty configuration instead of a real /etc/meta169/meta169.toml on the machine.
os.environ.setdefault("META169_CONFIG", "/dev/null")

_HOST_NETNS = os.stat("/proc/self/ns/net").st_ino


def _in_host_netns() -> bool:
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino == _HOST_NETNS
    except OSError:
        return True


def _check(address: Any) -> None:
    if not isinstance(address, tuple) or not _in_host_netns():
        return
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host in ("localhost", ""):
            return
        raise PermissionError(f"test network guard: refusing to resolve and connect to {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        raise PermissionError(f"test network guard: {ip} is not loopback; tests talk to loopback or to namespaces")


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def connect(self: socket.socket, address: Any, *args: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return original(self, address, *args)

    return connect


socket.socket.connect = _guarded(socket.socket.connect)  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)  # type: ignore[method-assign]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.counters import SUMMARY

    for key, value in sorted(SUMMARY.items()):
        terminalreporter.write_line(f"meta169 {key}: {value}")
