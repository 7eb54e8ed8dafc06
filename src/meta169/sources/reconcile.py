"""Making the registry match one source, and only that source.

:func:`plan_sync` is pure: given what the registry holds (:class:`RegistryState`)
and what a source describes (an Inventory whose entries all carry that source), it
returns every write, in order, as an :class:`~meta169.inventory.ImportPlan`:

- objects the source describes are added, or changed when they differ;
- objects the source owns and no longer describes are removed (instances first, so
  their IPs are free; routers and networks last, once nothing uses them);
- objects other sources own are never written. Describing one of them (the same
  instance uuid, network or router id) or an IP one of their instances holds on the
  same network is a Conflict naming both sources and both objects, and nothing is
  written. The one way across is ``adopt``: an object the source describes and an
  adopted source owns changes hands (``meta169 sync ... --adopt inventory`` after
  switching from ``meta169 import``); what it does not describe stays where it is;
- instances the source holds but could not describe this time (``keep``: a Nova cell
  that does not answer lists its servers without their fields) are neither changed
  nor removed: a read that is known to be partial never prunes.

:func:`sync_registry` reads the registry, plans, and applies the plan (or, for a dry
run, only plans). The plan is checked as a whole before the first write; each write
is one registry transaction, so a failure midway leaves a prefix that the next sync
completes (a sync is idempotent: an unchanged source writes nothing and does not
move the registry revision).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from meta169.errors import Conflict
from meta169.inventory import Change, ImportPlan, ImportReport, Inventory, apply_plan
from meta169.inventory.apply import KindName, plan_kind
from meta169.inventory.schema import Where
from meta169.model import Instance, IPAddress, Network, Router, check_source
from meta169.registry.base import Registry
from meta169.registry.integrity import PortOwner, narrows, require_ports_within

M = TypeVar("M", Network, Router, Instance)


@dataclass(frozen=True, slots=True)
class RegistryState:
    """Everything the registry holds, read once for a plan."""

    networks: tuple[Network, ...] = ()
    routers: tuple[Router, ...] = ()
    instances: tuple[Instance, ...] = ()

    @classmethod
    def read(cls, registry: Registry) -> RegistryState:
        return cls(
            networks=tuple(registry.list_networks()),
            routers=tuple(registry.list_routers()),
            instances=tuple(registry.list_instances()),
        )


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a sync planned, and what applying it did (None for a dry run)."""

    source: str
    plan: ImportPlan
    report: ImportReport | None

    @property
    def changed(self) -> bool:
        return bool(self.plan.changes)


def stamp(inventory: Inventory, source: str) -> Inventory:
    """``inventory`` with every network, router and instance owned by ``source``."""
    check_source(source)
    return dataclasses.replace(
        inventory,
        networks=tuple(dataclasses.replace(n, source=source) for n in inventory.networks),
        routers=tuple(dataclasses.replace(r, source=source) for r in inventory.routers),
        instances=tuple(dataclasses.replace(i, source=source) for i in inventory.instances),
    )


def sync_registry(
    registry: Registry,
    desired: Inventory,
    source: str,
    *,
    dry_run: bool = False,
    adopt: Iterable[str] = (),
    keep: Iterable[str] = (),
) -> SyncResult:
    """Make ``registry`` match ``desired`` for ``source``; see the module docstring."""
    plan = plan_sync(RegistryState.read(registry), desired, source, adopt=adopt, keep=keep)
    if dry_run:
        return SyncResult(source, plan, None)
    return SyncResult(source, plan, apply_plan(registry, plan))


