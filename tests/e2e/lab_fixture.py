"""The ``lab`` fixture: one real ``meta169 lab`` per test module, always torn down.

The lab gets a unique name (``t`` + 6 hex digits, so namespaces ``m169lab-tXXXXXX-*``)
and a world-searchable state directory under /tmp (dnsmasq re-reads files after
dropping root, which pytest's 0700 tmp_path would forbid). Teardown runs
``Lab.down`` and then removes the directory, also when the module's tests failed;
a failed ``Lab.up`` has already removed what it made.

Helpers here talk HTTP from inside a VM: the socket is opened by a thread that has
entered the VM's namespace, so the request leaves through the VM's eth0, its routes
and its neighbour table, exactly as a guest's would.
"""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meta169.errors import LabError
from meta169.lab import Lab, LabConfig, check_prerequisites
from tests.capabilities import require

METADATA_V4 = "169.254.169.254"
METADATA_V6 = "fe80::a9fe:a9fe"


def lab_config(name: str | None = None, **extra: Any) -> LabConfig:
    """A config with a fresh unique name and a fresh /tmp state directory (mode 0755)."""
    name = name or f"t{secrets.token_hex(3)}"
    state_dir = Path(tempfile.mkdtemp(prefix=f"m169lab-{name}-", dir="/tmp"))
    state_dir.chmod(0o755)
    return LabConfig(name=name, state_dir=state_dir, python=sys.executable, **extra)


def require_lab(config: LabConfig) -> None:
    """Skip (or fail under META169_REQUIRE_E2E=1) when the lab cannot run here."""
    try:
        check_prerequisites(config)
    except LabError as exc:
        shutil.rmtree(config.directory, ignore_errors=True)
        require("meta169 lab", False, str(exc))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A running lab (tenant a routed, tenant b isolated, VMs a1 a2 b1 b2)."""
    config = lab_config()
    require_lab(config)
    try:
        built = Lab.up(config)
        try:
            yield built
        finally:
            built.down()
    finally:
        shutil.rmtree(config.directory, ignore_errors=True)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def vm_request(
    lab: Lab,
    vm: str,
    path: str,
    *,
    host: str = METADATA_V4,
    port: int = 80,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One HTTP request from inside ``vm``. ``host`` may be ``fe80::...%eth0``.

    Connection errors (timeout, unreachable) propagate as the OSError they are.
    """

    def go() -> Reply:
        # With an explicit port, http.client takes the host as is (no brackets).
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    return lab.call(vm, go)


def vm_connect(lab: Lab, vm: str, host: str, port: int, *, timeout: float) -> None:
    """A bare TCP connect from inside ``vm`` (raises what connect raises)."""
    import socket

    def go() -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addr = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(addr)

    lab.call(vm, go)
