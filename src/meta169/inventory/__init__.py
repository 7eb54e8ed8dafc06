"""The inventory: the YAML/JSON document of networks, routers and instances.

Owns the format and both directions of it: one declared table of fields per kind
(:mod:`.schema`), reading text into validated model objects (:mod:`.parse`), writing
objects or a whole registry back as a document ``import`` accepts (:mod:`.dump`), the
text itself (:mod:`.text`), and writing an inventory into a registry idempotently
(:mod:`.apply`). ``meta169 import``, ``meta169 export``, ``instance show`` and the
admin API's bodies all go through here, so they agree field for field.

Knows the model, the error tree and the Registry protocol, never a backend. Knows
nothing of HTTP, the metadata API, the proxy, the admin API or the command line:
those call in, never the other way.
"""

from meta169.inventory.apply import (
    Change,
    ImportPlan,
    ImportReport,
    KindCounts,
    apply_inventory,
    apply_plan,
    format_import_report,
    format_plan,
    plan_inventory,
)
from meta169.inventory.dump import (
    dump_inventory,
    export_inventory,
    instance_to_dict,
    inventory_to_document,
    network_to_dict,
    router_to_dict,
    save_inventory,
)
from meta169.inventory.parse import load_inventory, parse_document, parse_inventory
from meta169.inventory.schema import Inventory
from meta169.inventory.text import Format

__all__ = [
    "Change",
    "Format",
    "ImportPlan",
    "ImportReport",
    "Inventory",
    "KindCounts",
    "apply_inventory",
    "apply_plan",
    "dump_inventory",
    "export_inventory",
    "format_import_report",
    "format_plan",
    "instance_to_dict",
    "inventory_to_document",
    "load_inventory",
    "network_to_dict",
    "parse_document",
    "parse_inventory",
    "plan_inventory",
    "router_to_dict",
    "save_inventory",
]
