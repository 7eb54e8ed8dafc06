"""Administration: inventory import (and, later, listing and the admin API).

Owns turning operator files into model objects and writing them to a registry.
Knows the Registry protocol, never a backend, and nothing of HTTP or the CLI.
"""

from meta169.admin.inventory import (
    ImportReport,
    Inventory,
    KindCounts,
    apply_inventory,
    format_import_report,
    load_inventory,
    parse_inventory,
)

__all__ = [
    "ImportReport",
    "Inventory",
    "KindCounts",
    "apply_inventory",
    "format_import_report",
    "load_inventory",
    "parse_inventory",
]