def plan_sync(
    state: RegistryState,
    desired: Inventory,
    source: str,
    *,
    adopt: Iterable[str] = (),
    keep: Iterable[str] = (),
) -> ImportPlan:
    """Every write that makes ``state`` match ``desired`` for ``source``, checked.

    Raises Conflict when ``desired`` touches what another source owns (unless that
    source is in ``adopt`` and the object is one ``desired`` describes), and
    InventoryError (naming the source and the entry) when it refers to a network
    that will not exist or puts an IP outside its network or twice on one network,
    and Conflict when a network it changes leaves out the address of a port of an
    instance that stays as it is.
    The instances of ``source`` whose uuids are in ``keep`` stay as they are, and
    count as another owner's for those checks (their IPs and networks stay theirs).
    """
    check_source(source)
    kept_uuids = frozenset(keep) - {i.uuid for i in desired.instances}
    adopted = frozenset(adopt)
    for other in adopted:
        check_source(other)
    everything: tuple[Network | Router | Instance, ...] = (*desired.networks, *desired.routers, *desired.instances)
    for obj in everything:
        if obj.source != source:
            # A programming error in a source reader, not bad data.
            raise ValueError(f"{source}: {_describe(obj)} carries source {obj.source!r}")
    networks = {n.id: n for n in state.networks}
    routers = {r.id: r for r in state.routers}
    instances = {i.uuid: i for i in state.instances}
    _check_owners("network", desired.networks, networks, source, adopted)
    _check_owners("router", desired.routers, routers, source, adopted)
    _check_owners("instance", desired.instances, instances, source, adopted)
    # What changes hands counts as the source's from here on (its IPs are no one
    # else's); the plan still compares with what is stored, so the owner is written.
    state = RegistryState(
        _adopting(state.networks, {n.id for n in desired.networks}, source),
        _adopting(state.routers, {r.id for r in desired.routers}, source),
        _adopting(state.instances, {i.uuid for i in desired.instances}, source),
    )

    wanted_networks = {n.id: n for n in desired.networks}
    wanted_routers = {r.id for r in desired.routers}
    # Not described this time, and not to be removed for it.
    wanted_instances = {i.uuid for i in desired.instances} | kept_uuids
    kept_networks = {nid: n for nid, n in networks.items() if n.source != source}
    usable = {**kept_networks, **wanted_networks}
    gone_networks = {nid for nid, n in networks.items() if n.source == source and nid not in wanted_networks}
    kept_instances = [i for i in state.instances if i.source != source or i.uuid in kept_uuids]
    kept_routers = [r for r in state.routers if r.source != source]

    _check_desired_references(desired, usable, gone_networks, kept_instances)
    _check_removals(gone_networks, kept_instances, kept_routers)
    _check_narrowed(networks, desired.networks, kept_instances)

    unchanged: dict[KindName, int] = {}
    changes: list[Change] = [
        Change("remove", "instance", i.uuid, i.name)
        for i in state.instances
        if i.source == source and i.uuid not in wanted_instances
    ]
    # Owners were checked above, adoption included.
    changes += plan_kind("network", desired.networks, lambda n: n.id, networks, unchanged, check_owner=False)
    changes += plan_kind("router", desired.routers, lambda r: r.id, routers, unchanged, check_owner=False)
    changes += plan_kind("instance", desired.instances, lambda i: i.uuid, instances, unchanged, check_owner=False)
    changes += [
        Change("remove", "router", r.id) for r in state.routers if r.source == source and r.id not in wanted_routers
    ]
    changes += [Change("remove", "network", nid) for nid in sorted(gone_networks)]
    return ImportPlan(tuple(changes), unchanged, prune=True)


def _describe(obj: Network | Router | Instance) -> str:
    if isinstance(obj, Instance):
        return f"instance {obj.uuid} ({obj.name})"
    kind = "network" if isinstance(obj, Network) else "router"
    return f"{kind} {obj.id}"


def _adopting(current: Sequence[M], described: set[str], source: str) -> tuple[M, ...]:
    """``current`` with the objects ``described`` owned by ``source``."""
    return tuple(
        dataclasses.replace(obj, source=source)
        if (obj.uuid if isinstance(obj, Instance) else obj.id) in described
        else obj
        for obj in current
    )


