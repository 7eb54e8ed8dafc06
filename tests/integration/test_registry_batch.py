"""Registry.apply_batch: every write of an import in one transaction, all or nothing,
on SQLite and PostgreSQL (and the memory backend, which must answer the same).

A failure midway is made by the database itself: a trigger that refuses one port
address, so the batch fails after the instance rows before it were written (on
PostgreSQL inside the COPY that writes them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from meta169.api.config import ServeConfig
from meta169.api.server import refuse_empty
from meta169.errors import Conflict, RegistryError, ValidationError
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.inventory import apply_inventory, apply_plan, parse_inventory, plan_inventory
from meta169.model import Caller, Instance, Network, Port, Router, Subnet
from meta169.registry import Batch, Registry, open_registry
from meta169.registry.memory import MemoryRegistry
from meta169.registry.sql import SqlRegistry

COUNT = 1200  # more than two chunks of the SQL backend's IN lists
FAILING_IP = "10.0.3.7"  # instance 775's address: written after hundreds of others


def _network(net_id: str = "net-a", cidr: str = "10.0.0.0/20") -> Network:
    prefix = ipaddress.ip_network(cidr)
    return Network(id=net_id, subnets=(Subnet(cidr=prefix, gateway=prefix.network_address + 1),))


def _uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def _address(i: int) -> str:
    return str(ipaddress.ip_address("10.0.0.10") + i)


def _instance(i: int, net: str = "net-a", **kw: object) -> Instance:
    return Instance(
        uuid=_uuid(i),
        name=f"vm-{i}",
        ports=(Port(net, f"fa:16:3e:00:{i >> 8:02x}:{i & 255:02x}", (ipaddress.ip_address(_address(i)),)),),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Registry]:
    if request.param == "memory":
        opened: Registry = MemoryRegistry()
    else:
        opened = open_registry(str(request.getfixturevalue("sql_url_" + request.param)), create=True)
    yield opened
    opened.close()


@pytest.fixture
def sql_url_sqlite(tmp_path: object) -> str:
    return f"sqlite://{tmp_path}/registry.db"


@pytest.fixture
def sql_url_postgresql(postgres_url: str) -> str:
    return postgres_url


def _fail_on_address(registry: Registry, ip: str) -> None:
    """Make the database itself refuse to store ``ip`` as a port address."""
    assert isinstance(registry, SqlRegistry)
    with registry.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER test_fail BEFORE INSERT ON port_ips WHEN NEW.ip = '{ip}' "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.ip = '{ip}' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER test_fail BEFORE INSERT ON port_ips FOR EACH ROW EXECUTE FUNCTION test_fail()"
            )


def test_registry_batch_writes_everything_under_one_revision(registry: Registry) -> None:
    assert not registry.has_instances() and registry.count_instances() == 0
    before = registry.revision()
    revision = registry.apply_batch(
        Batch(
            networks=[_network()],
            routers=[Router("router-a", ("net-a",))],
            instances=[_instance(i) for i in range(COUNT)],
        )
    )
    assert revision == before + 1 == registry.revision()
    assert registry.has_instances() and registry.count_instances() == COUNT
    changes = registry.changed_since(before)
    assert changes.topology and changes.instances == {_uuid(i) for i in range(COUNT)}
    found = registry.resolve(Caller(ipaddress.ip_address(_address(COUNT - 1)), router_id="router-a"))
    assert found == _instance(COUNT - 1)
    # Nothing to write: no transaction, no new revision.
    assert registry.apply_batch(Batch()) == revision


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_registry_batch_failing_midway_writes_nothing(backend: str, request: pytest.FixtureRequest) -> None:
    registry = open_registry(str(request.getfixturevalue("sql_url_" + backend)), create=True)
    try:
        registry.put_network(_network("net-old"))
        registry.put_instance(_instance(0, "net-old"))
        revision = registry.revision()
        _fail_on_address(registry, FAILING_IP)
        batch = Batch(
            networks=[_network()],
            instances=[_instance(i) for i in range(1, COUNT)],
            delete_instances=[_uuid(0)],
            delete_networks=["net-old"],
        )
        with pytest.raises(RegistryError, match="injected failure"):
            registry.apply_batch(batch)
        assert registry.revision() == revision
        assert [i.uuid for i in registry.list_instances()] == [_uuid(0)]
        assert [n.id for n in registry.list_networks()] == ["net-old"]
        assert registry.changed_since(revision).instances == frozenset()
    finally:
        registry.close()


def test_registry_batch_conflict_after_writes_rolls_them_back(registry: Registry) -> None:
    """The network removal comes last, after every instance was written: its
    Conflict (another instance still has a port there) undoes them all."""
    registry.put_network(_network())
    registry.put_network(_network("net-kept", "10.1.0.0/20"))
    registry.put_instance(_instance(0, "net-kept"))
    revision = registry.revision()
    with pytest.raises(Conflict, match="net-kept"):
        registry.apply_batch(Batch(instances=[_instance(i) for i in range(1, COUNT)], delete_networks=["net-kept"]))
    assert registry.revision() == revision
    assert registry.count_instances() == 1
    assert [n.id for n in registry.list_networks()] == ["net-a", "net-kept"]
    # The memory backend put its index back too.
    caller = Caller(ipaddress.ip_address(_address(0)), network_id="net-kept")
    assert registry.resolve(caller).uuid == _uuid(0)


def test_registry_batch_replace_keeps_the_password_and_tells_port_changes(registry: Registry) -> None:
    registry.apply_batch(Batch(networks=[_network()], instances=[_instance(1), _instance(2)]))
    registry.set_password(_uuid(1), "secret")
    revision = registry.revision()
    registry.apply_batch(Batch(instances=[_instance(1, metadata={"role": "db"})]))
    assert registry.get_password(_uuid(1)) == "secret"
    assert registry.get_instance(_uuid(1)).metadata == {"role": "db"}
    changes = registry.changed_since(revision)
    assert (changes.instances, changes.topology) == (frozenset({_uuid(1)}), False)
    moved = Instance(
        uuid=_uuid(2), name="vm-2", ports=(Port("net-a", "fa:16:3e:00:00:02", (ipaddress.ip_address("10.0.9.9"),)),)
    )
    revision = registry.revision()
    registry.apply_batch(Batch(instances=[moved]))
    assert registry.changed_since(revision).topology
    assert registry.resolve(Caller(ipaddress.ip_address("10.0.9.9"), network_id="net-a")).uuid == _uuid(2)


def test_registry_batch_removing_what_is_gone_is_no_error(registry: Registry) -> None:
    registry.apply_batch(Batch(networks=[_network()], instances=[_instance(1)]))
    revision = registry.apply_batch(
        Batch(delete_instances=[_uuid(1), _uuid(9)], delete_routers=["router-x"], delete_networks=["net-a", "net-x"])
    )
    assert registry.count_instances() == 0 and registry.list_networks() == []
    assert registry.revision() == revision


def test_registry_batch_refuses_an_object_given_twice() -> None:
    with pytest.raises(ValidationError, match="twice"):
        Batch(instances=[_instance(1), _instance(1)])


def _entry(uuid: str, name: str, net: str, mac: str, ip: str) -> str:
    return f'  - {{uuid: {uuid}, name: {name}, ports: [{{network: {net}, mac: "{mac}", ips: [{ip}]}}]}}\n'


PRUNE_BEFORE = (
    "networks:\n  - {id: net-a, subnets: [{cidr: 10.0.0.0/24}]}\ninstances:\n"
    + _entry("11111111-1111-4111-8111-111111111111", "alpha", "net-a", "fa:16:3e:00:00:01", "10.0.0.5")
    + _entry("22222222-2222-4222-8222-222222222222", "beta", "net-a", "fa:16:3e:00:00:02", "10.0.0.6")
)
PRUNE_AFTER = "networks:\n  - {id: net-b, subnets: [{cidr: 10.0.3.0/24}]}\ninstances:\n" + _entry(
    "33333333-3333-4333-8333-333333333333", "gamma", "net-b", "fa:16:3e:00:00:03", FAILING_IP
)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_import_prune_failing_midway_leaves_the_registry_as_it_was(
    backend: str, request: pytest.FixtureRequest
) -> None:
    registry = open_registry(str(request.getfixturevalue("sql_url_" + backend)), create=True)
    try:
        apply_inventory(registry, parse_inventory(PRUNE_BEFORE, source="before"))
        revision = registry.revision()
        plan = plan_inventory(registry, parse_inventory(PRUNE_AFTER, source="after"), prune=True)
        assert [c.action for c in plan.changes] == ["remove", "remove", "add", "add", "remove"]
        _fail_on_address(registry, FAILING_IP)
        with pytest.raises(RegistryError, match="injected failure"):
            apply_plan(registry, plan)
        assert [i.name for i in registry.list_instances()] == ["alpha", "beta"]
        assert [n.id for n in registry.list_networks()] == ["net-a"]
        assert registry.revision() == revision
    finally:
        registry.close()


def test_serve_empty_check_reads_at_most_one_instance(tmp_path: object) -> None:
    """serve's start refuses an empty registry by asking for one row, never by
    reading every instance (100,000 of them took seconds and hundreds of MB)."""
    url = f"sqlite://{tmp_path}/registry.db"
    registry = open_registry(url, create=True)
    try:
        registry.apply_batch(Batch(networks=[_network()], instances=[_instance(i) for i in range(50)]))
    finally:
        registry.close()
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(" ".join(statement.split()).lower())

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        listener = ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a"))
        config = ServeConfig(registry_url=url, listeners=(listener,))
        refuse_empty(config)  # not empty: no error
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    reads = [s for s in statements if s.startswith("select") and " from instances" in s]
    assert reads and all("limit" in s for s in reads), reads
    assert not [s for s in statements if " from ports" in s or " from port_ips" in s]
