"""``meta169 export`` and ``instance show --format inventory`` as real processes: what
they write, ``import`` accepts unchanged."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meta169.inventory import dump_inventory, load_inventory
from tests.integration.serving import run_cli
from tests.unit.inventory_strategies import EVERY_FIELD_INSTANCE, EVERY_FIELD_INVENTORY

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"


@pytest.fixture
def populated(tmp_path: Path) -> str:
    """A SQLite registry holding the example inventory and the every-field one."""
    url = f"sqlite://{tmp_path / 'source.db'}"
    every = tmp_path / "every.yaml"
    every.write_text(dump_inventory(EVERY_FIELD_INVENTORY))
    run_cli(url, "import", str(EXAMPLE), str(every))
    return url


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_import_export_gives_identical_text(populated: str, tmp_path: Path, fmt: str) -> None:
    first = run_cli(populated, "export", "--format", fmt).stdout
    exported = tmp_path / f"exported.{fmt}"
    exported.write_text(first)
    fresh = f"sqlite://{tmp_path / 'fresh.db'}"
    imported = run_cli(fresh, "import", str(exported)).stdout
    assert "networks: 2 created" in imported
    assert "instances: 2 created" in imported
    second = run_cli(fresh, "export", "--format", fmt).stdout
    assert second == first
    # and importing it again changes nothing
    again = run_cli(fresh, "import", str(exported)).stdout
    assert "instances: 0 created, 0 updated, 2 unchanged" in again
    assert "architecture: aarch64" in first or '"architecture": "aarch64"' in first


def test_export_to_a_file_takes_the_format_from_its_name(populated: str, tmp_path: Path) -> None:
    out = tmp_path / "registry.json"
    assert run_cli(populated, "export", "-o", str(out)).stdout == ""
    document = json.loads(out.read_text())
    assert sorted(document) == ["instances", "networks", "routers"]
    # user data, keys and vendor data may be secret: the file is the owner's only
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".registry.json.")]
    inventory = load_inventory(out)
    assert EVERY_FIELD_INSTANCE in inventory.instances


def test_export_to_an_unwritable_place_is_a_usage_error(populated: str, tmp_path: Path) -> None:
    result = run_cli(populated, "export", "-o", str(tmp_path / "missing" / "x.yaml"), check=False)
    assert result.returncode == 2
    assert "cannot write" in result.stderr


def test_instance_show_inventory_imports_unchanged(populated: str, tmp_path: Path) -> None:
    shown = run_cli(populated, "instance", "show", EVERY_FIELD_INSTANCE.uuid, "--format", "inventory").stdout
    assert shown.startswith("instances:\n")
    path = tmp_path / "one.yaml"
    path.write_text(shown)
    (instance,) = load_inventory(path).instances
    assert instance == EVERY_FIELD_INSTANCE
    report = run_cli(populated, "import", str(path)).stdout
    assert "instances: 0 created, 0 updated, 1 unchanged" in report
    # the JSON form is the same entry
    as_json = json.loads(run_cli(populated, "instance", "show", EVERY_FIELD_INSTANCE.uuid).stdout)
    assert as_json["architecture"] == "aarch64"
    assert as_json["ports"][0]["id"] == "port-explicit"