def _check_owners(
    kind: KindName, wanted: Sequence[M], current: Mapping[str, M], source: str, adopted: frozenset[str]
) -> None:
    seen: set[str] = set()
    for obj in wanted:
        ident = obj.uuid if isinstance(obj, Instance) else obj.id
        if ident in seen:
            Where(source, _describe(obj)).fail(f"{source} describes {kind} {ident} twice")
        seen.add(ident)
        before = current.get(ident)
        if before is not None and before.source != source and before.source not in adopted:
            raise Conflict(
                f"{_describe(obj)} from {source} is already in the registry from {before.source} "
                f"(as {_describe(before)}); a sync changes only what its own source owns: remove it "
                f"there first, or take it over with --adopt {before.source}"
            )


def _check_desired_references(
    desired: Inventory,
    usable: Mapping[str, Network],
    gone: set[str],
    kept_instances: Iterable[Instance],
) -> None:
    source = desired.source

    def unknown(network_id: str) -> str:
        if network_id in gone:
            return f"network {network_id!r} is no longer in {source}, so this sync removes it"
        return f"unknown network {network_id!r}: it is neither in {source} nor in the registry"

    for router in desired.routers:
        for index, net in enumerate(router.network_ids):
            if net not in usable:
                (Where(source, f"router {router.id}") / "networks" / index).fail(unknown(net))
    others: dict[tuple[str, IPAddress], Instance] = {}
    for other in kept_instances:
        for port in other.ports:
            for ip in port.ips:
                others.setdefault((port.network_id, ip), other)
    claimed: dict[tuple[str, IPAddress], Instance] = {}
    for instance in desired.instances:
        entry = Where(source, f"instance {instance.name} ({instance.uuid})")
        for p_index, port in enumerate(instance.ports):
            at = entry / "ports" / p_index
            network = usable.get(port.network_id)
            if network is None:
                (at / "network").fail(unknown(port.network_id))
            for i_index, ip in enumerate(port.ips):
                where = at / "ips" / i_index
                if network.subnets and network.subnet_for(ip) is None:
                    cidrs = ", ".join(str(s.cidr) for s in network.subnets)
                    where.fail(f"{ip} is in no subnet of network {network.id} ({cidrs})")
                holder = others.get((port.network_id, ip))
                if holder is not None:
                    raise Conflict(
                        f"{_describe(instance)} from {source}: IP {ip} on network {port.network_id} "
                        f"already belongs to {_describe(holder)} from {holder.source}"
                    )
                first = claimed.setdefault((port.network_id, ip), instance)
                if first is not instance:
                    where.fail(f"{ip} on network {port.network_id} is also given to {_describe(first)}")


def _check_narrowed(
    stored: Mapping[str, Network], wanted: Iterable[Network], kept_instances: Iterable[Instance]
) -> None:
    """A network the sync changes keeps the addresses of the ports on it of the
    instances that stay as they are (other sources', and those ``keep`` names)."""
    narrowed = {n.id: n for n in wanted if narrows(stored.get(n.id), n)}
    if not narrowed:
        return
    owners: list[PortOwner] = []
    names: dict[str, str] = {}
    for instance in kept_instances:
        for port in instance.ports:
            if port.network_id in narrowed:
                owners += [(port.network_id, str(ip), instance.uuid) for ip in port.ips]
                names[instance.uuid] = instance.name
    require_ports_within(narrowed, owners, lambda _: names)


def _check_removals(gone: set[str], kept_instances: Iterable[Instance], kept_routers: Iterable[Router]) -> None:
    for instance in kept_instances:
        for port in instance.ports:
            if port.network_id in gone:
                raise Conflict(
                    f"network {port.network_id} is gone from its source, but {_describe(instance)} "
                    f"from {instance.source} still has a port on it"
                )
    for router in kept_routers:
        for net in router.network_ids:
            if net in gone:
                raise Conflict(
                    f"network {net} is gone from its source, but router {router.id} from {router.source} "
                    f"is still attached to it"
                )
