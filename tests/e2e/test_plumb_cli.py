"""``meta169 plumb``: the CLI over the plumbing library, in namespaces the test creates."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from meta169.plumbing import iptables
from meta169.plumbing import netns as nsmod

INVENTORY = """
networks:
  - id: net-a
    subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1, dhcp: true, dns: [10.0.0.2]}]
instances:
  - uuid: 8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10
    name: web-1
    ports: [{network: net-a, mac: "fa:16:3e:00:00:05", ips: [10.0.0.5]}]
"""


def _cli(*args: str, registry: str = "memory://") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meta169", "--registry", registry, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_plumb_router_apply_idempotent_and_remove(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> None:
    router, guest = netns(), netns()
    qr, _ = veth(router, guest)
    before = iptables.save(router, 4)
    for _ in range(2):
        result = _cli("plumb", "router", "--netns", router, "--iface", qr)
        assert result.returncode == 0, result.stderr
    saved = iptables.save(router, 4)
    assert (
        f"-A meta169-PREROUTING -d 169.254.169.254/32 -i {qr} -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 9697"
        in saved
    )
    assert saved.count("-j meta169-PREROUTING") == 2  # nat and mangle, once each
    assert "fe80::a9fe:a9fe/128" in iptables.save(router, 6)
    result = _cli("plumb", "router", "--netns", router, "--iface", qr, "--remove")
    assert result.returncode == 0, result.stderr
    after = iptables.save(router, 4)
    assert "meta169" not in after
    assert [line for line in after.splitlines() if line.startswith("-A")] == [
        line for line in before.splitlines() if line.startswith("-A")
    ]


def test_plumb_router_show_changes_nothing(netns: Callable[[], str]) -> None:
    router = netns()
    result = _cli("plumb", "router", "--netns", router, "--iface", "qr-+", "--show", "--family", "4")
    assert result.returncode == 0, result.stderr
    assert "-j REDIRECT --to-ports 9697" in result.stdout
    assert "meta169" not in iptables.save(router, 4)


def test_plumb_isolated_adds_and_removes_addresses(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> None:
    dhcp, guest = netns(), netns()
    port, _ = veth(dhcp, guest)
    result = _cli("plumb", "isolated", "--netns", dhcp, "--iface", port)
    assert result.returncode == 0, result.stderr
    addrs = nsmod.addresses(dhcp, port)
    assert any(str(a).startswith("169.254.169.254/32") for a in addrs), addrs
    again = _cli("plumb", "isolated", "--netns", dhcp, "--iface", port)
    assert "already present" in again.stdout
    removed = _cli("plumb", "isolated", "--netns", dhcp, "--iface", port, "--remove")
    assert removed.returncode == 0, removed.stderr
    assert not any(str(a).startswith("169.254.169.254") for a in nsmod.addresses(dhcp, port))


def test_plumb_dnsmasq_show_renders_option_121_from_registry(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert _cli("import", str(inv), registry=url).returncode == 0
    result = _cli(
        "plumb",
        "dnsmasq",
        "--network",
        "net-a",
        "--iface",
        "tap0",
        "--state-dir",
        str(tmp_path / "dm"),
        "--isolated",
        "--dhcp-ip",
        "10.0.0.2",
        "--show",
        registry=url,
    )
    assert result.returncode == 0, result.stderr
    assert "169.254.169.254/32,10.0.0.2" in result.stdout
    assert "fa:16:3e:00:00:05,10.0.0.5" in result.stdout


def test_plumb_bad_namespace_is_runtime_error() -> None:
    result = _cli("plumb", "router", "--netns", "m169t-does-not-exist", "--iface", "qr-x")
    assert result.returncode == 4
    assert "m169t-does-not-exist" in result.stderr
