"""Writing an inventory into a registry, idempotently, after checking every reference.

Objects are matched by the kind's ``ident`` field (uuid for instances) and written only
when they differ, so re-importing an unchanged file changes nothing, not even the
registry revision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TypeVar

from meta169.errors import AmbiguousCaller, NotFound
from meta169.inventory.schema import INSTANCE, NETWORK, ROUTER, Inventory, Where
from meta169.model import Caller, IPAddress, Network
from meta169.registry.base import Registry

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KindCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What :func:`apply_inventory` did per kind, and the registry revision after it."""

    networks: KindCounts = field(default_factory=KindCounts)
    routers: KindCounts = field(default_factory=KindCounts)
    instances: KindCounts = field(default_factory=KindCounts)
    revision: int = 0

    @property
    def changed(self) -> int:
        return sum(k.created + k.updated for k in (self.networks, self.routers, self.instances))


def format_import_report(report: ImportReport) -> str:
    """One line per kind, for the CLI."""
    return (
        "\n".join(
            f"{kind}: {c.created} created, {c.updated} updated, {c.unchanged} unchanged"
            for kind, c in (
                ("networks", report.networks),
                ("routers", report.routers),
                ("instances", report.instances),
            )
        )
        + f"\nregistry revision: {report.revision}"
    )


def apply_inventory(registry: Registry, inventory: Inventory) -> ImportReport:
    """Write ``inventory`` into ``registry``: networks, then routers, then instances.

    Idempotent: objects are matched by id (uuid for instances) and written only when
    they differ, so an unchanged object does not bump the registry revision. Every
    reference is checked before the first write: a port or router naming a network
    that is neither in the inventory nor in the registry, a port IP outside its
    network's subnets, or an IP another registered instance already owns on that
    network raise InventoryError and nothing is written. Objects in the registry but
    not in the inventory are left alone.
    """
    networks = {n.id: n for n in registry.list_networks()}
    routers = {r.id: r for r in registry.list_routers()}
    if len(inventory.instances) > _BULK_INSTANCES:
        # One list beats a get and a resolve per instance once the file is large.
        everything = registry.list_instances()
        instances = {i.uuid: i for i in everything}
        owners: dict[tuple[str, IPAddress], list[tuple[str, str]]] = {}
        for known in everything:
            for port in known.ports:
                for ip in port.ips:
                    owners.setdefault((port.network_id, ip), []).append((known.uuid, known.name))

        def owner_of(network_id: str, ip: IPAddress) -> list[tuple[str, str]]:
            return owners.get((network_id, ip), [])

    else:
        instances = {}
        for wanted in inventory.instances:
            with suppress(NotFound):
                instances[wanted.uuid] = registry.get_instance(wanted.uuid)

        def owner_of(network_id: str, ip: IPAddress) -> list[tuple[str, str]]:
            try:
                found = registry.resolve(Caller(ip, network_id=network_id))
            except NotFound:
                return []
            except AmbiguousCaller as exc:
                return [(uuid, "") for uuid in exc.uuids]
            return [(found.uuid, found.name)]

    _check_references(inventory, {**networks, **{n.id: n for n in inventory.networks}}, owner_of)
    return ImportReport(
        networks=_apply_kind(inventory.networks, NETWORK.identify, networks, registry.put_network),
        routers=_apply_kind(inventory.routers, ROUTER.identify, routers, registry.put_router),
        instances=_apply_kind(inventory.instances, INSTANCE.identify, instances, registry.put_instance),
        revision=registry.revision(),
    )


# Above this many instances, apply_inventory lists the registry once.
_BULK_INSTANCES = 20


def _apply_kind(
    objects: Sequence[T],
    key: Callable[[T], str],
    current: Mapping[str, T],
    put: Callable[[T], None],
) -> KindCounts:
    created = updated = unchanged = 0
    for obj in objects:
        before = current.get(key(obj))
        if before is None:
            created += 1
        elif before == obj:
            unchanged += 1
            continue
        else:
            updated += 1
        put(obj)
    return KindCounts(created=created, updated=updated, unchanged=unchanged)


def _check_references(
    inventory: Inventory,
    networks: Mapping[str, Network],
    owner_of: Callable[[str, IPAddress], list[tuple[str, str]]],
) -> None:
    source = inventory.source
    for index, router in enumerate(inventory.routers):
        for n_index, net in enumerate(router.network_ids):
            if net not in networks:
                (Where(source, f"routers[{index}] ({router.id})") / "networks" / n_index).fail(
                    f"unknown network {net!r}: define it under networks"
                )
    uuids = {i.uuid for i in inventory.instances}
    for index, instance in enumerate(inventory.instances):
        entry = Where(source, f"instances[{index}] ({instance.name})")
        for p_index, port in enumerate(instance.ports):
            at = entry / "ports" / p_index
            network = networks.get(port.network_id)
            if network is None:
                (at / "network").fail(f"unknown network {port.network_id!r}: define it under networks")
            for i_index, ip in enumerate(port.ips):
                where = at / "ips" / i_index
                if network.subnets and network.subnet_for(ip) is None:
                    cidrs = ", ".join(str(s.cidr) for s in network.subnets)
                    where.fail(f"{ip} is in no subnet of network {network.id} ({cidrs})")
                # An owner that is itself in the inventory is being rewritten anyway.
                others = [
                    f"{uuid} ({name})" if name else uuid
                    for uuid, name in owner_of(port.network_id, ip)
                    if uuid not in uuids
                ]
                if others:
                    where.fail(f"{ip} on {port.network_id} already belongs to instance {', '.join(others)}")
