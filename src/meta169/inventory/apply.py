"""Writing an inventory into a registry, idempotently, after checking every reference.

Objects are matched by the kind's ``ident`` field (uuid for instances) and written only
when they differ, so re-importing an unchanged file changes nothing, not even the
registry revision.

An import is planned first (:func:`plan_inventory`, which reads the registry and
checks everything) and written second (:func:`apply_plan`, one transaction for the
whole plan); ``--dry-run`` shows the plan. Both take time linear in the sizes of the
inventory and the registry: one read of each, dictionaries, then one batch. With
``prune`` the registry becomes equal to the inventory: instances it does not list
are removed, and networks and routers too, once nothing left uses them (removing
an instance is what frees its IP for a new one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from meta169.errors import AmbiguousCaller, Conflict, NotFound
from meta169.inventory.schema import INSTANCE, NETWORK, ROUTER, Inventory, Where
from meta169.model import DEFAULT_SOURCE, Caller, Instance, IPAddress, Network, Router
from meta169.registry.base import Batch, Registry
from meta169.registry.integrity import narrows, require_ports_within

M = TypeVar("M", Network, Router, Instance)

Action = Literal["add", "change", "remove"]
KindName = Literal["network", "router", "instance"]


@dataclass(frozen=True, slots=True)
class KindCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What :func:`apply_inventory` did per kind, and the registry revision after it."""

    networks: KindCounts = field(default_factory=KindCounts)
    routers: KindCounts = field(default_factory=KindCounts)
    instances: KindCounts = field(default_factory=KindCounts)
    revision: int = 0
    # Whether objects the inventory does not list were removed (--prune).
    pruned: bool = False

    @property
    def changed(self) -> int:
        return sum(k.created + k.updated + k.removed for k in (self.networks, self.routers, self.instances))


