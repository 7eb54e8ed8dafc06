"""Fixtures for end-to-end tests: root, network namespaces, veths, daemons.

Every test here runs inside namespaces it creates (``m169t-<random>-<n>``), linked
to each other by veths and never to the host namespace. Namespaces are deleted
after the test, also when it fails, after any process still running inside them
(ours: dnsmasq, dhclient) has been stopped by PID. Missing root or tools skip the
test, or fail it under META169_REQUIRE_E2E=1 (see ``tests.capabilities.require``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meta169.errors import CommandFailed
from meta169.plumbing import iptables
from meta169.plumbing import netns as nsmod
from meta169.plumbing.command import run
from tests.capabilities import require
from tests.e2e.lab_fixture import lab  # noqa: F401  (fixture: one meta169 lab per module)

NETNS_PREFIX = "m169t-"
# veth names: "m169" + 6 hex + one letter = 11 characters, inside IFNAMSIZ (15).
VETH_PREFIX = "m169"


@pytest.fixture(autouse=True)
def _e2e_capabilities() -> None:
    require("root", os.geteuid() == 0, "e2e tests create network namespaces")
    require("ip", shutil.which("ip") is not None, "iproute2's ip is not installed")
    require("/run/netns", os.access("/run", os.W_OK), "cannot create /run/netns")


@pytest.fixture
def require_tools() -> Callable[..., None]:
    """``require_tools("dnsmasq", "dhclient")``: skip (or fail) when one is missing."""

    def check(*names: str) -> None:
        for name in names:
            require(f"executable {name}", shutil.which(name) is not None, f"{name} is not on PATH")

    return check


def _stop_leftovers(name: str) -> None:
    # Only processes in a namespace this test created, so ones the test started.
    try:
        pids = nsmod.pids(name)
    except CommandFailed:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        pids = tuple(p for p in pids if Path(f"/proc/{p}").exists())
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Factory: each call creates a fresh namespace with ``lo`` up and returns its name."""
    token = secrets.token_hex(3)
    created: list[str] = []

    def make() -> str:
        name = f"{NETNS_PREFIX}{token}-{len(created)}"
        nsmod.add(name)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        _stop_leftovers(name)
        with contextlib.suppress(CommandFailed):
            nsmod.delete(name)


@pytest.fixture
def veth() -> Iterator[Callable[..., tuple[str, str]]]:
    """Factory: ``veth(ns_a, ns_b, mac_a=None, mac_b=None)`` -> (name in a, name in b), both up."""
    made: list[tuple[str, str]] = []

    def make(ns_a: str, ns_b: str, *, mac_a: str | None = None, mac_b: str | None = None) -> tuple[str, str]:
        token = secrets.token_hex(3)
        a, b = f"{VETH_PREFIX}{token}a", f"{VETH_PREFIX}{token}b"
        nsmod.create_veth(a, ns_a, b, ns_b, mac_a=mac_a, mac_b=mac_b)
        made.append((ns_a, a))
        return a, b

    yield make
    for ns, name in made:
        # Deleting one end removes the pair; a deleted namespace took it already.
        if nsmod.exists(ns):
            with contextlib.suppress(CommandFailed):
                run(nsmod.ip_argv(ns, "link", "del", name))


@dataclass(frozen=True)
class RoutedGuest:
    """A router namespace with meta169's REDIRECT rules on its port to a guest namespace
    at 10.0.0.5/24 (gateway 10.0.0.1)."""

    router: str
    router_if: str
    vm: str


@pytest.fixture
def routed_guest(netns: Callable[[], str], veth: Callable[..., tuple[str, str]]) -> RoutedGuest:
    router, vm = netns(), netns()
    router_if, vm_if = veth(router, vm)
    nsmod.add_address(router, router_if, ipaddress.ip_interface("10.0.0.1/24"))
    nsmod.add_address(vm, vm_if, ipaddress.ip_interface("10.0.0.5/24"))
    nsmod.add_route(vm, "default", via=ipaddress.ip_address("10.0.0.1"))
    iptables.apply(router, iptables.router_rules([router_if]))
    return RoutedGuest(router, router_if, vm)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A world-searchable scratch directory (dnsmasq re-reads files after dropping root)."""
    path = Path(tempfile.mkdtemp(prefix=NETNS_PREFIX, dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
