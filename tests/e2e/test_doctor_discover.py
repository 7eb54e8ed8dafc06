"""``meta169 doctor --host`` finding what to check by itself, in real namespaces.

A router namespace named the Neutron way (``qrouter-m169t-<random>``, created and
removed here, linked to nothing) carries meta169's REDIRECT/MARK/DROP rules while
nothing listens on 9697: the doctor, given no arguments, must find it and call it an
error. With nothing to find it must say so and exit 4, never "0 findings". (A lab that
is up is discovered in test_doctor_lab.py, which has one.)
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.errors import CommandFailed
from meta169.plumbing import iptables
from meta169.plumbing import netns as nsmod

pytestmark = pytest.mark.e2e


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "meta169", "doctor", "--host", "--json", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def qrouter() -> Iterator[str]:
    """A Neutron-named router namespace (unique), with meta169's router rules and no listener."""
    name = f"qrouter-m169t-{secrets.token_hex(4)}"
    nsmod.add(name)
    try:
        iptables.apply(name, iptables.router_rules(["qr-m169t"], family=4))
        yield name
    finally:
        with contextlib.suppress(CommandFailed):
            nsmod.delete(name)


def test_doctor_discover_router_namespace_without_listener_exits_1(qrouter: str, tmp_path: Path) -> None:
    # Discovery runs as with no arguments (it lists the namespaces and processes
    # itself), narrowed to this test's namespace and an empty lab root so it never
    # probes what other processes on the machine serve.
    result = _doctor("--state-root", str(tmp_path), "--only", qrouter)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    ours = [f for f in report["findings"] if f["id"] == "proxy-not-listening" and qrouter in f["summary"]]
    assert ours and ours[0]["severity"] == "error", report["findings"]
    fixes = " ".join(step["text"] for step in ours[0]["fix"])
    assert f"{qrouter}/0.0.0.0:9697=router:{qrouter.removeprefix('qrouter-')}" in fixes
    assert any(line.startswith("ip netns list") and qrouter in line for line in report["discovered"])


def test_doctor_discover_nothing_to_check_exits_4(tmp_path: Path) -> None:
    # The host may run labs, proxies and namespaces of its own: --only narrows discovery
    # to a namespace that does not exist, and the empty state root holds no lab.
    absent = f"qrouter-m169t-{secrets.token_hex(4)}"
    result = _doctor("--state-root", str(tmp_path), "--only", absent)
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "doctor --host found nothing to check" in result.stderr
    assert f"no lab up under {tmp_path}" in result.stderr and "--netns NS" in result.stderr
