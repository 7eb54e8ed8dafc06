"""Dumping inventories: what the text looks like, and that it always parses back."""

from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta169.inventory import (
    Format,
    Inventory,
    dump_inventory,
    instance_to_dict,
    inventory_to_document,
    parse_document,
    parse_inventory,
)
from meta169.model import Instance, Port
from tests.unit.inventory_strategies import EVERY_FIELD_INSTANCE, EVERY_FIELD_INVENTORY, inventories

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"


def test_inventory_show_then_import_keeps_architecture_and_port_id() -> None:
    """Regression: instance_to_dict dropped ``architecture`` and the port ``id``.

    The parser accepted both and SQL stored architecture, so GET then PUT through the
    admin API, or ``instance show`` then ``import``, silently reset the architecture to
    x86_64 and replaced explicit port ids with MAC-derived ones.
    """
    port = Port("net-a", "fa:16:3e:00:00:05", (ipaddress.ip_address("10.0.0.5"),), id="port-explicit")
    instance = Instance(UUID, "arm-1", architecture="aarch64", ports=(port,))
    document = instance_to_dict(instance)
    assert (document["architecture"], document["ports"][0]["id"]) == ("aarch64", "port-explicit")
    (back,) = parse_document({"instances": [document]}, source="shown").instances
    assert back.architecture == "aarch64"
    assert back.ports[0].id == "port-explicit"
    assert back == instance


def test_inventory_dump_writes_every_field_and_parses_back() -> None:
    for fmt in ("yaml", "json"):
        text = dump_inventory(EVERY_FIELD_INVENTORY, fmt)
        back = parse_inventory(text, source="dumped", fmt=fmt)
        assert (back.networks, back.routers, back.instances) == (
            EVERY_FIELD_INVENTORY.networks,
            EVERY_FIELD_INVENTORY.routers,
            EVERY_FIELD_INVENTORY.instances,
        )


def test_inventory_dump_yaml_is_readable() -> None:
    instance = Instance(
        UUID,
        "web-1",
        user_data=b"#cloud-config\nhostname: web-1\n",
        metadata={"role": "web", "port": "80"},
        ports=(Port("net-a", "fa:16:3e:00:00:05", (ipaddress.ip_address("10.0.0.5"),), id="p1"),),
    )
    text = dump_inventory(Inventory(instances=(instance,)))
    assert text == textwrap.dedent(
        f"""\
        instances:
        - uuid: {UUID}
          name: web-1
          hostname: web-1
          project_id: ''
          availability_zone: nova
          region: RegionOne
          instance_type: m1.small
          image_id: ''
          architecture: x86_64
          launch_index: 0
          created_at: '1970-01-01T00:00:00+00:00'
          metadata: {{role: web, port: '80'}}
          keys: []
          user_data: |
            #cloud-config
            hostname: web-1
          tags: {{}}
          security_groups: []
          ports:
          - network: net-a
            mac: fa:16:3e:00:00:05
            ips: [10.0.0.5]
            id: p1
            device_number: 0
        """
    )


def test_inventory_dump_binary_user_data_as_base64() -> None:
    instance = Instance(UUID, "bin", user_data=b"\x1f\x8b\x00\xff")
    document = instance_to_dict(instance)
    assert "user_data" not in document
    assert document["user_data_b64"] == "H4sA/w=="


def test_inventory_dump_of_nothing_is_an_empty_document() -> None:
    assert inventory_to_document(Inventory()) == {}
    assert parse_inventory(dump_inventory(Inventory())) == Inventory()
    assert json.loads(dump_inventory(Inventory(), "json")) == {}


@settings(max_examples=50, deadline=None)
@given(generated=inventories(), fmt=st.sampled_from(["yaml", "json"]))
def test_inventory_dump_then_parse_is_the_identity(generated: Inventory, fmt: Format) -> None:
    text = dump_inventory(generated, fmt)
    back = parse_inventory(text, source="dumped", fmt=fmt)
    assert (back.networks, back.routers, back.instances) == (
        generated.networks,
        generated.routers,
        generated.instances,
    )
    # Equality forgives True == 1 and a timestamp's offset; the text does not.
    assert dump_inventory(back, fmt) == text


def test_inventory_every_field_instance_text_is_stable() -> None:
    text = dump_inventory(Inventory(instances=(EVERY_FIELD_INSTANCE,)))
    assert "architecture: aarch64" in text
    assert "id: port-explicit" in text
    assert "user_data_b64:" in text
    assert "created_at: '2024-05-01T12:30:15.250000-03:30'" in text


# Plain YAML scalars that a reader would not take for strings, and characters a YAML
# reader folds or drops outside double quotes.
TRICKY = ["yes", "No", "null", "~", "<<", "=", "1e3", "0x10", "0o17", "12:30", "2024-01-01", ".inf", "-", "? a",
          "a: b", "#x", "'q'", '"dq"', " lead", "trail ", "a\x85b", "a\u2028b", "\ufeffbom", "cr\r\nlf", "tab\t",
          "\x07bell", "multi\nline\n", "trailing spaces  \nx", "\n", "é☃😀", "\x7f"]  # fmt: skip


@pytest.mark.parametrize("value", TRICKY, ids=[repr(v) for v in TRICKY])
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_inventory_dump_keeps_strings_yaml_would_read_otherwise(value: str, fmt: Format) -> None:
    instance = Instance(
        UUID,
        value,
        architecture=value,
        metadata={value: value},
        vendor_data={value: [value]},
        user_data=value.encode(),
        ports=(Port("net-a", "12:34:56:10:20:30", (ipaddress.ip_address("10.0.0.5"),)),),
    )
    (back,) = parse_inventory(dump_inventory(Inventory(instances=(instance,)), fmt), fmt=fmt).instances
    assert back == instance
