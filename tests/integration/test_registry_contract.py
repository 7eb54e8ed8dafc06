"""The Registry contract, run against every backend: memory, SQLite and PostgreSQL."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from meta169.errors import (
    AmbiguousCaller,
    Conflict,
    NotFound,
    UnknownCaller,
    ValidationError,
)
from meta169.model import (
    Caller,
    HostRoute,
    Instance,
    MetadataOptions,
    Network,
    Port,
    Router,
    SSHKey,
    Subnet,
)
from meta169.registry import Batch, Changes, Registry, open_registry
from meta169.registry.memory import MemoryRegistry

UUID_A = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
UUID_B = "0b6f3e1c-9d7a-4a51-8c3e-5f2d1a0b9c84"
UUID_C = "5e2c7a90-1b3d-4f6e-8a7c-9d0e1f2a3b4c"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def network(net_id: str, cidr: str = "10.0.0.0/24", **kw: object) -> Network:
    cidr_net = ipaddress.ip_network(cidr)
    gateway = ip(str(cidr_net.network_address + 1))
    return Network(
        id=net_id,
        subnets=(Subnet(cidr=cidr_net, gateway=gateway),),
        **kw,  # type: ignore[arg-type]
    )


def instance(uuid: str, name: str, *ports: tuple[str, str, str], **kw: object) -> Instance:
    return Instance(
        uuid=uuid,
        name=name,
        ports=tuple(Port(net, mac, (ip(addr),)) for net, mac, addr in ports),
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Backend:
    name: str
    open: Callable[..., Registry]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[Registry] = []
    if request.param == "memory":
        shared: dict[int, MemoryRegistry] = {}

        def opener(change_log_size: int = 10_000) -> Registry:
            # One store per test, like one database file: opening again returns it.
            return shared.setdefault(0, MemoryRegistry(change_log_size=change_log_size))
    else:
        url = (
            f"sqlite://{tmp_path / 'registry.db'}"
            if request.param == "sqlite"
            else str(request.getfixturevalue("postgres_url"))
        )

        def opener(change_log_size: int = 10_000) -> Registry:
            return open_registry(url, create=True, change_log_size=change_log_size)

    def open_tracked(**kw: int) -> Registry:
        registry = opener(**kw)
        opened.append(registry)
        return registry

    yield Backend(request.param, open_tracked)
    for registry in opened:
        registry.close()


@pytest.fixture
def registry(backend: Backend) -> Registry:
    return backend.open()


@pytest.fixture
def two_tenants(registry: Registry) -> Registry:
    """Two tenants with the same 10.0.0.0/24, each behind its own router."""
    registry.put_network(network("net-a", project_id="proj-a"))
    registry.put_network(network("net-b", project_id="proj-b"))
    registry.put_router(Router("router-a", ("net-a",)))
    registry.put_router(Router("router-b", ("net-b",)))
    registry.put_instance(instance(UUID_A, "web-a", ("net-a", "fa:16:3e:00:00:05", "10.0.0.5")))
    registry.put_instance(instance(UUID_B, "web-b", ("net-b", "fa:16:3e:00:01:05", "10.0.0.5")))
    return registry


# -- put / get / list / delete -------------------------------------------------------------


def test_registry_round_trips_every_field(registry: Registry) -> None:
    net4 = Network(
        id="net-a",
        project_id="proj-a",
        name="tenant A",
        mtu=1450,
        subnets=(
            Subnet(
                cidr=ipaddress.ip_network("10.0.0.0/24"),
                gateway=ip("10.0.0.1"),
                dhcp=False,
                dns=(ip("10.0.0.2"), ip("10.0.0.3")),
                host_routes=(HostRoute(ipaddress.ip_network("192.168.0.0/16"), ip("10.0.0.254")),),
            ),
            Subnet(
                cidr=ipaddress.ip_network("2001:db8::/64"),
                gateway=ip("2001:db8::1"),
                ipv6_mode="slaac",
            ),
        ),
    )
    registry.put_network(net4)
    router = Router("router-a", ("net-a",), project_id="proj-a")
    registry.put_router(router)
    full = Instance(
        uuid=UUID_A.upper(),
        name="Web 1",
        hostname="web-1.example.org",
        project_id="proj-a",
        availability_zone="az-2",
        region="north",
        instance_type="m1.large",
        image_id="img-1",
        launch_index=3,
        created_at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2))),
        metadata={"role": "web", "tier": "front"},
        keys=(SSHKey("ops", "ssh-ed25519 AAAA ops"), SSHKey("cert", "-----BEGIN-----", "x509")),
        user_data=b"\x00\x01binary\xff",
        vendor_data={"cloud-init": "#cloud-config\n", "nested": {"list": [1, 2.5, None, True]}},
        tags={"env": "prod"},
        security_groups=("default", "web"),
        ports=(
            Port("net-a", "FA:16:3E:00:00:05", (ip("10.0.0.5"), ip("2001:db8::5")), device_number=1),
            Port("net-a", "fa:16:3e:00:00:06", (ip("10.0.0.6"),), id="port-6", device_number=0),
        ),
        metadata_options=MetadataOptions(
            http_tokens="required", http_put_response_hop_limit=2, instance_metadata_tags="enabled"
        ),
        architecture="aarch64",
    )
    registry.put_instance(full)

    assert registry.get_network("net-a") == net4
    assert registry.get_router("router-a") == router
    stored = registry.get_instance(UUID_A)
    assert stored == full
    assert [p.ips for p in stored.ports] == [p.ips for p in full.ports]
    assert stored.created_at.utcoffset() == timedelta(hours=2)


def test_registry_round_trips_minimal_instance(registry: Registry) -> None:
    bare = Instance(uuid=UUID_A, name="bare")
    registry.put_instance(bare)
    stored = registry.get_instance(UUID_A)
    assert stored == bare
    assert stored.user_data is None
    assert stored.vendor_data is None
    assert stored.metadata_options is None


def test_registry_get_missing_raises_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound):
        registry.get_instance(UUID_A)
    with pytest.raises(NotFound):
        registry.get_network("net-x")
    with pytest.raises(NotFound):
        registry.get_router("router-x")


def test_registry_lists_are_sorted_by_id(two_tenants: Registry) -> None:
    registry = two_tenants
    assert [n.id for n in registry.list_networks()] == ["net-a", "net-b"]
    assert [r.id for r in registry.list_routers()] == ["router-a", "router-b"]
    assert [i.uuid for i in registry.list_instances()] == sorted([UUID_A, UUID_B])
    assert {i.uuid: i.ports for i in registry.list_instances()} == {
        UUID_A: registry.get_instance(UUID_A).ports,
        UUID_B: registry.get_instance(UUID_B).ports,
    }


def test_registry_delete_instance_removes_it_and_its_ips(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.delete_instance(UUID_A)
    with pytest.raises(NotFound):
        registry.get_instance(UUID_A)
    with pytest.raises(UnknownCaller):
        registry.resolve(Caller(ip("10.0.0.5"), network_id="net-a"))
    assert [i.uuid for i in registry.list_instances()] == [UUID_B]
    with pytest.raises(NotFound):
        registry.delete_instance(UUID_A)


def test_registry_delete_network_in_use_is_a_conflict(two_tenants: Registry) -> None:
    registry = two_tenants
    with pytest.raises(Conflict, match=UUID_A):
        registry.delete_network("net-a")
    registry.delete_instance(UUID_A)
    with pytest.raises(Conflict, match="router-a"):
        registry.delete_network("net-a")
    registry.delete_router("router-a")
    registry.delete_network("net-a")
    assert [n.id for n in registry.list_networks()] == ["net-b"]
    with pytest.raises(NotFound):
        registry.delete_network("net-a")
    with pytest.raises(NotFound):
        registry.delete_router("router-a")


def test_registry_refers_only_to_existing_networks(registry: Registry) -> None:
    before = registry.revision()
    with pytest.raises(Conflict, match="net-x"):
        registry.put_router(Router("router-a", ("net-x",)))
    with pytest.raises(Conflict, match="net-x"):
        registry.put_instance(instance(UUID_A, "web", ("net-x", "fa:16:3e:00:00:05", "10.0.0.5")))
    assert registry.revision() == before
    assert registry.list_routers() == []
    assert registry.list_instances() == []


def test_registry_put_network_replaces_subnets(registry: Registry) -> None:
    registry.put_network(network("net-a", "10.0.0.0/24"))
    registry.put_network(network("net-a", "10.9.0.0/16", name="renamed"))
    stored = registry.get_network("net-a")
    assert [str(s.cidr) for s in stored.subnets] == ["10.9.0.0/16"]
    assert stored.name == "renamed"
    assert len(registry.list_networks()) == 1


def test_registry_put_router_replaces_its_networks(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.put_router(Router("router-a", ("net-b",)))
    assert registry.get_router("router-a").network_ids == ("net-b",)
    assert registry.resolve(Caller(ip("10.0.0.5"), router_id="router-a")).uuid == UUID_B


def test_registry_put_instance_upsert_replaces_ports(two_tenants: Registry) -> None:
    registry = two_tenants
    moved = instance(UUID_A, "web-a", ("net-a", "fa:16:3e:00:00:07", "10.0.0.7"))
    registry.put_instance(moved)
    assert registry.get_instance(UUID_A) == moved
    assert len(registry.list_instances()) == 2
    with pytest.raises(UnknownCaller):
        registry.resolve(Caller(ip("10.0.0.5"), network_id="net-a"))
    assert registry.resolve(Caller(ip("10.0.0.7"), network_id="net-a")).uuid == UUID_A


def test_registry_refuses_vendor_data_json_cannot_hold(registry: Registry) -> None:
    before = registry.revision()
    with pytest.raises(ValidationError, match="vendor_data"):
        registry.put_instance(Instance(UUID_A, "web", vendor_data={"when": datetime.now(UTC)}))
    assert registry.revision() == before
    with pytest.raises(NotFound):
        registry.get_instance(UUID_A)


# -- resolve --------------------------------------------------------------------------------


def test_registry_resolve_by_network(two_tenants: Registry) -> None:
    assert two_tenants.resolve(Caller(ip("10.0.0.5"), network_id="net-a")).name == "web-a"


def test_registry_resolve_by_router(two_tenants: Registry) -> None:
    assert two_tenants.resolve(Caller(ip("10.0.0.5"), router_id="router-a")).name == "web-a"


def test_registry_overlapping_ips_resolve_to_their_own_instance(two_tenants: Registry) -> None:
    registry = two_tenants
    assert registry.resolve(Caller(ip("10.0.0.5"), network_id="net-a")).uuid == UUID_A
    assert registry.resolve(Caller(ip("10.0.0.5"), network_id="net-b")).uuid == UUID_B
    assert registry.resolve(Caller(ip("10.0.0.5"), router_id="router-a")).uuid == UUID_A
    assert registry.resolve(Caller(ip("10.0.0.5"), router_id="router-b")).uuid == UUID_B


def test_registry_resolve_router_spans_all_its_networks(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.put_network(network("net-c", "10.1.0.0/24"))
    registry.put_instance(instance(UUID_C, "db", ("net-c", "fa:16:3e:00:02:05", "10.1.0.5")))
    registry.put_router(Router("router-a", ("net-a", "net-c")))
    assert registry.resolve(Caller(ip("10.1.0.5"), router_id="router-a")).uuid == UUID_C
    assert registry.resolve(Caller(ip("10.0.0.5"), router_id="router-a")).uuid == UUID_A
    with pytest.raises(UnknownCaller):
        registry.resolve(Caller(ip("10.1.0.5"), router_id="router-b"))


def test_registry_resolve_ipv4_mapped_and_ipv6_callers(registry: Registry) -> None:
    registry.put_network(network("net-6", "2001:db8::/64"))
    registry.put_network(network("net-a"))
    registry.put_instance(
        Instance(
            UUID_A,
            "dual",
            ports=(
                Port("net-a", "fa:16:3e:00:00:05", (ip("10.0.0.5"),)),
                Port("net-6", "fa:16:3e:00:00:06", (ip("2001:db8::5"),)),
            ),
        )
    )
    assert registry.resolve(Caller(ip("::ffff:10.0.0.5"), network_id="net-a")).uuid == UUID_A
    assert registry.resolve(Caller(ip("2001:0db8:0:0::5"), network_id="net-6")).uuid == UUID_A


@pytest.mark.parametrize(
    ("caller", "scope"),
    [
        (Caller(ip("10.0.0.99"), network_id="net-a"), "network net-a"),
        (Caller(ip("10.0.0.99"), router_id="router-a"), "router router-a"),
        (Caller(ip("10.0.0.5"), network_id="net-x"), "network net-x"),
        (Caller(ip("10.0.0.5"), router_id="router-x"), "router router-x"),
    ],
)
def test_registry_unknown_caller_carries_scope_and_ip(two_tenants: Registry, caller: Caller, scope: str) -> None:
    with pytest.raises(UnknownCaller) as info:
        two_tenants.resolve(caller)
    assert info.value.scope == scope
    assert info.value.ip == str(caller.ip)
    assert isinstance(info.value, NotFound)


def test_registry_ambiguous_caller_in_one_network(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.put_instance(instance(UUID_C, "clash", ("net-a", "fa:16:3e:00:02:05", "10.0.0.5")))
    with pytest.raises(AmbiguousCaller) as info:
        registry.resolve(Caller(ip("10.0.0.5"), network_id="net-a"))
    assert info.value.uuids == tuple(sorted([UUID_A, UUID_C]))
    assert info.value.scope == "network net-a"
    assert info.value.ip == "10.0.0.5"


def test_registry_ambiguous_caller_across_a_routers_networks(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.put_router(Router("router-ab", ("net-a", "net-b")))
    with pytest.raises(AmbiguousCaller) as info:
        registry.resolve(Caller(ip("10.0.0.5"), router_id="router-ab"))
    assert info.value.uuids == tuple(sorted([UUID_A, UUID_B]))


def test_registry_same_instance_twice_in_scope_is_not_ambiguous(registry: Registry) -> None:
    registry.put_network(network("net-a"))
    registry.put_network(network("net-b"))
    registry.put_router(Router("router-ab", ("net-a", "net-b")))
    registry.put_instance(
        instance(
            UUID_A, "multi", ("net-a", "fa:16:3e:00:00:05", "10.0.0.5"), ("net-b", "fa:16:3e:00:00:06", "10.0.0.5")
        )
    )
    assert registry.resolve(Caller(ip("10.0.0.5"), router_id="router-ab")).uuid == UUID_A


# -- passwords ------------------------------------------------------------------------------


def test_registry_password_is_set_once(two_tenants: Registry) -> None:
    registry = two_tenants
    assert registry.get_password(UUID_A) == ""
    registry.set_password(UUID_A, "c2VjcmV0")
    assert registry.get_password(UUID_A) == "c2VjcmV0"
    with pytest.raises(Conflict):
        registry.set_password(UUID_A, "other")
    assert registry.get_password(UUID_A) == "c2VjcmV0"
    assert registry.get_password(UUID_B) == ""
    registry.clear_password(UUID_A)
    assert registry.get_password(UUID_A) == ""
    registry.set_password(UUID_A, "new")
    assert registry.get_password(UUID_A) == "new"


def test_registry_empty_password_does_not_block_a_later_one(two_tenants: Registry) -> None:
    two_tenants.set_password(UUID_A, "")
    two_tenants.set_password(UUID_A, "later")
    assert two_tenants.get_password(UUID_A) == "later"


def test_registry_password_survives_upsert_and_dies_with_instance(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.set_password(UUID_A, "pw")
    registry.put_instance(instance(UUID_A, "renamed", ("net-a", "fa:16:3e:00:00:05", "10.0.0.5")))
    assert registry.get_password(UUID_A) == "pw"
    registry.delete_instance(UUID_A)
    with pytest.raises(NotFound):
        registry.get_password(UUID_A)
    registry.put_instance(instance(UUID_A, "reborn"))
    assert registry.get_password(UUID_A) == ""


def test_registry_password_of_unknown_instance_is_not_found(registry: Registry) -> None:
    for call in (
        lambda: registry.get_password(UUID_A),
        lambda: registry.set_password(UUID_A, "x"),
        lambda: registry.clear_password(UUID_A),
    ):
        with pytest.raises(NotFound):
            call()


# -- revision and change tracking -------------------------------------------------------------


def test_registry_every_write_bumps_revision_reads_do_not(registry: Registry) -> None:
    assert registry.revision() == 0
    writes: list[Callable[[], None]] = [
        lambda: registry.put_network(network("net-a")),
        lambda: registry.put_router(Router("router-a", ("net-a",))),
        lambda: registry.put_instance(instance(UUID_A, "web", ("net-a", "fa:16:3e:00:00:05", "10.0.0.5"))),
        lambda: registry.set_password(UUID_A, "pw"),
        lambda: registry.clear_password(UUID_A),
        lambda: registry.delete_instance(UUID_A),
        lambda: registry.delete_router("router-a"),
        lambda: registry.delete_network("net-a"),
    ]
    for expected, write in enumerate(writes, start=1):
        write()
        assert registry.revision() == expected
    registry.list_instances()
    registry.list_networks()
    with pytest.raises(NotFound):
        registry.get_instance(UUID_A)
    assert registry.revision() == len(writes)


def test_registry_failed_write_does_not_bump_revision(two_tenants: Registry) -> None:
    registry = two_tenants
    registry.set_password(UUID_A, "pw")
    before = registry.revision()
    with pytest.raises(Conflict):
        registry.set_password(UUID_A, "again")
    with pytest.raises(Conflict):
        registry.delete_network("net-a")
    with pytest.raises(NotFound):
        registry.delete_instance(UUID_C)
    assert registry.revision() == before
    assert registry.changed_since(before) == Changes(before, frozenset(), False)


def test_registry_changed_since_instance_change_is_not_topology(two_tenants: Registry) -> None:
    registry = two_tenants
    rev = registry.revision()
    old = registry.get_instance(UUID_A)
    registry.put_instance(replace(old, metadata={"role": "db"}))
    assert registry.changed_since(rev) == Changes(rev + 1, frozenset({UUID_A}), False)
    assert registry.changed_since(rev + 1) == Changes(rev + 1, frozenset(), False)


def test_registry_changed_since_port_change_is_topology(two_tenants: Registry) -> None:
    registry = two_tenants
    rev = registry.revision()
    registry.put_instance(instance(UUID_A, "web-a", ("net-a", "fa:16:3e:00:00:09", "10.0.0.9")))
    assert registry.changed_since(rev) == Changes(rev + 1, frozenset({UUID_A}), True)


def test_registry_changed_since_network_change_is_topology_only(two_tenants: Registry) -> None:
    registry = two_tenants
    rev = registry.revision()
    registry.put_network(network("net-a", mtu=1400))
    assert registry.changed_since(rev) == Changes(rev + 1, frozenset(), True)
    registry.put_router(Router("router-a", ("net-a", "net-b")))
    assert registry.changed_since(rev + 1) == Changes(rev + 2, frozenset(), True)


def test_registry_changed_since_accumulates(two_tenants: Registry) -> None:
    registry = two_tenants
    rev = registry.revision()
    registry.set_password(UUID_A, "pw")
    registry.delete_instance(UUID_B)
    changes = registry.changed_since(rev)
    assert changes == Changes(rev + 2, frozenset({UUID_A, UUID_B}), True)
    assert registry.changed_since(rev + 1) == Changes(rev + 2, frozenset({UUID_B}), True)


def test_registry_changed_since_beyond_the_log_says_everything_changed(backend: Backend) -> None:
    registry = backend.open(change_log_size=3)
    registry.put_network(network("net-a"))
    registry.put_instance(instance(UUID_A, "a", ("net-a", "fa:16:3e:00:00:05", "10.0.0.5")))
    for n in range(5):
        registry.put_instance(instance(UUID_B, f"b{n}"))
    current = registry.revision()
    assert current == 7
    # Exact within the last 3 revisions...
    assert registry.changed_since(current - 3) == Changes(current, frozenset({UUID_B}), False)
    # ...and a full answer beyond, or from a revision this store never had.
    for since in (0, current - 4, current + 5):
        assert registry.changed_since(since) == Changes(current, frozenset({UUID_A, UUID_B}), True)


# -- several handles on one store -------------------------------------------------------------


def test_registry_second_handle_sees_writes(backend: Backend) -> None:
    writer = backend.open()
    reader = backend.open()
    assert reader.revision() == 0
    writer.put_network(network("net-a"))
    writer.put_instance(instance(UUID_A, "web", ("net-a", "fa:16:3e:00:00:05", "10.0.0.5")))
    assert reader.revision() == 2
    assert reader.resolve(Caller(ip("10.0.0.5"), network_id="net-a")).uuid == UUID_A
    assert reader.changed_since(1) == Changes(2, frozenset({UUID_A}), True)
    reader.set_password(UUID_A, "pw")
    with pytest.raises(Conflict):
        writer.set_password(UUID_A, "pw2")


# -- a network's subnets and the ports on it ------------------------------------------------


def _crowd(registry: Registry, count: int) -> list[Instance]:
    """``count`` instances vm-0.. on net-a (10.0.0.0/24) at 10.0.0.10.., in uuid order."""
    registry.put_network(network("net-a"))
    crowd = [
        instance(
            f"00000000-0000-4000-8000-{n:012d}", f"vm-{n}", ("net-a", f"fa:16:3e:00:00:{n:02x}", f"10.0.0.{10 + n}")
        )
        for n in range(count)
    ]
    registry.apply_batch(Batch(instances=crowd))
    return crowd


def test_registry_batch_narrowing_a_network_under_its_ports_is_a_conflict(registry: Registry) -> None:
    """A network stored with subnets that no longer hold the IPs of ports already on
    it used to be written, and its guests got addresses outside every subnet."""
    crowd = _crowd(registry, 8)
    revision = registry.revision()
    newcomer = instance(UUID_C, "newcomer", ("net-a", "fa:16:3e:00:01:05", "10.0.0.200"))
    # 10.0.0.128/25 holds none of 10.0.0.10..17; the newcomer's write is refused with it.
    with pytest.raises(Conflict) as info:
        registry.apply_batch(Batch(networks=[network("net-a", "10.0.0.128/25")], instances=[newcomer]))
    named = ", ".join(f"{i.uuid} ({i.name}) at 10.0.0.{10 + n}" for n, i in enumerate(crowd[:5]))
    assert str(info.value) == (
        f"network net-a: subnets 10.0.0.128/25 would leave ports of 8 instances outside every subnet: "
        f"{named} and 3 more instances; give those instances addresses in the new subnets (or remove them) "
        "in the same write, or keep a subnet that holds their addresses"
    )
    assert registry.revision() == revision
    assert registry.get_network("net-a") == network("net-a")
    with pytest.raises(NotFound):
        registry.get_instance(UUID_C)


def test_registry_batch_narrowing_a_network_with_its_ports_moved_or_removed_is_written(registry: Registry) -> None:
    """What the same batch rewrites or removes counts as it will be: a sync that
    renumbers a network and its instances together is one write."""
    crowd = _crowd(registry, 3)
    moved = [replace(i, ports=(replace(i.ports[0], ips=(ip(f"10.1.0.{10 + n}"),)),)) for n, i in enumerate(crowd[:2])]
    renumbered = network("net-a", "10.1.0.0/24")
    # One instance left where it was: refused, naming it alone.
    with pytest.raises(
        Conflict,
        match=rf"would leave ports of 1 instance outside every subnet: {crowd[2].uuid} \(vm-2\) at 10.0.0.12;",
    ):
        registry.apply_batch(Batch(networks=[renumbered], instances=moved))
    registry.apply_batch(Batch(networks=[renumbered], instances=moved, delete_instances=[crowd[2].uuid]))
    assert registry.get_network("net-a") == renumbered
    assert registry.resolve(Caller(ip("10.1.0.11"), network_id="net-a")).uuid == crowd[1].uuid
    assert [i.uuid for i in registry.list_instances()] == [i.uuid for i in crowd[:2]]


def test_registry_batch_network_without_subnets_gaining_some_checks_its_ports(registry: Registry) -> None:
    """A network without subnets takes any IP; given subnets, it must hold its ports'."""
    registry.put_network(Network("net-a"))
    registry.put_instance(instance(UUID_A, "web-a", ("net-a", "fa:16:3e:00:00:05", "192.168.7.5")))
    with pytest.raises(Conflict, match=rf"network net-a: subnets 10.0.0.0/24 .*: {UUID_A} \(web-a\) at 192.168.7.5;"):
        registry.apply_batch(Batch(networks=[network("net-a")]))
    assert registry.get_network("net-a") == Network("net-a")
    # Subnets that hold the address are written; so are a wider one and one beside it.
    registry.apply_batch(Batch(networks=[network("net-a", "192.168.0.0/16")]))
    wider = Network("net-a", subnets=(*network("a", "192.0.0.0/8").subnets, *network("b", "2001:db8::/64").subnets))
    registry.apply_batch(Batch(networks=[wider]))
    assert registry.get_network("net-a") == wider


