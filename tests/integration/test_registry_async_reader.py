"""PostgreSQL's asynchronous reader (``registry/sql.py``, ``PgAsyncReader``): serve's
first requests resolved on the event loop over a psycopg connection of the reader's
own, answering exactly as the registry thread's ``resolve_many`` (the memory
registry is the reference), surviving a server that ended its session, bounded by
its timeout, and used by the site cache instead of the registry thread."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta169.api.cache import SiteCache
from meta169.errors import RegistryUnavailable
from meta169.metrics.instruments import ServeMetrics
from meta169.model import Caller
from meta169.registry import open_registry, sqlalchemy_url
from meta169.registry.base import AsyncReader, Resolution
from meta169.registry.memory import MemoryRegistry
from meta169.registry.sql import SqlRegistry
from meta169.render import RenderOptions, Site
from tests.integration.conftest_postgres import end_other_sessions
from tests.integration.test_registry_resolve_many import CALLERS, INSTANCES, _fill, _outcome, _outcomes, reference

pytestmark = pytest.mark.postgres


@pytest.fixture
def registry(postgres_url: str) -> Iterator[SqlRegistry]:
    opened = open_registry(postgres_url, create=True)
    assert isinstance(opened, SqlRegistry)
    try:
        _fill(opened)
        yield opened
    finally:
        opened.close()


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for a whole test: the reader's connection lives on it."""
    with asyncio.Runner() as run:
        yield run


class _Awaited:
    """A registry whose ``resolve_many`` is the async reader's, awaited on ``runner``:
    so the reference comparisons of test_registry_resolve_many apply unchanged."""

    def __init__(self, reader: AsyncReader, runner: asyncio.Runner) -> None:
        self._reader = reader
        self._runner = runner

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        return self._runner.run(self._reader.resolve_many(callers))


@pytest.fixture
def awaited(registry: SqlRegistry, runner: asyncio.Runner) -> Iterator[_Awaited]:
    reader = registry.async_reader(timeout=5.0)
    assert reader is not None
    try:
        yield _Awaited(reader, runner)
    finally:
        reader.close()


__all__ = ["reference"]  # the memory registry the answers are held to (a fixture)


def test_async_reader_only_on_postgresql() -> None:
    sqlite = SqlRegistry.open("sqlite://")
    try:
        assert sqlite.async_reader(timeout=1.0) is None
    finally:
        sqlite.close()
    assert MemoryRegistry().async_reader(timeout=1.0) is None


def test_async_reader_each_caller_alone_matches_memory(awaited: _Awaited, reference: MemoryRegistry) -> None:
    for caller in CALLERS:
        assert _outcomes(awaited, [caller]) == _outcomes(reference, [caller]), caller  # type: ignore[arg-type]


def test_async_reader_all_callers_at_once_matches_memory(awaited: _Awaited, reference: MemoryRegistry) -> None:
    # Every scope in one call: several statements in one snapshot (a transaction).
    assert _outcomes(awaited, CALLERS) == _outcomes(reference, CALLERS)  # type: ignore[arg-type]
    unknown = [Caller(ipaddress.ip_address(f"10.0.{n // 250}.{n % 250 + 1}"), network_id="net-a") for n in range(700)]
    callers = [*unknown, *CALLERS, *reversed(unknown[:50])]
    assert _outcomes(awaited, callers) == _outcomes(reference, callers)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CALLERS), max_size=40))
def test_async_reader_any_batch_matches_memory(
    awaited: _Awaited, reference: MemoryRegistry, callers: list[Caller]
) -> None:
    assert _outcomes(awaited, callers) == _outcomes(reference, callers)  # type: ignore[arg-type]


def test_async_reader_reads_made_together_each_get_their_answer(
    registry: SqlRegistry, runner: asyncio.Runner, reference: MemoryRegistry
) -> None:
    """Reads made at once share one connection one after the other: a reply arriving
    for one must not be taken for the end of the session by another (without the
    reader's lock, the check of an idle socket closed the connection under a read:
    "the connection is closed")."""
    reader = registry.async_reader(timeout=5.0)
    assert reader is not None
    batches = [list(CALLERS[i : i + 7]) for i in range(0, len(CALLERS), 7)]

    async def together() -> list[list[Resolution]]:
        return list(await asyncio.gather(*(reader.resolve_many(b) for b in batches * 3)))

    try:
        for got, callers in zip(runner.run(together()), batches * 3, strict=True):
            assert [_outcome(g) for g in got] == _outcomes(reference, callers)
    finally:
        reader.close()


def test_async_reader_replaces_a_session_the_server_ended_unseen(
    awaited: _Awaited, postgres_url: str, registry: SqlRegistry
) -> None:
    caller = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
    both = [caller, Caller(caller.ip, router_id="router-a")]
    assert awaited.resolve_many([caller]) == [INSTANCES[0]]
    registry.close()  # the thread's pool: only the reader's session is left to end
    for _ in range(3):
        assert end_other_sessions(postgres_url) >= 1
        assert awaited.resolve_many([caller]) == [INSTANCES[0]]
        assert end_other_sessions(postgres_url) >= 1
        assert awaited.resolve_many(both) == [INSTANCES[0]] * 2


