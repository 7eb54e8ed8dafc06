"""``meta169 sync FILE``: the registry matches FILE for source file:<absolute path>,
and what other sources own (an import, another file, libvirt) is never touched."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from meta169.cli import main
from meta169.model import Instance
from meta169.registry import open_registry

NET = """networks:
  - id: net-a
    subnets: [{cidr: 10.0.0.0/24, gateway: 10.0.0.1}]
"""


def _vm(n: int, ip: str = "") -> str:
    return (
        f"  - uuid: 00000000-0000-4000-8000-00000000000{n}\n"
        f"    name: vm-{n}\n"
        f'    ports: [{{network: net-a, mac: "fa:16:3e:00:00:0{n}", ips: [{ip or f"10.0.0.{n}"}]}}]\n'
    )


def _cli(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--registry", url, *args])


def _sources(url: str) -> dict[str, str]:
    registry = open_registry(url)
    try:
        return {i.name: i.source for i in registry.list_instances()}
    finally:
        registry.close()


def test_sync_file_owns_what_it_lists_and_removes_what_it_drops(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    inventory = tmp_path / "vms.yaml"
    inventory.write_text(NET + "instances:\n" + _vm(1) + _vm(2))
    dry = _cli(url, "sync", "--dry-run", str(inventory))  # FILE and options in either order
    assert dry.exit_code == 2 and "does not exist" in dry.output  # a dry run creates nothing
    first = _cli(url, "sync", str(inventory))
    assert first.exit_code == 0, first.output
    source = f"file:{inventory}"
    assert _sources(url) == {"vm-1": source, "vm-2": source}
    again = _cli(url, "sync", "file", str(inventory), "--dry-run")
    assert again.exit_code == 0, again.output
    assert "dry run: 0 to add, 0 to change, 0 to remove, 3 unchanged; nothing written" in again.output

    # Another source's instance on the same network stays, whatever the file says.
    registry = open_registry(url)
    try:
        registry.put_instance(Instance(uuid="00000000-0000-4000-8000-000000000009", name="vm-9", source="admin"))
    finally:
        registry.close()
    inventory.write_text(NET + "instances:\n" + _vm(2))
    dropped = _cli(url, "sync", str(inventory))
    assert dropped.exit_code == 0, dropped.output
    assert f"{source}: remove instance 00000000-0000-4000-8000-000000000001 (vm-1)" in dropped.output
    assert _sources(url) == {"vm-2": source, "vm-9": "admin"}


def test_sync_file_refuses_what_an_import_owns_until_adopted(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    imported = tmp_path / "imported.yaml"
    imported.write_text(NET + "instances:\n" + _vm(1))
    assert _cli(url, "import", str(imported)).exit_code == 0
    synced = tmp_path / "synced.yaml"
    synced.write_text(NET + "instances:\n" + _vm(2, ip="10.0.0.1"))
    refused = _cli(url, "sync", str(synced))
    assert refused.exit_code == 3
    assert f"network net-a from file:{synced} is already in the registry from inventory" in refused.output
    # Taking the network over still leaves vm-1 to the import, and vm-1's address
    # with it: a file cannot give it away.
    clash = _cli(url, "sync", str(synced), "--adopt", "inventory")
    assert clash.exit_code == 3
    assert "IP 10.0.0.1 on network net-a already belongs to instance 00000000-0000-4000-8000-000000000001 (vm-1)" in (
        clash.output
    )
    synced.write_text(NET + "instances:\n" + _vm(2))
    adopted = _cli(url, "sync", str(synced), "--adopt", "inventory")
    assert adopted.exit_code == 0, adopted.output
    assert _sources(url) == {"vm-1": "inventory", "vm-2": f"file:{synced}"}
    registry = open_registry(url)
    try:
        assert registry.get_network("net-a").source == f"file:{synced}"
    finally:
        registry.close()


def test_sync_file_import_and_import_prune_leave_other_sources_alone(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(NET + "instances:\n" + _vm(1))
    assert _cli(url, "import", str(inventory)).exit_code == 0
    registry = open_registry(url)
    try:
        registry.put_instance(
            Instance(uuid="00000000-0000-4000-8000-000000000007", name="domain", source="libvirt:qemu:///system")
        )
    finally:
        registry.close()
    # A plain import never replaces what another source owns...
    inventory.write_text(NET + "instances:\n" + _vm(1) + _vm(7))
    refused = _cli(url, "import", str(inventory))
    assert refused.exit_code == 3
    assert (
        "instance 00000000-0000-4000-8000-000000000007 (vm-7) from inventory is already in the registry "
        "from libvirt:qemu:///system" in refused.output
    )
    # ...and --prune removes only what the inventory's own source owns.
    inventory.write_text(NET + "instances: []\n")
    pruned = _cli(url, "import", "--prune", str(inventory))
    assert pruned.exit_code == 0, pruned.output
    assert _sources(url) == {"domain": "libvirt:qemu:///system"}


def test_sync_file_takes_its_options_from_the_sync_section(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    imported = tmp_path / "imported.yaml"
    imported.write_text(NET + "instances:\n" + _vm(1))
    assert _cli(url, "import", str(imported)).exit_code == 0
    synced = tmp_path / "synced.yaml"
    synced.write_text(NET + "instances:\n" + _vm(1) + _vm(2))
    config = tmp_path / "meta169.toml"
    # `sync FILE` is `sync file FILE`: the section's adopt reaches it.
    config.write_text('[sync]\nadopt = ["inventory"]\n')
    adopted = CliRunner().invoke(main, ["--config", str(config), "--registry", url, "sync", str(synced)])
    assert adopted.exit_code == 0, adopted.output
    assert _sources(url) == {"vm-1": f"file:{synced}", "vm-2": f"file:{synced}"}


def test_sync_file_dry_run_is_never_taken_from_the_file(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    synced = tmp_path / "synced.yaml"
    synced.write_text(NET + "instances:\n" + _vm(1))
    config = tmp_path / "meta169.toml"
    config.write_text("[sync]\ndry-run = true\n")
    refused = CliRunner().invoke(main, ["--config", str(config), "--registry", url, "sync", str(synced)])
    assert refused.exit_code == 2
    assert f"{config}:2: [sync] dry-run: not a setting: only the flag --dry-run sets it" in refused.output
    # Nor from the environment: a variable is no flag, and the sync writes.
    config.write_text("")
    done = CliRunner().invoke(
        main, ["--config", str(config), "--registry", url, "sync", str(synced)], env={"META169_SYNC_DRY_RUN": "1"}
    )
    assert done.exit_code == 0, done.output
    assert _sources(url) == {"vm-1": f"file:{synced}"}
