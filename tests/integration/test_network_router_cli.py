"""``meta169 network show|rm`` and ``router show|rm`` as real processes, in SQLite and
PostgreSQL: ``show`` prints what ``import`` accepts unchanged, ``rm`` refuses a network
something still uses and names what uses it (until then the only way out was editing
an inventory and ``import --prune``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meta169.inventory import load_inventory, parse_inventory
from tests.integration.serving import run_cli

INVENTORY = """
networks:
  - id: net-a
    subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1}]
  - id: net-b
    project_id: proj-b
    name: tenant-b
    mtu: 1450
    subnets:
      - cidr: 10.1.0.0/24
        gateway: 10.1.0.1
        dhcp: false
        dns: [10.1.0.2]
        host_routes: [{destination: 169.254.169.254/32, nexthop: 10.1.0.3}]
      - {cidr: "fd00:1::/64", ipv6_mode: slaac}
  - id: net-c
    source: "libvirt:qemu:///system"
  - id: net-d
routers:
  - id: router-a
    project_id: proj-b
    networks: [net-b, net-c]
instances:
  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [10.0.0.5]}]
  - uuid: 22222222-2222-4222-8222-222222222222
    name: beta
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0b", ips: [10.0.0.6]}]
"""


@pytest.fixture
def populated(sql_url: str, tmp_path: Path) -> str:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    run_cli(sql_url, "import", str(tmp_path / "inventory.yaml"))
    return sql_url


def _ids(url: str, kind: str) -> list[str]:
    exported = json.loads(run_cli(url, "export", "--format", "json").stdout)
    return sorted(entry["id"] for entry in exported.get(kind, []))


def _exported(url: str, kind: str, ident: str) -> dict[str, object]:
    """The entry ``export`` writes for ``ident``."""
    exported = json.loads(run_cli(url, "export", "--format", "json").stdout)
    (entry,) = (e for e in exported[f"{kind}s"] if e["id"] == ident)
    assert isinstance(entry, dict)
    return entry


@pytest.mark.parametrize(("kind", "ident"), [("network", "net-b"), ("network", "net-c"), ("router", "router-a")])
def test_network_router_show_inventory_imports_unchanged(populated: str, tmp_path: Path, kind: str, ident: str) -> None:
    shown = run_cli(populated, kind, "show", ident, "--format", "inventory").stdout
    assert shown.startswith(f"{kind}s:\n")
    path = tmp_path / "one.yaml"
    path.write_text(shown)
    (entry,) = getattr(load_inventory(path), f"{kind}s")
    (original,) = (e for e in getattr(parse_inventory(INVENTORY), f"{kind}s") if e.id == ident)
    assert entry == original  # every field, the source (libvirt:... for net-c) included
    report = run_cli(populated, "import", str(path)).stdout
    assert f"{kind}s: 0 created, 0 updated, 1 unchanged" in report
    # the JSON form (the default) is the same entry, as export and the admin API write it
    assert json.loads(run_cli(populated, kind, "show", ident).stdout) == _exported(populated, kind, ident)


@pytest.mark.parametrize("kind", ["network", "router"])
def test_network_router_show_unknown_is_a_registry_error(populated: str, kind: str) -> None:
    result = run_cli(populated, kind, "show", "nothing", check=False)
    assert result.returncode == 3
    assert result.stderr == f"meta169: error: no {kind} nothing\n"


def test_network_rm_refuses_a_network_ports_use_naming_the_instances(populated: str) -> None:
    result = run_cli(populated, "network", "rm", "net-a", check=False)
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == (
        "meta169: error: cannot remove network net-a: network net-a is used by instances "
        "11111111-1111-4111-8111-111111111111 (alpha), 22222222-2222-4222-8222-222222222222 (beta)\n"
    )
    assert "net-a" in _ids(populated, "networks")
    run_cli(populated, "instance", "rm", "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222")
    assert run_cli(populated, "network", "rm", "net-a").stdout == "removed net-a\n"
    assert "net-a" not in _ids(populated, "networks")


def test_network_rm_refuses_a_network_a_router_uses_naming_the_router(populated: str) -> None:
    result = run_cli(populated, "network", "rm", "net-b", check=False)
    assert result.returncode == 3
    assert result.stderr == "meta169: error: cannot remove network net-b: network net-b is used by router router-a\n"
    assert "net-b" in _ids(populated, "networks")


def test_network_rm_several_stops_at_the_first_it_cannot_remove(populated: str) -> None:
    """As instance rm: one at a time, each removal reported, exit 3 at the first failure."""
    result = run_cli(populated, "network", "rm", "net-d", "nothing", "net-b", check=False)
    assert result.returncode == 3
    assert result.stdout == "removed net-d\n"
    assert result.stderr == "meta169: error: no network nothing\n"
    assert _ids(populated, "networks") == ["net-a", "net-b", "net-c"]


def test_router_rm_keeps_its_networks_and_frees_them(populated: str) -> None:
    assert run_cli(populated, "router", "rm", "router-a").stdout == "removed router-a\n"
    assert _ids(populated, "routers") == []
    assert _ids(populated, "networks") == ["net-a", "net-b", "net-c", "net-d"]
    # net-c belongs to a libvirt sync; rm treats it as instance rm treats a synced
    # instance: removed (the sync adds it back while libvirt still has it).
    assert run_cli(populated, "network", "rm", "net-b", "net-c").stdout == "removed net-b\nremoved net-c\n"
    assert _ids(populated, "networks") == ["net-a", "net-d"]
    again = run_cli(populated, "router", "rm", "router-a", check=False)
    assert (again.returncode, again.stderr) == (3, "meta169: error: no router router-a\n")


def test_router_list_json_lists_each_router_with_its_networks(populated: str) -> None:
    listed = json.loads(run_cli(populated, "router", "list", "--json").stdout)
    assert listed == [{"id": "router-a", "networks": ["net-b", "net-c"]}]
    assert run_cli(populated, "router", "list").stdout.split() == ["router-a", "net-b", "net-c"]
