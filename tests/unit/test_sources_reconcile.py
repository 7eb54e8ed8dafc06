"""plan_sync, the pure core of every sync: what it writes, in which order, and what it
refuses because another source owns it."""

from __future__ import annotations

import dataclasses

import pytest

from meta169.errors import Conflict, InventoryError
from meta169.inventory import Inventory
from meta169.model import Instance, Network, Port, Router, Subnet, parse_ip, parse_network
from meta169.registry.memory import MemoryRegistry
from meta169.sources.reconcile import RegistryState, plan_sync, stamp, sync_registry

SRC = "libvirt:qemu:///system"
OTHER = "inventory"
U1, U2, U3 = (f"00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3))


def net(ident: str = "net-a", source: str = SRC, cidr: str = "10.0.0.0/24") -> Network:
    return Network(ident, subnets=(Subnet(parse_network(cidr)),), source=source)


def vm(uuid: str, name: str, ip: str = "", source: str = SRC, network: str = "net-a", **kw: object) -> Instance:
    ports = (Port(network, f"52:54:00:00:00:{uuid[-2:]}", (parse_ip(ip),)),) if ip else ()
    return Instance(uuid=uuid, name=name, ports=ports, source=source, **kw)  # type: ignore[arg-type]


def plan(state: RegistryState, *objects: Network | Router | Instance, adopt: tuple[str, ...] = ()) -> list[str]:
    desired = Inventory(
        source=SRC,
        networks=tuple(o for o in objects if isinstance(o, Network)),
        routers=tuple(o for o in objects if isinstance(o, Router)),
        instances=tuple(o for o in objects if isinstance(o, Instance)),
    )
    return [str(c) for c in plan_sync(state, desired, SRC, adopt=adopt).changes]


@pytest.mark.parametrize(
    ("state", "desired", "expected"),
    [
        pytest.param(RegistryState(), (net(), vm(U1, "a", "10.0.0.5")), ["add network net-a", f"add instance {U1} (a)"],
                     id="empty-registry"),
        pytest.param(RegistryState((net(),), (), (vm(U1, "a", "10.0.0.5"),)), (net(), vm(U1, "a", "10.0.0.5")), [],
                     id="unchanged"),
        pytest.param(RegistryState((net(),), (), (vm(U1, "a", "10.0.0.5"),)), (net(), vm(U1, "a", "10.0.0.6")),
                     [f"change instance {U1} (a): ports"], id="changed-ip"),
        # Removed first, so the IP it frees can go to the new instance in the same sync.
        pytest.param(RegistryState((net(),), (), (vm(U1, "a", "10.0.0.5"),)), (net(), vm(U2, "b", "10.0.0.5")),
                     [f"remove instance {U1} (a)", f"add instance {U2} (b)"], id="ip-moves-to-a-new-instance"),
        pytest.param(RegistryState((net(), net("net-b", cidr="10.1.0.0/24")), (Router("r", ("net-b",), source=SRC),),
                                   (vm(U1, "a", "10.1.0.5", network="net-b"),)), (net(),),
                     [f"remove instance {U1} (a)", "remove router r", "remove network net-b"], id="removal-order"),
        pytest.param(RegistryState((net(source=OTHER),), (), (vm(U3, "mine", "10.0.0.9", source=OTHER),)),
                     (vm(U1, "a", "10.0.0.5"),), [f"add instance {U1} (a)"], id="uses-another-source-network"),
        pytest.param(RegistryState((net(),), (), (vm(U3, "theirs", source=OTHER),)), (net(),), [],
                     id="never-removes-another-source-instance"),
    ],
)  # fmt: skip
def test_sources_reconcile_plans(state: RegistryState, desired: tuple[object, ...], expected: list[str]) -> None:
    assert plan(state, *desired) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "desired", "message"),
    [
        pytest.param(RegistryState((net(),), (), (vm(U1, "theirs", source=OTHER),)), (net(), vm(U1, "mine")),
                     rf"instance {U1} \(mine\) from {SRC} is already in the registry from inventory "
                     rf"\(as instance {U1} \(theirs\)\)", id="same-uuid"),
        pytest.param(RegistryState((net(),), (), (vm(U3, "theirs", "10.0.0.5", source=OTHER),)),
                     (net(), vm(U1, "mine", "10.0.0.5")),
                     rf"instance {U1} \(mine\) from {SRC}: IP 10.0.0.5 on network net-a already belongs to "
                     rf"instance {U3} \(theirs\) from inventory", id="same-ip"),
        pytest.param(RegistryState((net(source=OTHER),)), (net(),), "network net-a from .* from inventory",
                     id="same-network"),
        pytest.param(RegistryState((net(),), (), (vm(U3, "theirs", "10.0.0.5", source=OTHER),)), (),
                     f"network net-a is gone from its source, but instance {U3} \\(theirs\\) from inventory",
                     id="network-still-used-by-another-source"),
    ],
)  # fmt: skip
def test_sources_reconcile_conflicts_name_both_sides(
    state: RegistryState, desired: tuple[object, ...], message: str
) -> None:
    with pytest.raises(Conflict, match=message):
        plan(state, *desired)  # type: ignore[arg-type]


