"""Reading inventories: text or a decoded document into validated model objects.

:func:`parse_inventory` is pure; :func:`load_inventory` reads a file first. Every
kind of entry is parsed by its table in :mod:`.schema`; what is checked here is what
spans entries: one id per entry, and no IP or MAC used by two instances on one
network. Every problem is an InventoryError that names the file, the entry
(``instances[0] (web-1)``) and the field (``ports[0].ips[0]``). Unknown fields are
errors, so a typo never silently drops data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meta169.errors import InventoryError
from meta169.inventory.schema import ENTRIES, Inventory, Kind, Where, check_mapping, type_name
from meta169.inventory.text import Format, load_text
from meta169.model import Instance, IPAddress


def load_inventory(path: str | Path, fmt: Format | None = None) -> Inventory:
    """Read and parse an inventory file; the format comes from the extension, else sniffed."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InventoryError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", source=source) from exc
    except OSError as exc:
        raise InventoryError(f"cannot read: {exc.strerror}", source=source) from exc
    return parse_inventory(text, source=source, fmt=fmt or format_of(path))


def format_of(path: Path) -> Format | None:
    """The format a file name says (``.json``, ``.yaml``, ``.yml``), else None."""
    suffix = path.suffix.lower()
    return "json" if suffix == ".json" else "yaml" if suffix in (".yaml", ".yml") else None


def parse_inventory(text: str, *, source: str = "<inventory>", fmt: Format | None = None) -> Inventory:
    """Parse inventory text (YAML or JSON; sniffed when ``fmt`` is None) into model objects."""
    return parse_document(load_text(text, source=source, fmt=fmt), source=source)


def parse_document(document: object, *, source: str = "<inventory>") -> Inventory:
    """Parse a decoded document (what YAML or JSON gave) into model objects."""
    top = Where(source)
    if document is None:
        return Inventory(source=source)
    document = check_mapping(document, tuple(key for key, _ in ENTRIES), top)
    parsed = {key: _parse_entries(document.get(key), key, kind, source) for key, kind in ENTRIES}
    for key, kind in ENTRIES:
        _check_unique(source, key, kind, parsed[key])
    _check_addresses(source, parsed["instances"])
    return Inventory(source=source, **{key: tuple(obj for obj, _ in entries) for key, entries in parsed.items()})


def _parse_entries(value: object, key: str, kind: Kind[Any], source: str) -> list[tuple[Any, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        (Where(source) / key).fail(f"must be a list, not {type_name(value)}")
    result = []
    for index, raw in enumerate(value):
        name = raw.get(kind.label) if isinstance(raw, dict) else None
        entry = f"{key}[{index}] ({name})" if isinstance(name, str) and name else f"{key}[{index}]"
        result.append((kind.parse(raw, Where(source, entry)), entry))
    return result


def _check_unique(source: str, key: str, kind: Kind[Any], entries: list[tuple[Any, str]]) -> None:
    first: dict[str, str] = {}
    for obj, entry in entries:
        ident = kind.identify(obj)
        if ident in first:
            Where(source, entry, kind.ident).fail(f"{ident} is already defined by {key} entry {first[ident]}")
        first[ident] = entry


def _check_addresses(source: str, instances: list[tuple[Instance, str]]) -> None:
    # Two instances with one IP on one network make every request from that IP
    # ambiguous; the same MAC twice on a network breaks ARP. Refuse both here.
    ips: dict[tuple[str, IPAddress], tuple[str, str]] = {}
    macs: dict[tuple[str, str], tuple[str, str]] = {}
    for instance, entry in instances:
        where = Where(source, entry)
        for p_index, port in enumerate(instance.ports):
            at = where / "ports" / p_index
            owner = macs.setdefault((port.network_id, port.mac), (instance.uuid, entry))
            if owner[0] != instance.uuid:
                (at / "mac").fail(f"{port.mac} on {port.network_id} is also used by {owner[1]}")
            for i_index, ip in enumerate(port.ips):
                owner = ips.setdefault((port.network_id, ip), (instance.uuid, entry))
                if owner[0] != instance.uuid:
                    (at / "ips" / i_index).fail(f"{ip} on {port.network_id} is also used by {owner[1]}")
