"""Importing the example inventory into real databases (SQLite file, PostgreSQL)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from meta169.errors import InventoryError
from meta169.inventory import ImportReport, KindCounts, apply_inventory, load_inventory, parse_inventory
from meta169.model import Caller
from meta169.registry import open_registry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"
UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"


def test_import_example_is_idempotent_in_a_database(sql_url: str) -> None:
    inventory = load_inventory(EXAMPLE)
    registry = open_registry(sql_url, create=True)
    try:
        first = apply_inventory(registry, inventory)
        # One import is one transaction: one revision for all three objects.
        assert first == ImportReport(
            networks=KindCounts(created=1),
            routers=KindCounts(created=1),
            instances=KindCounts(created=1),
            revision=1,
        )
    finally:
        registry.close()
    # A later `meta169 import` is another process with its own connection.
    registry = open_registry(sql_url, create=True)
    try:
        second = apply_inventory(registry, load_inventory(EXAMPLE))
        assert second == ImportReport(
            networks=KindCounts(unchanged=1),
            routers=KindCounts(unchanged=1),
            instances=KindCounts(unchanged=1),
            revision=1,
        )
        assert tuple(registry.list_instances()) == inventory.instances
        caller = Caller(ipaddress.ip_address("10.0.0.5"), router_id="router-a")
        resolved = registry.resolve(caller)
        assert resolved.user_data == b"#cloud-config\nhostname: web-1\n"
        assert resolved.vendor_data == {"cloud-init": "#cloud-config\npackages: [htop]\n"}
    finally:
        registry.close()


def test_import_update_touches_only_the_changed_instance(sql_url: str) -> None:
    registry = open_registry(sql_url, create=True)
    try:
        apply_inventory(registry, load_inventory(EXAMPLE))
        text = EXAMPLE.read_text().replace("ips: [10.0.0.5]", "ips: [10.0.0.7]")
        report = apply_inventory(registry, parse_inventory(text, source="moved.yaml"))
        assert report.instances == KindCounts(updated=1)
        assert report.revision == 2
        changes = registry.changed_since(1)
        assert (changes.instances, changes.topology) == (frozenset({UUID}), True)
        assert len(registry.list_instances()) == 1
    finally:
        registry.close()


def test_import_with_a_bad_reference_writes_nothing(sql_url: str) -> None:
    registry = open_registry(sql_url, create=True)
    try:
        text = EXAMPLE.read_text().replace("{network: net-a,", "{network: net-x,")
        with pytest.raises(InventoryError, match="unknown network 'net-x'"):
            apply_inventory(registry, parse_inventory(text, source="bad.yaml"))
        assert registry.revision() == 0
        assert registry.list_networks() == []
    finally:
        registry.close()