def test_registry_put_network_narrowing_under_its_ports_is_a_conflict(registry: Registry) -> None:
    """The single write refuses what a batch refuses (the lab and scripts use it)."""
    crowd = _crowd(registry, 2)
    revision = registry.revision()
    with pytest.raises(Conflict, match=rf"would leave ports of 2 instances outside every subnet: {crowd[0].uuid} "):
        registry.put_network(network("net-a", "10.0.0.128/25"))
    assert registry.revision() == revision
    assert registry.get_network("net-a") == network("net-a")
    registry.put_network(network("net-a", "10.0.0.0/16", name="wider"))
    assert registry.get_network("net-a").name == "wider"


def test_registry_delete_network_in_use_names_instances_and_routers(registry: Registry) -> None:
    crowd = _crowd(registry, 7)
    registry.put_router(Router("router-b", ("net-a",)))
    registry.put_router(Router("router-a", ("net-a",)))
    revision = registry.revision()
    named = ", ".join(f"{i.uuid} ({i.name})" for i in crowd[:5])
    expected = f"network net-a is used by instances {named} and 2 more instances, and by routers router-a, router-b"
    with pytest.raises(Conflict) as info:
        registry.delete_network("net-a")
    assert str(info.value) == expected
    with pytest.raises(Conflict) as info:
        registry.apply_batch(Batch(delete_instances=[i.uuid for i in crowd[:6]], delete_networks=["net-a"]))
    assert (
        str(info.value)
        == f"network net-a is used by instance {crowd[6].uuid} (vm-6), and by routers router-a, router-b"
    )
    assert registry.revision() == revision
    registry.apply_batch(Batch(delete_instances=[i.uuid for i in crowd]))
    registry.delete_router("router-b")
    with pytest.raises(Conflict) as info:
        registry.delete_network("net-a")
    assert str(info.value) == "network net-a is used by router router-a"