def format_import_report(report: ImportReport) -> str:
    """One line per kind, for the CLI."""
    return (
        "\n".join(
            f"{kind}: {c.created} created, {c.updated} updated, {c.unchanged} unchanged"
            + (f", {c.removed} removed" if report.pruned else "")
            for kind, c in (
                ("networks", report.networks),
                ("routers", report.routers),
                ("instances", report.instances),
            )
        )
        + f"\nregistry revision: {report.revision}"
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One write of an import: add, change or remove one object."""

    action: Action
    kind: KindName
    ident: str
    name: str = ""
    # For a change: the fields that differ.
    fields: tuple[str, ...] = ()
    # What to write (None for a removal).
    value: Network | Router | Instance | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        text = f"{self.action} {self.kind} {self.ident}"
        if self.name and self.name != self.ident:
            text += f" ({self.name})"
        if self.fields:
            text += f": {', '.join(self.fields)}"
        return text


@dataclass(frozen=True, slots=True)
class ImportPlan:
    """Every write an import makes, in the order it makes them, checked already."""

    changes: tuple[Change, ...] = ()
    unchanged: Mapping[KindName, int] = field(default_factory=dict)
    prune: bool = False

    def report(self, revision: int) -> ImportReport:
        def counts(kind: KindName) -> KindCounts:
            actions = [c.action for c in self.changes if c.kind == kind]
            return KindCounts(
                created=actions.count("add"),
                updated=actions.count("change"),
                unchanged=self.unchanged.get(kind, 0),
                removed=actions.count("remove"),
            )

        return ImportReport(
            networks=counts("network"),
            routers=counts("router"),
            instances=counts("instance"),
            revision=revision,
            pruned=self.prune,
        )


def format_plan(plan: ImportPlan) -> str:
    """What a dry run shows: one line per write, then the totals."""
    lines = [str(change) for change in plan.changes]
    actions = [c.action for c in plan.changes]
    lines.append(
        f"dry run: {actions.count('add')} to add, {actions.count('change')} to change, "
        f"{actions.count('remove')} to remove, {sum(plan.unchanged.values())} unchanged; nothing written"
    )
    return "\n".join(lines)


def apply_inventory(registry: Registry, inventory: Inventory, *, prune: bool = False) -> ImportReport:
    """Write ``inventory`` into ``registry``: :func:`plan_inventory`, then :func:`apply_plan`."""
    return apply_plan(registry, plan_inventory(registry, inventory, prune=prune))


def apply_plan(registry: Registry, plan: ImportPlan) -> ImportReport:
    """Make the writes of ``plan`` as one batch (:meth:`Registry.apply_batch`): one
    transaction and one revision, instances removed first (their IPs and networks
    freed), then networks, routers and instances written, then routers and networks
    removed.

    All or nothing: a failure midway (a Conflict with a writer that got in since
    the plan was made, the database) writes none of it, and the registry stays as
    it was. An object already removed by someone else counts as removed. A plan
    without changes writes nothing, so the revision stays.
    """
    return plan.report(registry.apply_batch(plan_batch(plan)))


def plan_batch(plan: ImportPlan) -> Batch:
    """The registry writes of ``plan``."""
    stored: dict[KindName, list[Network | Router | Instance]] = {"network": [], "router": [], "instance": []}
    removed: dict[KindName, list[str]] = {"network": [], "router": [], "instance": []}
    for change in plan.changes:
        if change.action == "remove":
            removed[change.kind].append(change.ident)
        elif change.value is not None:
            stored[change.kind].append(change.value)
    return Batch(
        networks=[v for v in stored["network"] if isinstance(v, Network)],
        routers=[v for v in stored["router"] if isinstance(v, Router)],
        instances=[v for v in stored["instance"] if isinstance(v, Instance)],
        delete_instances=removed["instance"],
        delete_routers=removed["router"],
        delete_networks=removed["network"],
    )


def plan_inventory(
    registry: Registry, inventory: Inventory | Sequence[Inventory], *, prune: bool = False
) -> ImportPlan:
    """What writing ``inventory`` (or several, as one) into ``registry`` takes, after
    checking every reference.

    Idempotent: objects are matched by id (uuid for instances) and written only when
    they differ, so an unchanged object does not bump the registry revision. Every
    reference is checked before the first write: a port or router naming a network
    that is neither in the inventory nor in the registry, a port IP outside its
    network's subnets, or an IP another registered instance already owns on that
    network raise InventoryError and nothing is written; a network whose new subnets
    leave out the address of a port already on it (of an instance the inventory
    neither lists nor removes) is a Conflict naming them. Objects in the registry but
    not in the inventory are left alone, unless ``prune``: then they are removed,
    and a network the inventory does not define but one of its routers or ports
    names is an InventoryError naming that entry. Several inventories must not
    define one object twice or give one IP twice on a network.

    Sources: an entry owned by one source (``inventory`` unless it says otherwise)
    never replaces an object another source owns (Conflict, naming both), and
    ``prune`` removes only objects of the sources the entries carry; the instances
    of other sources keep their IPs and their networks.
    """
    parts = [inventory] if isinstance(inventory, Inventory) else list(inventory)
    inventory = _merge(parts)
    networks = {n.id: n for n in registry.list_networks()}
    routers = {r.id: r for r in registry.list_routers()}
    if prune or len(inventory.instances) > _BULK_INSTANCES:
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

    wanted_networks = {n.id: n for n in inventory.networks}
    rewritten = frozenset(i.uuid for i in inventory.instances)
    entries: list[Network | Router | Instance] = [*inventory.networks, *inventory.routers, *inventory.instances]
    scope = {e.source for e in entries} or {DEFAULT_SOURCE}
    kept_networks = {nid: n for nid, n in networks.items() if n.source not in scope}
    kept_owners: dict[tuple[str, IPAddress], list[tuple[str, str]]] = {}
    for known in instances.values() if prune else ():
        if known.source not in scope:
            for port in known.ports:
                for ip in port.ips:
                    kept_owners.setdefault((port.network_id, ip), []).append((known.uuid, known.name))
    for part in parts:  # each file's entries named by their place in that file
        if prune:
            # Every instance of the inventory's sources it does not list is removed,
            # freeing its IPs; other sources' instances keep theirs.
            _check_references(
                part,
                {**kept_networks, **wanted_networks},
                lambda network_id, ip: kept_owners.get((network_id, ip), []),
                rewritten,
                pruned=frozenset(networks) - set(wanted_networks) - set(kept_networks),
            )
        else:
            _check_references(part, {**networks, **wanted_networks}, owner_of, rewritten)
    unchanged: dict[KindName, int] = {}
    changes: list[Change] = []
    if prune:
        changes += [
            Change("remove", "instance", uuid, instances[uuid].name)
            for uuid in sorted(instances)
            if uuid not in rewritten and instances[uuid].source in scope
        ]
    changes += plan_kind("network", inventory.networks, NETWORK.identify, networks, unchanged)
    changes += plan_kind("router", inventory.routers, ROUTER.identify, routers, unchanged)
    changes += plan_kind("instance", inventory.instances, INSTANCE.identify, instances, unchanged)
    if prune:
        wanted_routers = {r.id for r in inventory.routers}
        gone = {r for r in routers if r not in wanted_routers and routers[r].source in scope}
        changes += [Change("remove", "router", rid) for rid in sorted(gone)]
        dropped = sorted(n for n in networks if n not in wanted_networks and networks[n].source in scope)
        _check_kept_users(dropped, instances.values(), [r for r in routers.values() if r.id not in gone], scope)
        changes += [Change("remove", "network", nid) for nid in dropped]
    _check_narrowed(registry, changes, networks, rewritten)
    return ImportPlan(tuple(changes), unchanged, prune)


def _check_narrowed(
    registry: Registry, changes: Sequence[Change], stored: Mapping[str, Network], rewritten: frozenset[str]
) -> None:
    """A network the import changes keeps the addresses of the ports on it of every
    instance the import neither rewrites nor removes (Conflict, naming them). The
    registry checks it again as it writes; checking here tells a dry run too."""
    narrowed = {
        c.ident: c.value
        for c in changes
        if c.kind == "network" and isinstance(c.value, Network) and narrows(stored.get(c.ident), c.value)
    }
    if not narrowed:
        return
    removed = {c.ident for c in changes if c.kind == "instance" and c.action == "remove"}
    require_ports_within(
        narrowed,
        (row for row in registry.port_owners(sorted(narrowed)) if row[2] not in rewritten and row[2] not in removed),
        lambda uuids: {i.uuid: i.name for i in registry.get_instances(uuids)},
    )


def _check_kept_users(
    dropped_networks: Sequence[str], instances: Iterable[Instance], routers: Iterable[Router], scope: set[str]
) -> None:
    """A network a prune removes must not be used by what another source owns."""
    dropped = frozenset(dropped_networks)
    for instance in instances:
        if instance.source in scope:
            continue
        for port in instance.ports:
            if port.network_id in dropped:
                raise Conflict(
                    f"network {port.network_id} is not in the inventory, but instance {instance.uuid} "
                    f"({instance.name}) from {instance.source} has a port on it"
                )
    for router in routers:
        for net in router.network_ids:
            if net in dropped:
                raise Conflict(f"network {net} is not in the inventory, but router {router.id} is attached to it")


# Above this many instances, planning lists the registry once.
_BULK_INSTANCES = 20


def plan_kind(
    kind: KindName,
    objects: Sequence[M],
    key: Callable[[M], str],
    current: Mapping[str, M],
    unchanged: dict[KindName, int],
    *,
    check_owner: bool = True,
) -> list[Change]:
    """The adds and changes that make ``current`` hold ``objects`` (matched by
    ``key``); counts the objects already equal in ``unchanged[kind]``.

    With ``check_owner``, an object stored from another source is a Conflict. A sync
    (:mod:`meta169.sources.reconcile`) checks owners itself, adoption included, and
    passes False.
    """
    changes: list[Change] = []
    unchanged[kind] = 0
    for obj in objects:
        ident = key(obj)
        name = obj.name if isinstance(obj, Instance) else ""
        before = current.get(ident)
        if check_owner and before is not None and before.source != obj.source:
            raise Conflict(
                f"{kind} {ident}{f' ({name})' if name else ''} from {obj.source} is already in the registry "
                f"from {before.source}; an import changes only what its own source owns"
            )
        if before is None:
            changes.append(Change("add", kind, ident, name, value=obj))
        elif before == obj:
            unchanged[kind] += 1
        else:
            differ = tuple(f.name for f in dataclasses.fields(obj) if getattr(before, f.name) != getattr(obj, f.name))
            changes.append(Change("change", kind, ident, name, differ, value=obj))
    return changes


def _merge(inventories: Sequence[Inventory]) -> Inventory:
    """One inventory of several files; InventoryError names an entry defined in two
    of them, or an IP two of them give on one network."""
    merged = list(inventories)
    if len(merged) == 1:
        return merged[0]
    seen: dict[tuple[str, str], str] = {}
    addresses: dict[tuple[str, IPAddress], str] = {}
    for inventory in merged:
        entries: list[tuple[str, str, str, str]] = [
            *(("network", n.id, f"networks[{i}] ({n.id})", "id") for i, n in enumerate(inventory.networks)),
            *(("router", r.id, f"routers[{i}] ({r.id})", "id") for i, r in enumerate(inventory.routers)),
            *(("instance", x.uuid, f"instances[{i}] ({x.name})", "uuid") for i, x in enumerate(inventory.instances)),
        ]
        for kind, ident, entry, key in entries:
            first = seen.setdefault((kind, ident), inventory.source)
            if first != inventory.source:
                Where(inventory.source, entry, key).fail(f"{kind} {ident} is also defined in {first}")
        for index, instance in enumerate(inventory.instances):
            for p_index, port in enumerate(instance.ports):
                for i_index, ip in enumerate(port.ips):
                    first = addresses.setdefault((port.network_id, ip), inventory.source)
                    if first != inventory.source:
                        (Where(inventory.source, f"instances[{index}] ({instance.name})") / "ports" / p_index / "ips"
                         / i_index).fail(f"{ip} on {port.network_id} is also given in {first}")  # fmt: skip
    return Inventory(
        source=", ".join(i.source for i in merged),
        networks=tuple(n for i in merged for n in i.networks),
        routers=tuple(r for i in merged for r in i.routers),
        instances=tuple(x for i in merged for x in i.instances),
    )


def _check_references(
    inventory: Inventory,
    networks: Mapping[str, Network],
    owner_of: Callable[[str, IPAddress], list[tuple[str, str]]],
    rewritten: frozenset[str],
    *,
    pruned: frozenset[str] = frozenset(),
) -> None:
    source = inventory.source

    def unknown(network_id: str) -> str:
        if network_id in pruned:
            return (
                f"network {network_id!r} is not in the inventory, so --prune would remove it: define it under networks"
            )
        return f"unknown network {network_id!r}: define it under networks"

    for index, router in enumerate(inventory.routers):
        for n_index, net in enumerate(router.network_ids):
            if net not in networks:
                (Where(source, f"routers[{index}] ({router.id})") / "networks" / n_index).fail(unknown(net))
    for index, instance in enumerate(inventory.instances):
        entry = Where(source, f"instances[{index}] ({instance.name})")
        for p_index, port in enumerate(instance.ports):
            at = entry / "ports" / p_index
            network = networks.get(port.network_id)
            if network is None:
                (at / "network").fail(unknown(port.network_id))
            for i_index, ip in enumerate(port.ips):
                where = at / "ips" / i_index
                if network.subnets and network.subnet_for(ip) is None:
                    cidrs = ", ".join(str(s.cidr) for s in network.subnets)
                    where.fail(f"{ip} is in no subnet of network {network.id} ({cidrs})")
                # An owner that is itself in the inventory is being rewritten anyway.
                others = [
                    f"{uuid} ({name})" if name else uuid
                    for uuid, name in owner_of(port.network_id, ip)
                    if uuid not in rewritten
                ]
                if others:
                    where.fail(f"{ip} on {port.network_id} already belongs to instance {', '.join(others)}")
