"""parse -> apply -> export -> parse is the identity, field for field, on every registry.

Generated inventories (every kind and every field, odd but valid values) go into
the memory, SQLite and PostgreSQL registries and come back out through ``export``;
the objects must be equal and their dumped text identical. A second test puts one
object per kind with every field away from its default through each backend, so
a model field the SQL rows forget fails by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta169.inventory import (
    Format,
    Inventory,
    apply_inventory,
    dump_inventory,
    export_inventory,
    parse_inventory,
)
from meta169.registry import Registry, open_registry
from meta169.registry.memory import MemoryRegistry
from tests.unit.inventory_strategies import EVERY_FIELD_INSTANCE, EVERY_FIELD_INVENTORY, inventories


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "memory":
        opened: Registry = MemoryRegistry()
    elif request.param == "sqlite":
        opened = open_registry(f"sqlite://{tmp_path / 'registry.db'}", create=True)
    else:
        opened = open_registry(str(request.getfixturevalue("postgres_url")))
    try:
        yield opened
    finally:
        opened.close()


def _empty(registry: Registry) -> None:
    for instance in registry.list_instances():
        registry.delete_instance(instance.uuid)
    for router in registry.list_routers():
        registry.delete_router(router.id)
    for network in registry.list_networks():
        registry.delete_network(network.id)


def _sorted(inventory: Inventory) -> Inventory:
    """The inventory in the order a registry lists it."""
    return Inventory(
        source=inventory.source,
        networks=tuple(sorted(inventory.networks, key=lambda n: n.id)),
        routers=tuple(sorted(inventory.routers, key=lambda r: r.id)),
        instances=tuple(sorted(inventory.instances, key=lambda i: i.uuid)),
    )


def _objects(inventory: Inventory) -> tuple[object, ...]:
    return (inventory.networks, inventory.routers, inventory.instances)


# One registry serves every example (emptied after each): a fresh PostgreSQL schema
# per example would cost more than the example.
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(generated=inventories(), fmt=st.sampled_from(["yaml", "json"]))
def test_inventory_parse_apply_export_parse_is_the_identity(
    registry: Registry, generated: Inventory, fmt: Format
) -> None:
    text = dump_inventory(generated, fmt)
    parsed = parse_inventory(text, source="generated", fmt=fmt)
    assert _objects(parsed) == _objects(generated)
    try:
        apply_inventory(registry, parsed)
        exported_text = dump_inventory(export_inventory(registry), fmt)
        reparsed = parse_inventory(exported_text, source="exported", fmt=fmt)
    finally:
        _empty(registry)
    expected = _sorted(parsed)
    assert _objects(reparsed) == _objects(expected)
    # Equality forgives True == 1 and a timestamp's offset; the text does not.
    assert exported_text == dump_inventory(expected, fmt)


def test_inventory_every_field_survives_each_registry(registry: Registry) -> None:
    apply_inventory(registry, EVERY_FIELD_INVENTORY)
    stored = registry.get_instance(EVERY_FIELD_INSTANCE.uuid)
    for f in dataclasses.fields(EVERY_FIELD_INSTANCE):
        assert getattr(stored, f.name) == getattr(EVERY_FIELD_INSTANCE, f.name), f.name
    assert stored.created_at.utcoffset() == EVERY_FIELD_INSTANCE.created_at.utcoffset()
    assert registry.list_networks() == list(EVERY_FIELD_INVENTORY.networks)
    assert registry.list_routers() == list(EVERY_FIELD_INVENTORY.routers)
    again = apply_inventory(registry, EVERY_FIELD_INVENTORY)
    assert again.changed == 0
