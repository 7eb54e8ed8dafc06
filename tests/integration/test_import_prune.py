"""``import --prune``: the registry's inventory-owned objects become equal to the
file, in SQLite and PostgreSQL (``meta169 sync FILE``, which owns what it lists as
source file:<path>, is tests/integration/test_sync_file.py). An instance dropped from the inventory used to be
served on, and its IP could not be given to a new VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meta169.errors import InventoryError
from meta169.inventory import apply_inventory, format_plan, parse_inventory, plan_inventory
from meta169.model import Caller, parse_ip
from meta169.registry import open_registry
from tests.integration.serving import run_cli

NETWORKS = """
networks:
  - id: net-a
    subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1}]
  - id: net-b
    subnets: [{cidr: 10.1.0.0/24, gateway: 10.1.0.1}]
routers:
  - id: router-a
    networks: [net-a]
"""
ALPHA = """  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [10.0.0.5]}]
"""
BETA = """  - uuid: 22222222-2222-4222-8222-222222222222
    name: beta
    ports: [{network: net-b, mac: "fa:16:3e:00:00:0b", ips: [10.1.0.5]}]
"""
# A new VM given alpha's old IP.
GAMMA = """  - uuid: 33333333-3333-4333-8333-333333333333
    name: gamma
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0c", ips: [10.0.0.5]}]
"""
BEFORE = NETWORKS + "instances:\n" + ALPHA + BETA
AFTER = NETWORKS + "instances:\n" + GAMMA.replace("fa:16:3e:00:00:0c", "fa:16:3e:00:00:0d") + BETA
# net-b and beta gone; router-a gone too.
SMALLER = "networks:\n  - id: net-a\n    subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1}]\ninstances:\n" + ALPHA


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _state(url: str) -> dict[str, list[str]]:
    exported = json.loads(run_cli(url, "export", "--format", "json").stdout)
    return {
        kind: sorted(entry.get("uuid") or entry["id"] for entry in exported.get(kind, []))
        for kind in ("networks", "routers", "instances")
    }


def _revision(url: str) -> int:
    registry = open_registry(url)
    try:
        return registry.revision()
    finally:
        registry.close()


@pytest.fixture
def populated(sql_url: str, tmp_path: Path) -> str:
    run_cli(sql_url, "import", str(_write(tmp_path / "before.yaml", BEFORE)))
    return sql_url


def test_import_prune_removes_what_the_file_drops_and_frees_the_ip(populated: str, tmp_path: Path) -> None:
    after = _write(tmp_path / "after.yaml", AFTER)
    # Without --prune the IP still belongs to alpha: refused, naming where.
    refused = run_cli(populated, "import", str(after), check=False)
    assert refused.returncode == 2
    assert "instances[0] (gamma), field ports[0].ips[0]" in refused.stderr
    assert "already belongs to instance 11111111-1111-4111-8111-111111111111" in refused.stderr
    result = run_cli(populated, "import", "--prune", str(after))
    assert "removed instance 11111111-1111-4111-8111-111111111111 (alpha)" in result.stdout
    assert "instances: 1 created, 0 updated, 1 unchanged, 1 removed" in result.stdout
    assert _state(populated)["instances"] == [
        "22222222-2222-4222-8222-222222222222",
        "33333333-3333-4333-8333-333333333333",
    ]
    registry = open_registry(populated)
    try:
        found = registry.resolve(Caller(parse_ip("10.0.0.5"), network_id="net-a"))
    finally:
        registry.close()
    assert found.name == "gamma"


def test_import_prune_is_idempotent(populated: str, tmp_path: Path) -> None:
    after = _write(tmp_path / "after.yaml", AFTER)
    run_cli(populated, "import", "--prune", str(after))
    revision = _revision(populated)
    again = run_cli(populated, "import", "--prune", str(after)).stdout
    assert "instances: 0 created, 0 updated, 2 unchanged, 0 removed" in again
    assert "removed " not in again
    assert _revision(populated) == revision


def test_import_prune_dry_run_lists_changes_and_writes_nothing(populated: str, tmp_path: Path) -> None:
    revision = _revision(populated)
    before = _state(populated)
    changed = AFTER.replace("name: beta", "name: beta\n    hostname: beta-renamed")
    out = run_cli(populated, "import", "--prune", "--dry-run", str(_write(tmp_path / "after.yaml", changed))).stdout
    assert out.splitlines() == [
        "remove instance 11111111-1111-4111-8111-111111111111 (alpha)",
        "add instance 33333333-3333-4333-8333-333333333333 (gamma)",
        "change instance 22222222-2222-4222-8222-222222222222 (beta): hostname",
        "dry run: 1 to add, 1 to change, 1 to remove, 3 unchanged; nothing written",
    ]
    assert _revision(populated) == revision
    assert _state(populated) == before


def test_import_prune_removes_unused_networks_and_routers(populated: str, tmp_path: Path) -> None:
    run_cli(populated, "import", "--prune", str(_write(tmp_path / "smaller.yaml", SMALLER)))
    assert _state(populated) == {
        "networks": ["net-a"],
        "routers": [],
        "instances": ["11111111-1111-4111-8111-111111111111"],
    }


def test_import_prune_refuses_a_network_the_file_still_uses(populated: str, tmp_path: Path) -> None:
    # beta stays but net-b, which its port names, is dropped: an error naming beta's
    # port, and nothing written (alpha is not removed either).
    text = SMALLER.replace(ALPHA, BETA)
    revision = _revision(populated)
    result = run_cli(populated, "import", "--prune", str(_write(tmp_path / "bad.yaml", text)), check=False)
    assert result.returncode == 2
    assert "bad.yaml, entry instances[0] (beta), field ports[0].network" in result.stderr
    assert "network 'net-b' is not in the inventory, so --prune would remove it" in result.stderr
    assert _revision(populated) == revision
    assert len(_state(populated)["instances"]) == 2


def test_import_prune_several_files_are_one_inventory(populated: str, tmp_path: Path) -> None:
    nets = _write(tmp_path / "nets.yaml", NETWORKS)
    vms = _write(tmp_path / "vms.yaml", "instances:\n" + BETA)
    run_cli(populated, "import", "--prune", str(nets), str(vms))
    assert _state(populated)["instances"] == ["22222222-2222-4222-8222-222222222222"]
    twice = _write(tmp_path / "twice.yaml", "instances:\n" + BETA)
    result = run_cli(populated, "import", "--prune", str(nets), str(vms), str(twice), check=False)
    assert result.returncode == 2
    assert "twice.yaml, entry instances[0] (beta), field uuid" in result.stderr
    assert f"also defined in {vms}" in result.stderr


def test_import_prune_plan_matches_what_apply_does(sql_url: str) -> None:
    registry = open_registry(sql_url, create=True)
    try:
        apply_inventory(registry, parse_inventory(BEFORE, source="before"))
        plan = plan_inventory(registry, parse_inventory(AFTER, source="after"), prune=True)
        assert "1 to add, 0 to change, 1 to remove" in format_plan(plan)
        report = apply_inventory(registry, parse_inventory(AFTER, source="after"), prune=True)
        assert report.changed == 2
        assert [i.name for i in registry.list_instances()] == ["beta", "gamma"]
        with pytest.raises(InventoryError, match="--prune would remove it"):
            plan_inventory(registry, parse_inventory(SMALLER.replace(ALPHA, BETA), source="bad"), prune=True)
    finally:
        registry.close()