def test_async_reader_unanswered_read_is_unavailable_within_its_timeout_then_recovers(
    registry: SqlRegistry, postgres_url: str, runner: asyncio.Runner
) -> None:
    reader = registry.async_reader(timeout=0.5)
    assert reader is not None
    caller = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
    locker = sa.create_engine(postgres_url, poolclass=sa.NullPool).connect()
    try:
        assert runner.run(reader.resolve_many([caller])) == [INSTANCES[0]]
        # An exclusive lock holds every reader of the table: the server takes the
        # statement and never answers while it is held.
        locker.exec_driver_sql("BEGIN")
        locker.exec_driver_sql("LOCK TABLE port_ips IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match=r"did not answer within 0\.5 s"):
            runner.run(reader.resolve_many([caller]))
        assert time.monotonic() - started < 2.0
        locker.exec_driver_sql("ROLLBACK")
        assert runner.run(reader.resolve_many([caller])) == [INSTANCES[0]]
    finally:
        locker.close()
        reader.close()


def test_async_reader_unreachable_server_is_unavailable(runner: asyncio.Runner) -> None:
    # A port nobody listens on: PostgreSQL is down.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    registry = SqlRegistry(sa.create_engine(f"postgresql+psycopg://meta169@127.0.0.1:{port}/none"))
    reader = registry.async_reader(timeout=2.0)
    assert reader is not None
    try:
        with pytest.raises(RegistryUnavailable, match="cannot resolve 1 callers"):
            runner.run(reader.resolve_many([CALLERS[0]]))
    finally:
        reader.close()
        registry.close()


class _ThreadRecording(SqlRegistry):
    """PostgreSQL, recording each resolve_many made on the registry thread."""

    threads: list[int]

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        self.threads.append(threading.get_ident())
        return super().resolve_many(callers)


@pytest.mark.parametrize("async_lookups", [True, False])
def test_site_cache_first_requests_on_postgresql_are_read_on_the_loop(
    postgres_url: str, registry: SqlRegistry, async_lookups: bool
) -> None:
    recording = _ThreadRecording.open(sqlalchemy_url(postgres_url))
    recording.threads = []
    metrics = ServeMetrics()
    cache = SiteCache(recording, RenderOptions(), async_lookups=async_lookups, metrics=metrics)
    callers = [
        Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a"),
        Caller(ipaddress.ip_address("10.0.0.5"), network_id="net-b"),
        Caller(ipaddress.ip_address("10.1.0.4"), router_id="router-a"),
    ]

    async def run() -> None:
        # One at a time, then several together (a batch of the resolver).
        for caller in callers[:1]:
            entry = await cache.lookup((caller.network_id, caller.router_id, str(caller.ip)), caller)
            assert isinstance(entry, Site) and entry.instance == INSTANCES[0]
        together = await asyncio.gather(*(cache.lookup((c.network_id, c.router_id, str(c.ip)), c) for c in callers[1:]))
        assert [e.instance.uuid for e in together if isinstance(e, Site)] == [INSTANCES[1].uuid, INSTANCES[0].uuid]

    try:
        asyncio.run(run())
        if async_lookups:
            assert recording.threads == []
        else:
            assert len(recording.threads) >= 2 and threading.get_ident() not in recording.threads
        # Each read is timed by where it ran (meta169_serve_registry_read_duration_seconds).
        # (the last of a series' numbers is the sum of the observations, the others counts)
        reads = {labels: sum(counts[:-1]) for labels, counts in metrics.registry_reads.series.items()}
        via = "connection" if async_lookups else "thread"
        assert set(reads) == {(via,)} and reads[(via,)] >= 2
        assert async_lookups or reads[(via,)] == len(recording.threads)
    finally:
        cache.close()
        recording.close()


def test_site_cache_async_read_failure_marks_the_registry_down_and_a_success_up(
    postgres_url: str, registry: SqlRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meta169.api import cache as cache_module

    monkeypatch.setattr(cache_module, "LOOKUP_DEADLINE_S", 0.3)  # the reader's timeout too
    cache = SiteCache(registry, RenderOptions())
    states: list[bool] = []
    cache.on_registry_state = lambda up, _detail: states.append(up)
    caller = Caller(ipaddress.ip_address("10.0.0.6"), network_id="net-a")
    other = Caller(ipaddress.ip_address("10.1.0.4"), network_id="net-c")
    locker = sa.create_engine(postgres_url, poolclass=sa.NullPool).connect()

    async def run() -> None:
        entry = await cache.lookup(("net-a", None, "10.0.0.6"), caller)
        assert isinstance(entry, Site)
        locker.exec_driver_sql("BEGIN")
        locker.exec_driver_sql("LOCK TABLE port_ips IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(RegistryUnavailable):
            await cache.lookup(("net-c", None, "10.1.0.4"), other)
        for _ in range(100):  # the waiter's deadline may come just before the read's
            if not cache.registry_up:
                break
            await asyncio.sleep(0.02)
        assert not cache.registry_up and states == [False]
        # Still cached: answered while the registry is down.
        assert await cache.lookup(("net-a", None, "10.0.0.6"), caller) is entry
        locker.exec_driver_sql("ROLLBACK")
        await cache.poll_once()  # the poll probes the registry and ends the outage
        assert cache.registry_up and states == [False, True]
        entry = await cache.lookup(("net-c", None, "10.1.0.4"), other)
        assert isinstance(entry, Site) and entry.instance == INSTANCES[0]

    try:
        asyncio.run(run())
    finally:
        locker.close()
        cache.close()
