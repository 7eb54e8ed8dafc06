"""Applying an inventory to a registry: counts, idempotence, reference checks."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from meta169.errors import InventoryError
from meta169.inventory import (
    ImportReport,
    KindCounts,
    apply_inventory,
    format_import_report,
    load_inventory,
    parse_inventory,
)
from meta169.model import Caller, Instance, Network, Port
from meta169.registry.memory import MemoryRegistry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"
UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
OTHER = "0b6f3e1c-9d7a-4a51-8c3e-5f2d1a0b9c84"


def test_inventory_apply_creates_everything_once() -> None:
    registry = MemoryRegistry()
    report = apply_inventory(registry, load_inventory(EXAMPLE))
    # One import, one transaction: one revision for all three objects.
    assert report == ImportReport(
        networks=KindCounts(created=1),
        routers=KindCounts(created=1),
        instances=KindCounts(created=1),
        revision=1,
    )
    assert report.changed == 3
    caller = Caller(ipaddress.ip_address("10.0.0.5"), router_id="router-a")
    assert registry.resolve(caller).name == "web-1"


def test_inventory_reimport_changes_nothing_and_keeps_the_revision() -> None:
    registry = MemoryRegistry()
    inventory = load_inventory(EXAMPLE)
    apply_inventory(registry, inventory)
    revision = registry.revision()
    again = apply_inventory(registry, load_inventory(EXAMPLE))
    assert again == ImportReport(
        networks=KindCounts(unchanged=1),
        routers=KindCounts(unchanged=1),
        instances=KindCounts(unchanged=1),
        revision=revision,
    )
    assert again.changed == 0
    assert registry.revision() == revision
    assert len(registry.list_instances()) == 1


def test_inventory_reimport_updates_what_changed_only() -> None:
    registry = MemoryRegistry()
    apply_inventory(registry, load_inventory(EXAMPLE))
    revision = registry.revision()
    text = EXAMPLE.read_text().replace("metadata: {role: web}", "metadata: {role: db}")
    report = apply_inventory(registry, parse_inventory(text, source="edited.yaml"))
    assert report.instances == KindCounts(updated=1)
    assert report.networks == KindCounts(unchanged=1)
    assert report.routers == KindCounts(unchanged=1)
    assert registry.revision() == revision + 1
    assert registry.get_instance(UUID).metadata == {"role": "db"}
    assert registry.changed_since(revision).instances == frozenset({UUID})
    assert len(registry.list_instances()) == 1


def test_inventory_import_leaves_other_objects_alone() -> None:
    registry = MemoryRegistry()
    registry.put_instance(Instance(OTHER, "elsewhere"))
    apply_inventory(registry, load_inventory(EXAMPLE))
    assert {i.uuid for i in registry.list_instances()} == {UUID, OTHER}


def test_inventory_may_refer_to_networks_already_in_the_registry() -> None:
    registry = MemoryRegistry()
    apply_inventory(registry, load_inventory(EXAMPLE))
    text = textwrap.dedent(
        f"""
        routers:
          - {{id: router-b, networks: [net-a]}}
        instances:
          - uuid: {OTHER}
            name: web-2
            ports: [{{network: net-a, mac: "fa:16:3e:00:00:06", ips: [10.0.0.6]}}]
        """
    )
    report = apply_inventory(registry, parse_inventory(text, source="more.yaml"))
    assert report.routers == KindCounts(created=1)
    assert report.instances == KindCounts(created=1)


# (inventory text, entry, field, part of the message)
REFERENCE_ERRORS = [
    pytest.param(
        EXAMPLE.read_text().replace("{network: net-a,", "{network: net-x,"),
        "instances[0] (web-1)",
        "ports[0].network",
        "unknown network 'net-x'",
        id="port-unknown-network",
    ),
    pytest.param(
        EXAMPLE.read_text().replace("networks: [net-a]", "networks: [net-a, net-z]"),
        "routers[0] (router-a)",
        "networks[1]",
        "unknown network 'net-z'",
        id="router-unknown-network",
    ),
    pytest.param(
        EXAMPLE.read_text().replace("ips: [10.0.0.5]", "ips: [10.0.0.5, 10.9.0.5]"),
        "instances[0] (web-1)",
        "ports[0].ips[1]",
        "10.9.0.5 is in no subnet of network net-a (10.0.0.0/24)",
        id="ip-outside-subnets",
    ),
]


@pytest.mark.parametrize(("text", "entry", "field", "message"), REFERENCE_ERRORS)
def test_inventory_reference_errors_name_entry_and_field_and_write_nothing(
    text: str, entry: str, field: str, message: str
) -> None:
    registry = MemoryRegistry()
    inventory = parse_inventory(text, source="inv.yaml")
    with pytest.raises(InventoryError) as info:
        apply_inventory(registry, inventory)
    assert (info.value.source, info.value.entry, info.value.field) == ("inv.yaml", entry, field)
    assert message in str(info.value)
    assert registry.revision() == 0
    assert registry.list_networks() == []


def test_inventory_ip_owned_by_another_registered_instance_is_refused() -> None:
    registry = MemoryRegistry()
    registry.put_network(Network("net-a"))
    port = Port("net-a", "fa:16:3e:00:00:99", (ipaddress.ip_address("10.0.0.5"),))
    squatter = Instance(OTHER, "squatter", ports=(port,))
    registry.put_instance(squatter)
    revision = registry.revision()
    with pytest.raises(InventoryError) as info:
        apply_inventory(registry, load_inventory(EXAMPLE))
    assert info.value.field == "ports[0].ips[0]"
    assert f"already belongs to instance {OTHER} (squatter)" in str(info.value)
    assert registry.revision() == revision


def test_inventory_ip_may_move_between_instances_of_the_inventory() -> None:
    registry = MemoryRegistry()
    apply_inventory(registry, load_inventory(EXAMPLE))
    # web-1 gives up 10.0.0.5 and web-2 takes it, in one import.
    text = (
        EXAMPLE.read_text().replace("ips: [10.0.0.5]", "ips: [10.0.0.6]")
        + f"  - uuid: {OTHER}\n"
        + "    name: web-2\n"
        + '    ports: [{network: net-a, mac: "fa:16:3e:00:00:07", ips: [10.0.0.5]}]\n'
    )
    report = apply_inventory(registry, parse_inventory(text, source="moved.yaml"))
    assert report.instances == KindCounts(created=1, updated=1)
    assert registry.resolve(Caller(ipaddress.ip_address("10.0.0.5"), network_id="net-a")).uuid == OTHER


def test_inventory_report_formats_one_line_per_kind() -> None:
    report = ImportReport(
        networks=KindCounts(created=1), routers=KindCounts(unchanged=2), instances=KindCounts(updated=3), revision=9
    )
    assert format_import_report(report) == (
        "networks: 1 created, 0 updated, 0 unchanged\n"
        "routers: 0 created, 0 updated, 2 unchanged\n"
        "instances: 0 created, 3 updated, 0 unchanged\n"
        "registry revision: 9"
    )


def test_inventory_apply_then_read_back_equals_the_file() -> None:
    registry = MemoryRegistry()
    inventory = load_inventory(EXAMPLE)
    apply_inventory(registry, inventory)
    assert tuple(registry.list_networks()) == inventory.networks
    assert tuple(registry.list_routers()) == inventory.routers
    assert tuple(registry.list_instances()) == inventory.instances


def _many(count: int) -> str:
    lines = ["networks:", "  - {id: net-a, subnets: [{cidr: 10.0.0.0/16}]}", "instances:"]
    for n in range(count):
        lines.append(
            f"  - {{uuid: 00000000-0000-4000-8000-{n:012d}, name: vm-{n}, ports: "
            f"[{{network: net-a, mac: 'fa:16:3e:00:01:{n:02x}', ips: [10.0.1.{n + 1}]}}]}}"
        )
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("count", [3, 30], ids=["one-by-one", "bulk"])
def test_inventory_large_and_small_imports_behave_alike(count: int) -> None:
    registry = MemoryRegistry()
    registry.put_network(Network("net-a"))
    port = Port("net-a", "fa:16:3e:00:00:99", (ipaddress.ip_address(f"10.0.1.{count}"),))
    registry.put_instance(Instance(OTHER, "squatter", ports=(port,)))
    inventory = parse_inventory(_many(count), source="many.yaml")
    with pytest.raises(InventoryError) as info:
        apply_inventory(registry, inventory)
    assert info.value.entry == f"instances[{count - 1}] (vm-{count - 1})"
    assert f"already belongs to instance {OTHER} (squatter)" in str(info.value)

    registry.delete_instance(OTHER)
    first = apply_inventory(registry, inventory)
    assert first.instances == KindCounts(created=count)
    assert first.networks == KindCounts(updated=1)
    again = apply_inventory(registry, parse_inventory(_many(count), source="many.yaml"))
    assert again.instances == KindCounts(unchanged=count)
    assert again.revision == first.revision
