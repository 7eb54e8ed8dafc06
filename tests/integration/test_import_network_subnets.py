"""A network written with subnets that leave out the address of a port already on it
is refused (exit 3, naming the network, the instances and their IPs), by ``import``,
``import --dry-run`` and ``sync FILE``, in SQLite and PostgreSQL; the registry refuses
it too when the plan was made before another writer put the port there. Such writes
used to go through, and the guests got addresses outside every subnet of their network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.errors import Conflict
from meta169.inventory import apply_plan, parse_inventory, plan_inventory
from meta169.model import Instance, Port, parse_ip
from meta169.registry import Registry, open_registry
from meta169.registry.memory import MemoryRegistry
from tests.integration.serving import run_cli

ALPHA_UUID = "11111111-1111-4111-8111-111111111111"
BETA_UUID = "22222222-2222-4222-8222-222222222222"


def _network(cidr: str, gateway: str) -> str:
    return f"networks:\n  - id: net-a\n    subnets: [{{cidr: {cidr}, gateway: {gateway}}}]\n"


def _alpha(ip: str) -> str:
    return (
        f"instances:\n  - uuid: {ALPHA_UUID}\n    name: alpha\n"
        f'    ports: [{{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [{ip}]}}]\n'
    )


NET = _network("10.0.0.0/24", "10.0.0.1")
# Renumbered: net-a, and alpha with it; beta (another file) is left behind.
SHRUNK = _network("10.0.0.128/25", "10.0.0.129") + _alpha("10.0.0.200")
BETA = (
    f"instances:\n  - uuid: {BETA_UUID}\n    name: beta\n"
    '    ports: [{network: net-a, mac: "fa:16:3e:00:00:0b", ips: [10.0.0.6]}]\n'
)
REFUSAL = (
    f"network net-a: subnets 10.0.0.128/25 would leave ports of 1 instance outside every subnet: "
    f"{BETA_UUID} (beta) at 10.0.0.6; give those instances addresses in the new subnets (or remove them) "
    "in the same write, or keep a subnet that holds their addresses"
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _exported(url: str) -> dict[str, object]:
    return dict(json.loads(run_cli(url, "export", "--format", "json").stdout))


def test_import_network_shrunk_under_another_files_instance_is_exit_3(sql_url: str, tmp_path: Path) -> None:
    run_cli(sql_url, "import", str(_write(tmp_path / "net.yaml", NET + _alpha("10.0.0.5"))))
    run_cli(sql_url, "import", str(_write(tmp_path / "beta.yaml", BETA)))
    before = _exported(sql_url)
    shrunk = _write(tmp_path / "net.yaml", SHRUNK)
    for args in (["import", "--dry-run", str(shrunk)], ["import", str(shrunk)]):
        result = run_cli(sql_url, *args, check=False)
        assert (result.returncode, result.stdout) == (3, ""), args
        assert result.stderr == f"meta169: error: registry: {REFUSAL}\n", args
    assert _exported(sql_url) == before
    # With beta renumbered in the same import, the network changes under no one.
    both = _write(tmp_path / "both.yaml", SHRUNK + BETA.removeprefix("instances:\n").replace("10.0.0.6", "10.0.0.130"))
    assert "networks: 0 created, 1 updated" in run_cli(sql_url, "import", str(both)).stdout


def test_sync_file_network_shrunk_under_an_imported_instance_is_exit_3(sql_url: str, tmp_path: Path) -> None:
    """The sync owns net-a and alpha; beta, on net-a, is the inventory's (import)."""
    synced = _write(tmp_path / "synced.yaml", NET + _alpha("10.0.0.5"))
    run_cli(sql_url, "sync", str(synced))
    run_cli(sql_url, "import", str(_write(tmp_path / "beta.yaml", BETA)))
    before = _exported(sql_url)
    _write(synced, SHRUNK)
    for args in (["sync", "--dry-run", str(synced)], ["sync", str(synced)]):
        result = run_cli(sql_url, *args, check=False)
        assert result.returncode == 3, args
        assert result.stderr == f"meta169: error: registry: {REFUSAL}\n", args
    assert _exported(sql_url) == before
    # Renumbering the network and the instances the sync owns together is one write.
    run_cli(sql_url, "instance", "rm", BETA_UUID)
    run_cli(sql_url, "sync", str(synced))
    registry = open_registry(sql_url)
    try:
        assert [str(s.cidr) for s in registry.get_network("net-a").subnets] == ["10.0.0.128/25"]
        assert registry.get_instance(ALPHA_UUID).ports[0].ips == (parse_ip("10.0.0.200"),)
    finally:
        registry.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "memory":
        opened: Registry = MemoryRegistry()
    elif request.param == "sqlite":
        opened = open_registry(f"sqlite://{tmp_path / 'registry.db'}", create=True)
    else:
        opened = open_registry(str(request.getfixturevalue("postgres_url")), create=True)
    yield opened
    opened.close()


def test_import_plan_made_before_another_writer_is_refused_by_the_registry(registry: Registry) -> None:
    """The plan saw no port outside the new subnets; beta came in before it was
    applied. The registry checks in the write's own transaction."""
    plan = plan_inventory(registry, parse_inventory(NET, source="net.yaml"))
    apply_plan(registry, plan)
    plan = plan_inventory(registry, parse_inventory(SHRUNK, source="net.yaml"))
    beta = Instance(BETA_UUID, "beta", ports=(Port("net-a", "fa:16:3e:00:00:0b", (parse_ip("10.0.0.6"),)),))
    registry.put_instance(beta)
    revision = registry.revision()
    with pytest.raises(Conflict) as info:
        apply_plan(registry, plan)
    assert str(info.value) == REFUSAL
    assert registry.revision() == revision
    assert [str(s.cidr) for s in registry.get_network("net-a").subnets] == ["10.0.0.0/24"]
    assert [i.name for i in registry.list_instances()] == ["beta"]
