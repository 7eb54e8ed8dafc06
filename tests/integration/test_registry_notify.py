"""Registry writes pushed to serve nodes by PostgreSQL LISTEN/NOTIFY, against a real server.

Every write notifies in its own transaction, saying what changed; serve listens on a
connection of its own and drops exactly that. The serve nodes here poll once a
minute, so a change they serve within seconds came through the notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg import sql

from meta169.errors import Conflict
from meta169.model import Instance, Network, Port, Router, Subnet, parse_ip
from meta169.registry import open_registry
from meta169.registry.base import Batch, ChangeFeed, Notice
from meta169.registry.sql import NOTIFY_PAYLOAD_MAX, SqlRegistry, channel_name, notice_payload, parse_notice
from tests.integration.conftest_postgres import PostgresServer
from tests.integration.serving import ServeProcess, get, start_serve

pytestmark = pytest.mark.postgres

UUID = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"


def _network(net_id: str = "net-a") -> Network:
    return Network(
        id=net_id, subnets=(Subnet(cidr=ipaddress.ip_network("127.0.0.0/24"), gateway=parse_ip("127.0.0.254")),)
    )


def _instance(uuid: str = UUID, name: str = "alpha", ip: str = "127.0.0.1", net: str = "net-a") -> Instance:
    return Instance(uuid=uuid, name=name, project_id="proj-a", ports=(Port(net, "fa:16:3e:00:00:0a", (parse_ip(ip),)),))


@pytest.fixture
def registry(postgres_url: str) -> Iterator[SqlRegistry]:
    reg = open_registry(postgres_url, create=True)
    assert isinstance(reg, SqlRegistry)
    reg.put_network(_network())
    try:
        yield reg
    finally:
        reg.close()


@contextlib.asynccontextmanager
async def _listening(reg: SqlRegistry) -> AsyncIterator[ChangeFeed]:
    feed = reg.change_feed()
    assert feed is not None
    await feed.connect()
    try:
        yield feed
    finally:
        await feed.close()


async def _next(feed: ChangeFeed, timeout: float = 5.0) -> Notice:
    return await asyncio.wait_for(anext(aiter(feed.notices())), timeout)


# -- the payload ---------------------------------------------------------------------------------


def test_registry_notify_payload_round_trips() -> None:
    text = notice_payload(7, 6, [OTHER, UUID, None, UUID], networks=False)
    assert parse_notice(text) == Notice(7, 6, frozenset({UUID, OTHER}), True, networks_changed=False)
    assert parse_notice(notice_payload(8, 7, [UUID])) == Notice(8, 7, frozenset({UUID}), False, False)
    # A payload that does not fit lists nothing: the listener asks the change log.
    many = [f"{n:08d}-0000-4000-8000-000000000000" for n in range(300)]
    big = notice_payload(9, 8, many)
    assert len(big.encode()) < NOTIFY_PAYLOAD_MAX
    assert parse_notice(big) == Notice(9, 8, None)
    # Another version's format, or junk: ask the change log too.
    assert parse_notice("not json").instances is None
    assert parse_notice(json.dumps({"r": 3, "s": 2, "i": [1, 2]})).instances is None


def test_registry_notify_channel_fits_postgres_names() -> None:
    assert channel_name("public") == "meta169"
    assert channel_name("tenant_a") == "meta169.tenant_a"
    assert len(channel_name("s" * 63).encode()) <= 63


# -- what a write notifies -------------------------------------------------------------------------


def test_registry_notify_says_what_each_write_changed(registry: SqlRegistry) -> None:
    async def run() -> None:
        async with _listening(registry) as feed:
            rev = registry.revision()
            registry.put_instance(_instance())
            assert await _next(feed) == Notice(rev + 1, rev, frozenset({UUID}), True, networks_changed=False)
            registry.put_instance(_instance(name="renamed"))  # same ports: not topology
            assert await _next(feed) == Notice(rev + 2, rev + 1, frozenset({UUID}), False, False)
            registry.put_router(Router("router-a", ("net-a",)))
            assert await _next(feed) == Notice(rev + 3, rev + 2, frozenset(), True, networks_changed=True)
            # A write that fails notifies nothing: the next notice follows the last one.
            with pytest.raises(Conflict):
                registry.put_instance(_instance(OTHER, net="net-unknown"))
            registry.delete_instance(UUID)
            notice = await _next(feed)
            assert (notice.revision, notice.since, notice.instances) == (rev + 4, rev + 3, frozenset({UUID}))

    asyncio.run(run())


def test_registry_notify_a_large_batch_asks_the_change_log(registry: SqlRegistry) -> None:
    instances = [
        _instance(f"{n:08d}-0000-4000-8000-000000000000", f"vm{n}", f"127.0.{n // 250}.{n % 250 + 1}")
        for n in range(300)
    ]

    async def run() -> None:
        async with _listening(registry) as feed:
            rev = registry.revision()
            registry.apply_batch(Batch(instances=instances))
            notice = await _next(feed)
            assert (notice.revision, notice.since, notice.instances) == (rev + 1, rev, None)
            changes = registry.changed_since(notice.since)
            assert changes.instances == {i.uuid for i in instances}

    asyncio.run(run())


def test_registry_notify_channels_are_per_schema(registry: SqlRegistry, postgres_server: PostgresServer) -> None:
    # Two registries in two schemas of one database: each hears only its own writes.
    schema = f"notify_other_{int(time.time() * 1000) % 10**9}"
    conninfo = postgres_server.conninfo("meta169_tests")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    other = open_registry(f"{postgres_server.url('meta169_tests')}?options=-csearch_path%3D{schema}")
    try:
        other.put_network(_network())

        async def run() -> None:
            async with _listening(registry) as feed:
                rev = registry.revision()
                other.put_instance(_instance(OTHER))
                registry.put_instance(_instance())
                notice = await _next(feed)
                assert (notice.since, notice.instances) == (rev, frozenset({UUID}))

        asyncio.run(run())
    finally:
        other.close()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# -- serve nodes -------------------------------------------------------------------------------------


@pytest.fixture
def nodes(registry: SqlRegistry, postgres_url: str) -> Iterator[list[ServeProcess]]:
    registry.put_instance(_instance())
    started: list[ServeProcess] = []
    try:
        for _ in range(2):
            # A poll a minute: what shows within seconds came by notification.
            started.append(start_serve(postgres_url, ["127.0.0.1:0=network:net-a"], "--poll-interval", "60"))
        yield started
    finally:
        for node in started:
            node.stop()


def _name(node: ServeProcess) -> str:
    status, _, body = get(node.addresses[0], "/openstack/latest/meta_data.json")
    assert status == 200, body
    return str(json.loads(body)["name"])


def _wait_for_name(node: ServeProcess, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    seen = _name(node)
    while seen != name:
        assert time.monotonic() < deadline, f"still {seen!r}, not {name!r}"
        time.sleep(0.02)
        seen = _name(node)


def test_serve_notify_change_reaches_every_node_without_a_poll(
    registry: SqlRegistry, nodes: list[ServeProcess]
) -> None:
    for node in nodes:
        assert _name(node) == "alpha"  # cached on every node
    registry.put_instance(_instance(name="beta"))
    for node in nodes:
        _wait_for_name(node, "beta")
    # A port change (the address moves to another instance) too.
    registry.delete_instance(UUID)
    registry.put_instance(_instance(OTHER, name="gamma"))
    for node in nodes:
        _wait_for_name(node, "gamma")


def test_serve_notify_listens_again_after_the_connection_drops(
    registry: SqlRegistry, nodes: list[ServeProcess], postgres_url: str
) -> None:
    for node in nodes:
        assert _name(node) == "alpha"
    with registry.engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        listen = f'LISTEN "{channel_name(schema)}"'
        # The listening backends of the two nodes (each connects once it serves).
        deadline = time.monotonic() + 10
        while conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %(q)s", {"q": listen}
        ).scalar_one() < len(nodes):
            assert time.monotonic() < deadline, "the nodes do not listen"
            time.sleep(0.05)
        # Ended as an administrator would.
        ended = conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %(q)s", {"q": listen}
        ).all()
    assert len(ended) == len(nodes)
    time.sleep(1.0)  # the first reconnects come after 0.25 s of backoff at most
    registry.put_instance(_instance(name="delta"))
    for node in nodes:
        _wait_for_name(node, "delta")
