"""The declared tables of the inventory format, enumerated: every model field has a row,
every row fills a model field, and every kind dumps and parses back field for field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meta169.inventory.schema import ENTRIES, KINDS, OMIT, Inventory, Kind, Where
from tests.unit.inventory_strategies import EVERY_FIELD

KIND_IDS = [kind.name for kind in KINDS]


def _model_fields(kind: Kind[Any]) -> set[str]:
    assert isinstance(kind.model, type)
    return {f.name for f in dataclasses.fields(kind.model)}


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_inventory_schema_covers_every_model_field(kind: Kind[Any]) -> None:
    # A model field without a row would be dropped by every dump and refused by every parse.
    assert {f.attr for f in kind.fields} == _model_fields(kind)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_inventory_schema_label_and_ident_are_required_fields(kind: Kind[Any]) -> None:
    for key in (kind.label, kind.ident):
        if key:
            assert key in kind.keys
    if kind.ident:
        assert kind.lookup(kind.ident).required


def test_inventory_schema_entries_are_the_inventory_fields() -> None:
    assert [key for key, _ in ENTRIES] == [f.name for f in dataclasses.fields(Inventory) if f.name != "source"]


def _kind_of(obj: object) -> Kind[Any]:
    return next(kind for kind in KINDS if type(obj) is kind.model)


def test_inventory_every_field_examples_leave_no_field_at_its_default() -> None:
    # The examples below must exercise every field: a new model field left at its
    # default in them would let a dump that drops it pass.
    assert sorted(type(obj).__name__ for obj in EVERY_FIELD) == sorted(
        kind.model.__name__ for kind in KINDS if isinstance(kind.model, type)
    )
    for obj in EVERY_FIELD:
        for f in dataclasses.fields(obj):
            if f.default is not dataclasses.MISSING:
                assert getattr(obj, f.name) != f.default, (type(obj).__name__, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                assert getattr(obj, f.name) != f.default_factory(), (type(obj).__name__, f.name)


@pytest.mark.parametrize("obj", EVERY_FIELD, ids=lambda obj: type(obj).__name__)
def test_inventory_kind_dump_then_parse_gives_back_every_field(obj: object) -> None:
    kind = _kind_of(obj)
    dumped = kind.dump(obj)
    back = kind.parse(dumped, Where("dumped"))
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        assert getattr(back, f.name) == getattr(obj, f.name), f.name
    assert back == obj


@pytest.mark.parametrize("obj", EVERY_FIELD, ids=lambda obj: type(obj).__name__)
def test_inventory_kind_dump_writes_only_document_types(obj: object) -> None:
    def check(value: object) -> None:
        assert value is not OMIT
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(value, list):
            for item in value:
                check(item)
        else:
            assert value is None or isinstance(value, str | int | float | bool), type(value)

    check(_kind_of(obj).dump(obj))
