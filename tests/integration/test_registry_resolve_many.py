"""``resolve_many`` on SQLite and PostgreSQL answers exactly as the memory registry.

The SQL backends resolve a caller with one statement compiled once per dialect and
run on the driver's cursor (``registry/sql.py``, ``_ResolveStatements``), its rows
read by position; the memory registry is the reference semantics. One world with
every shape a caller can meet: several ports and IPs per instance, IPv6 and
IPv4-mapped callers, overlapping tenant ranges, router scopes spanning networks,
unknown networks, routers and addresses, ambiguous callers in one network and
across a router's networks, and an instance owning one IP twice in a scope.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta169.errors import AmbiguousCaller, RegistryError, RegistryUnavailable, UnknownCaller
from meta169.model import Caller, Instance, MetadataOptions, Network, Port, Router, SSHKey, Subnet, parse_ip
from meta169.registry import Registry, open_registry
from meta169.registry.base import Resolution
from meta169.registry.memory import MemoryRegistry
from tests.integration.conftest_postgres import end_other_sessions

NETWORKS = {
    "net-a": "10.0.0.0/24",
    "net-b": "10.0.0.0/24",  # another tenant's copy of net-a's range
    "net-c": "10.1.0.0/24",
    "net-6": "2001:db8::/64",
}
ROUTERS = {
    "router-a": ("net-a", "net-c", "net-6"),
    "router-b": ("net-b",),
    "router-ab": ("net-a", "net-b"),
    "router-empty": (),
}


def _port(network_id: str, mac: str, *ips: str, **kw: Any) -> Port:
    return Port(network_id, mac, tuple(parse_ip(i) for i in ips), **kw)


INSTANCES = (
    Instance(
        uuid="8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10",
        name="full",
        hostname="full.example",
        project_id="proj-a",
        availability_zone="az-2",
        region="RegionTwo",
        instance_type="m1.large",
        image_id="img-1",
        launch_index=3,
        created_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        metadata={"role": "db", "empty": ""},
        keys=(SSHKey("ops", "ssh-ed25519 AAAA ops"), SSHKey("cert", "-----BEGIN CERT-----", type="x509")),
        user_data=b"#cloud-config\x00\xff",
        vendor_data={"cloud-init": "#cloud-config\n", "nested": {"n": [1, 2.5, None, True]}},
        tags={"env": "prod"},
        security_groups=("default", "web"),
        # Ports deliberately out of MAC and device order; IPs out of numeric order.
        ports=(
            _port("net-a", "fa:16:3e:00:00:05", "10.0.0.6", "10.0.0.5", id="port-a", device_number=2),
            _port("net-6", "fa:16:3e:00:00:06", "2001:db8::5", "2001:db8::1:5", id="port-6", device_number=0),
            _port("net-c", "fa:16:3e:00:00:04", "10.1.0.4"),
        ),
        metadata_options=MetadataOptions("required", "enabled", 3, "enabled"),
        architecture="aarch64",
        source="admin",
    ),
    # Another tenant's 10.0.0.5: router-ab sees both.
    Instance("0b6f3e1c-9d7a-4a51-8c3e-5f2d1a0b9c84", "web-b", ports=(_port("net-b", "fa:16:3e:00:01:05", "10.0.0.5"),)),
    # Two instances on one address of one network.
    Instance(
        "5e2c7a90-1b3d-4f6e-8a7c-9d0e1f2a3b4c", "clash-1", ports=(_port("net-a", "fa:16:3e:00:02:09", "10.0.0.9"),)
    ),
    Instance(
        "6f3d8b01-2c4e-4a7f-9b8d-0e1f2a3b4c5d", "clash-2", ports=(_port("net-a", "fa:16:3e:00:03:09", "10.0.0.9"),)
    ),
    # One instance with the same address in two networks of router-ab: not ambiguous.
    Instance(
        "7a4e9c12-3d5f-4b80-8c9e-1f2a3b4c5d6e",
        "twice",
        ports=(_port("net-a", "fa:16:3e:00:04:14", "10.0.0.20"), _port("net-b", "fa:16:3e:00:05:14", "10.0.0.20")),
    ),
    Instance("8b5fad23-4e60-4c91-9daf-2a3b4c5d6e7f", "no-ports"),
)
ADDRESSES = (
    "10.0.0.5",
    "10.0.0.6",
    "::ffff:10.0.0.5",
    "10.0.0.9",
    "10.0.0.20",
    "10.0.0.99",
    "10.1.0.4",
    "2001:db8::5",
    "2001:0db8:0:0:0:0:1:5",
    "2001:db8::99",
)
SCOPES = (
    *({"network_id": n} for n in (*NETWORKS, "net-x")),
    *({"router_id": r} for r in (*ROUTERS, "router-x")),
)
CALLERS = tuple(Caller(ipaddress.ip_address(a), **s) for a in ADDRESSES for s in SCOPES)


def _fill(registry: Registry) -> Registry:
    for net_id, cidr in NETWORKS.items():
        registry.put_network(Network(net_id, subnets=(Subnet(ipaddress.ip_network(cidr)),)))
    for router_id, network_ids in ROUTERS.items():
        registry.put_router(Router(router_id, network_ids))
    for instance in INSTANCES:
        registry.put_instance(instance)
    return registry


def _outcome(found: Resolution) -> object:
    if isinstance(found, Instance):
        return found
    if isinstance(found, AmbiguousCaller):
        return ("ambiguous", found.scope, found.ip, found.uuids)
    assert isinstance(found, UnknownCaller), found
    return ("unknown", found.scope, found.ip)


def _outcomes(registry: Registry, callers: Sequence[Caller]) -> list[object]:
    return [_outcome(found) for found in registry.resolve_many(callers)]


@pytest.fixture(scope="module")
def reference() -> MemoryRegistry:
    registry = MemoryRegistry()
    _fill(registry)
    return registry


@pytest.fixture
def sql(sql_url: str) -> Iterator[Registry]:
    registry = open_registry(sql_url, create=True)
    try:
        yield _fill(registry)
    finally:
        registry.close()


def test_resolve_many_each_caller_alone_matches_memory(sql: Registry, reference: MemoryRegistry) -> None:
    for caller in CALLERS:
        assert _outcomes(sql, [caller]) == _outcomes(reference, [caller]), caller


def test_resolve_many_every_shape_is_met(reference: MemoryRegistry) -> None:
    """The world above really holds each case the module docstring names."""
    outcomes = _outcomes(reference, CALLERS)
    kinds = {o[0] if isinstance(o, tuple) else "instance" for o in outcomes}
    assert kinds == {"instance", "unknown", "ambiguous"}
    assert ("ambiguous", "router router-ab", "10.0.0.5", tuple(sorted([INSTANCES[0].uuid, INSTANCES[1].uuid]))) in (
        outcomes
    )
    assert ("ambiguous", "network net-a", "10.0.0.9", tuple(sorted([INSTANCES[2].uuid, INSTANCES[3].uuid]))) in (
        outcomes
    )
    assert INSTANCES[4] in outcomes and INSTANCES[0] in outcomes


def test_resolve_many_all_callers_at_once_matches_memory(sql: Registry, reference: MemoryRegistry) -> None:
    # Every scope in one call: several statements in one snapshot.
    assert _outcomes(sql, CALLERS) == _outcomes(reference, CALLERS)
    # One scope, every address: one statement, the IN list padded on SQLite.
    one_scope = [c for c in CALLERS if c.router_id == "router-a"]
    assert _outcomes(sql, one_scope) == _outcomes(reference, one_scope)


def test_resolve_many_past_one_chunk_matches_memory(sql: Registry, reference: MemoryRegistry) -> None:
    """More than 500 addresses in a scope: several IN lists on SQLite."""
    unknown = [Caller(ipaddress.ip_address(f"10.0.{n // 250}.{n % 250 + 1}"), network_id="net-a") for n in range(700)]
    callers = [*unknown, *CALLERS, *reversed(unknown[:50])]
    assert _outcomes(sql, callers) == _outcomes(reference, callers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CALLERS), max_size=40))
def test_resolve_many_any_batch_matches_memory(sql: Registry, reference: MemoryRegistry, callers: list[Caller]) -> None:
    # The registry is only read here, so one per test function serves every example.
    assert _outcomes(sql, callers) == _outcomes(reference, callers)


def test_resolve_many_driver_error_is_a_registry_error_and_the_pool_recovers(sql: Registry) -> None:
    import sqlalchemy as sa

    caller = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
    engine: sa.Engine = sql.engine  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE port_ips RENAME TO port_ips_away"))
    try:
        for callers in ([caller], [caller, Caller(caller.ip, router_id="router-a")]):
            with pytest.raises(RegistryError, match="cannot resolve") as info:
                sql.resolve_many(callers)
            assert isinstance(info.value.__cause__, sa.exc.DBAPIError)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE port_ips_away RENAME TO port_ips"))
    assert sql.resolve_many([caller]) == [INSTANCES[0]]


@pytest.mark.postgres
def test_registry_pooled_connections_ended_by_the_server_are_replaced_unseen(postgres_url: str) -> None:
    """No ping on every checkout: a session the server ended (a restart, a
    terminated backend) is found by its readable socket and replaced before use, so
    the next read does not fail."""
    import sqlalchemy as sa

    registry = open_registry(postgres_url, create=True)
    try:
        _fill(registry)
        engine: sa.Engine = registry.engine  # type: ignore[attr-defined]
        caller = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
        # Several connections in the pool, all used once.
        with engine.connect() as a, engine.connect() as b:
            a.exec_driver_sql("SELECT 1")
            b.exec_driver_sql("SELECT 1")
        assert registry.resolve_many([caller]) == [INSTANCES[0]]
        ended = end_other_sessions(postgres_url)
        assert ended >= 2
        for _ in range(3):
            assert registry.resolve_many([caller]) == [INSTANCES[0]]
            assert registry.resolve_many([caller, Caller(caller.ip, router_id="router-a")]) == [INSTANCES[0]] * 2
            assert registry.revision() >= 1
    finally:
        registry.close()


@pytest.mark.postgres
def test_registry_pings_a_pooled_connection_only_after_it_idled(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meta169.registry import sql as sql_registry

    registry = open_registry(postgres_url, create=True)
    try:
        _fill(registry)
        dialect = registry.engine.dialect  # type: ignore[attr-defined]
        pings: list[object] = []
        real_ping = dialect.do_ping
        monkeypatch.setattr(dialect, "do_ping", lambda conn: pings.append(conn) or real_ping(conn))
        caller = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
        for _ in range(20):
            registry.resolve_many([caller])
        assert pings == []  # a busy, healthy pool: no round trip but the reads
        monkeypatch.setattr(sql_registry, "PG_PING_IDLE_S", 0.0)
        for _ in range(3):
            registry.resolve_many([caller])
        assert len(pings) == 3
    finally:
        registry.close()


_CALLER_A = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
_FULL = INSTANCES[0].uuid
# Every read serve, admin and the CLI make on the registry's own connections: the
# caller lookups, polls (revision, changes), rendering ahead (instances, networks,
# addresses) and passwords.
READS: dict[str, Callable[[Registry], object]] = {
    "resolve_many one scope": lambda r: r.resolve_many([_CALLER_A]),
    "resolve_many two scopes": lambda r: r.resolve_many([_CALLER_A, Caller(_CALLER_A.ip, router_id="router-a")]),
    "resolve": lambda r: r.resolve(_CALLER_A),
    "get_instance": lambda r: r.get_instance(_FULL),
    "get_instances": lambda r: r.get_instances([i.uuid for i in INSTANCES]),
    "get_network": lambda r: r.get_network("net-a"),
    "get_networks": lambda r: r.get_networks(NETWORKS),
    "get_router": lambda r: r.get_router("router-a"),
    "list_instances": lambda r: r.list_instances(limit=2),
    "count_instances": lambda r: r.count_instances(),
    "has_instances": lambda r: r.has_instances(),
    "list_networks": lambda r: r.list_networks(),
    "list_routers": lambda r: r.list_routers(),
    "port_owners": lambda r: r.port_owners(list(NETWORKS)),
    "get_password": lambda r: r.get_password(_FULL),
    "revision": lambda r: r.revision(),
    "changed_since": lambda r: r.changed_since(1),
}


@pytest.mark.postgres
@pytest.mark.parametrize("read", READS, ids=str)
def test_registry_session_ended_before_its_socket_shows_it_is_read_again_on_a_fresh_one(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """The race the test above can lose: the pool checks a connection's socket before
    the server's message has arrived, takes it for alive, and the read fails on it
    (after a PostgreSQL restart: a 503 for a caller, a poll or a password read that
    need not fail). With every socket taken for quiet, each read still gives the
    answer it gave before (the pool is emptied and the read made again once)."""

    from meta169.registry import sql as sql_registry

    registry = open_registry(postgres_url, create=True)
    try:
        _fill(registry)
        registry.set_password(_FULL, "s3cret")
        before = READS[read](registry)
        monkeypatch.setattr(sql_registry, "_readable", lambda *_: False)
        ended = end_other_sessions(postgres_url)
        assert ended >= 1
        assert READS[read](registry) == before
    finally:
        registry.close()


@pytest.mark.postgres
def test_registry_write_on_a_session_the_server_ended_is_not_made_again(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only reads are made again: a write that failed may have reached the server,
    so its caller hears the outage (and the next write works)."""

    from meta169.registry import sql as sql_registry

    registry = open_registry(postgres_url, create=True)
    try:
        _fill(registry)
        monkeypatch.setattr(sql_registry, "_readable", lambda *_: False)
        assert end_other_sessions(postgres_url) >= 1
        with pytest.raises(RegistryUnavailable):
            registry.set_password(_FULL, "s3cret")
        registry.set_password(_FULL, "s3cret")
        assert registry.get_password(_FULL) == "s3cret"
    finally:
        registry.close()


