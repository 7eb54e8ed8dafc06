"""Writing inventories: model objects, or a whole registry, as documents ``import`` accepts.

A dump writes every field that holds a value (defaults included, derived values such
as a port id from its MAC or a hostname from the name spelled out), so dump -> parse
gives back equal objects, and export -> import -> export gives back the same text.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from meta169.errors import InventoryError
from meta169.inventory.parse import format_of
from meta169.inventory.schema import ENTRIES, INSTANCE, NETWORK, ROUTER, Inventory
from meta169.inventory.text import Format, dump_text
from meta169.model import Instance, Network, Router
from meta169.registry.base import Registry


def instance_to_dict(instance: Instance) -> dict[str, Any]:
    """An instance in inventory form (what ``import`` and the admin API's PUT accept)."""
    return INSTANCE.dump(instance)


def network_to_dict(network: Network) -> dict[str, Any]:
    """A network in inventory form."""
    return NETWORK.dump(network)


def router_to_dict(router: Router) -> dict[str, Any]:
    """A router in inventory form."""
    return ROUTER.dump(router)


def inventory_to_document(inventory: Inventory) -> dict[str, Any]:
    """The whole inventory as a document; kinds without entries are left out."""
    return {
        key: [kind.dump(obj) for obj in getattr(inventory, key)] for key, kind in ENTRIES if getattr(inventory, key)
    }


def dump_inventory(inventory: Inventory, fmt: Format = "yaml") -> str:
    """The inventory as YAML or JSON text."""
    return dump_text(inventory_to_document(inventory), fmt)


def export_inventory(registry: Registry, *, source: str = "registry") -> Inventory:
    """Everything ``registry`` holds, as an inventory (entries sorted by id, as listed)."""
    return Inventory(
        source=source,
        networks=tuple(registry.list_networks()),
        routers=tuple(registry.list_routers()),
        instances=tuple(registry.list_instances()),
    )


def save_inventory(inventory: Inventory, path: str | Path, fmt: Format | None = None) -> None:
    """Write the inventory to ``path`` (format from the extension, else YAML), atomically.

    The text goes to a temporary file beside ``path`` that then replaces it, so a
    reader (or a later ``import``) never sees half an export. The file is readable by
    its owner only: user data and vendor data may hold secrets.
    """
    path = Path(path)
    text = dump_inventory(inventory, fmt or format_of(path) or "yaml")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InventoryError(f"cannot write: {exc.strerror}", source=str(path)) from exc