def test_sources_reconcile_bad_references_name_the_entry() -> None:
    with pytest.raises(InventoryError) as unknown:
        plan(RegistryState(), vm(U1, "a", "10.0.0.5", network="nowhere"))
    assert (unknown.value.entry, unknown.value.field) == (f"instance a ({U1})", "ports[0].network")
    with pytest.raises(InventoryError, match=r"10.9.0.5 is in no subnet of network net-a \(10.0.0.0/24\)"):
        plan(RegistryState(), net(), vm(U1, "a", "10.9.0.5"))
    with pytest.raises(InventoryError, match=f"10.0.0.5 on network net-a is also given to instance {U1}"):
        plan(RegistryState(), net(), vm(U1, "a", "10.0.0.5"), vm(U2, "b", "10.0.0.5"))
    with pytest.raises(InventoryError, match="no longer in"):
        plan(RegistryState((net(),)), vm(U1, "a", "10.0.0.5"))
    with pytest.raises(InventoryError, match="unknown network 'net-x'"):
        plan(RegistryState(), Router("r", ("net-x",), source=SRC))


def test_sources_reconcile_adopt_takes_over_only_what_the_source_describes() -> None:
    state = RegistryState(
        (net(source=OTHER),), (), (vm(U1, "a", "10.0.0.5", source=OTHER), vm(U3, "keep", source=OTHER))
    )
    changes = plan(state, net(), vm(U1, "a", "10.0.0.5"), adopt=(OTHER,))
    assert changes == ["change network net-a: source", f"change instance {U1} (a): source"]
    with pytest.raises(Conflict):
        plan(state, net(), vm(U1, "a", "10.0.0.5"), adopt=("admin",))


def test_sources_reconcile_refuses_entries_of_another_source() -> None:
    with pytest.raises(ValueError, match="carries source"):
        plan(RegistryState(), vm(U1, "a", source="admin"))


def test_sources_reconcile_sync_applies_and_dry_run_writes_nothing() -> None:
    registry = MemoryRegistry()
    desired = stamp(Inventory(source=SRC, networks=(net(source=OTHER),), instances=(vm(U1, "a", "10.0.0.5"),)), SRC)
    assert all(o.source == SRC for o in (*desired.networks, *desired.instances))
    dry = sync_registry(registry, desired, SRC, dry_run=True)
    assert (dry.report, registry.revision()) == (None, 0)
    done = sync_registry(registry, desired, SRC)
    assert done.report is not None and done.report.instances.created == 1
    revision = registry.revision()
    assert sync_registry(registry, desired, SRC).changed is False
    assert registry.revision() == revision
    emptied = sync_registry(registry, dataclasses.replace(desired, networks=(), instances=()), SRC)
    assert [str(c) for c in emptied.plan.changes] == [f"remove instance {U1} (a)", "remove network net-a"]
    assert registry.list_instances() == [] and registry.list_networks() == []


def test_sources_reconcile_keep_neither_changes_nor_removes_what_could_not_be_read() -> None:
    # U1 is in a Nova cell that does not answer: not described, yet not gone.
    state = RegistryState((net(),), (), (vm(U1, "a", "10.0.0.5"), vm(U2, "b", "10.0.0.6")))
    desired = Inventory(source=SRC, networks=(net(),))
    assert [str(c) for c in plan_sync(state, desired, SRC, keep=(U1,)).changes] == [f"remove instance {U2} (b)"]
    # Its address stays its own, and its network stays while it is on it.
    taker = Inventory(source=SRC, networks=(net(),), instances=(vm(U3, "c", "10.0.0.5"),))
    with pytest.raises(Conflict, match=rf"IP 10\.0\.0\.5 on network net-a already belongs to instance {U1} \(a\)"):
        plan_sync(state, taker, SRC, keep=(U1,))
    with pytest.raises(Conflict, match=rf"network net-a is gone from its source, but instance {U1} \(a\)"):
        plan_sync(state, Inventory(source=SRC), SRC, keep=(U1,))
    # Described after all: an ordinary instance of the source.
    again = Inventory(source=SRC, networks=(net(),), instances=(vm(U1, "a", "10.0.0.7"),))
    assert [str(c) for c in plan_sync(state, again, SRC, keep=(U1,)).changes] == [
        f"remove instance {U2} (b)",
        f"change instance {U1} (a): ports",
    ]