def _fail_next_statement(registry: Registry, error: Exception) -> list[str]:
    """Make the registry's next statement fail with the driver's ``error`` before it
    reaches the server; the statements that failed are listed in the result."""
    import sqlalchemy as sa

    failed: list[str] = []

    def once(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not failed:
            failed.append(statement)
            raise error

    sa.event.listen(registry.engine, "before_cursor_execute", once)  # type: ignore[attr-defined]
    return failed


@pytest.mark.postgres
@pytest.mark.parametrize("read", ["revision", "changed_since", "get_instance", "list_instances"])
def test_registry_socket_closed_under_a_statement_is_read_again_on_a_fresh_one(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """psycopg's "connection socket closed" (poll saw the server hang up, libpq not yet
    told): SQLAlchemy's dialect does not take it for a lost connection, sent a ROLLBACK
    on it, failed again and kept it in the pool (CI, a session ended by
    pg_terminate_backend). It invalidates the connection and the read is made again."""
    import psycopg

    from meta169.registry import sql as sql_registry

    registry = open_registry(postgres_url, create=True)
    try:
        _fill(registry)
        before = READS[read](registry)
        monkeypatch.setattr(sql_registry, "_readable", lambda *_: False)
        failed = _fail_next_statement(registry, psycopg.OperationalError("connection socket closed"))
        assert READS[read](registry) == before
        assert failed
    finally:
        registry.close()


@pytest.mark.postgres
def test_registry_statement_the_server_cancelled_is_not_read_again(postgres_url: str) -> None:
    """A statement the server cancelled (statement_timeout, SQLSTATE 57014) ran on a
    session that still works: the read fails as an outage, not made again, and the
    pooled connection serves the next read."""
    import psycopg

    registry = open_registry(postgres_url, create=True)
    try:
        _fill(registry)
        before = registry.revision()
        pooled = registry.engine.pool.checkedin()
        failed = _fail_next_statement(
            registry, psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        )
        with pytest.raises(RegistryUnavailable, match="statement timeout"):
            registry.revision()
        assert len(failed) == 1
        assert registry.revision() == before
        assert registry.engine.pool.checkedin() == pooled
    finally:
        registry.close()
