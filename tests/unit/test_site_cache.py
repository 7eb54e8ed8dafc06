"""The site cache over the in-memory registry: sites rendered ahead, misses resolved in
batches, a bounded number of sites, and exactly what a change concerns dropped."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

from meta169.api.cache import MISS_AMBIGUOUS, Miss, Scope, SiteCache
from meta169.model import Caller, Instance, Network, Port, Router, Subnet, parse_ip
from meta169.registry import Changes
from meta169.registry.base import Notice, Resolution
from meta169.registry.memory import MemoryRegistry
from meta169.render import RenderOptions, Site


class CountingRegistry(MemoryRegistry):
    """The memory registry, counting the calls a cache makes to resolve callers and
    to read the change log."""

    def __init__(self) -> None:
        super().__init__()
        self.resolves: list[int] = []
        self.change_reads = 0

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        self.resolves.append(len(callers))
        return super().resolve_many(callers)

    def changed_since(self, revision: int) -> Changes:
        self.change_reads += 1
        return super().changed_since(revision)


def _uuid(n: int) -> str:
    return f"{n:08d}-0000-4000-8000-000000000000"


def _instance(n: int, net: str = "net-a", ip: str = "", name: str = "") -> Instance:
    address = ip or f"10.0.{n // 200}.{n % 200 + 2}"
    return Instance(
        uuid=_uuid(n),
        name=name or f"vm{n}",
        project_id="proj",
        ports=(Port(net, f"fa:16:3e:00:{n // 256:02x}:{n % 256:02x}", (parse_ip(address),)),),
    )


def _registry(count: int, *, nets: Sequence[str] = ("net-a",)) -> CountingRegistry:
    reg = CountingRegistry()
    for net in nets:
        reg.put_network(Network(id=net, subnets=(Subnet(cidr=ipaddress.ip_network("10.0.0.0/16")),)))
    for n in range(count):
        reg.put_instance(_instance(n, nets[n % len(nets)]))
    return reg


def _caller(n: int, net: str = "net-a") -> Caller:
    return Caller(ip=parse_ip(f"10.0.{n // 200}.{n % 200 + 2}"), network_id=net)


def _key(n: int, net: str = "net-a") -> tuple[str, str, str]:
    """The cache key a network listener uses: (network, router, address text)."""
    return (net, "", f"10.0.{n // 200}.{n % 200 + 2}")


async def _settled(cache: SiteCache, count: int) -> None:
    for _ in range(500):
        if cache.site_count >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{cache.site_count} sites rendered ahead, not {count}")


def test_site_cache_renders_ahead_the_scope_and_answers_without_a_query() -> None:
    reg = _registry(10, nets=("net-a", "net-b"))
    cache = SiteCache(reg, RenderOptions(), prerender=Scope(networks=frozenset({"net-a"})))

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        await _settled(cache, 5)
        await asyncio.sleep(0.05)
        assert cache.site_count == 5  # net-b's instances are not this server's
        for n in range(0, 10, 2):
            entry = await cache.lookup(_key(n, "net-a"), _caller(n))
            assert isinstance(entry, Site) and entry.instance.uuid == _uuid(n)
        assert reg.resolves == []
        entry = await cache.lookup(_key(1, "net-b"), _caller(1, "net-b"))
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(1)
        assert reg.resolves == [1]

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_resolves_concurrent_misses_in_batches() -> None:
    reg = _registry(300)
    cache = SiteCache(reg, RenderOptions())

    async def run() -> None:
        entries = await asyncio.gather(*(cache.lookup(_key(n, "net-a"), _caller(n)) for n in range(300)))
        assert [e.instance.uuid for e in entries if isinstance(e, Site)] == [_uuid(n) for n in range(300)]
        assert sum(reg.resolves) == 300 and len(reg.resolves) <= 3, reg.resolves

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_keeps_at_most_max_sites() -> None:
    reg = _registry(40)
    cache = SiteCache(reg, RenderOptions(), max_sites=16, prerender=Scope(everything=True))

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        await _settled(cache, 16)
        for n in range(40):
            entry = await cache.lookup(_key(n, "net-a"), _caller(n))
            assert isinstance(entry, Site) and entry.instance.uuid == _uuid(n)
            assert cache.site_count <= 16
            assert len(cache.by_caller) <= 16

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_address_claimed_twice_is_refused_not_served_to_its_former_owner() -> None:
    reg = _registry(3)
    cache = SiteCache(reg, RenderOptions(), prerender=Scope(everything=True))
    key = _key(0)

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        await _settled(cache, 3)
        assert isinstance(await cache.lookup(key, _caller(0)), Site)
        # Another instance takes the same address on the same network.
        reg.put_instance(_instance(7, ip="10.0.0.2"))
        await cache.apply_notice(Notice(reg.revision(), reg.revision() - 1, frozenset({_uuid(7)}), True, False))
        entry = await cache.lookup(key, _caller(0))
        assert isinstance(entry, Miss) and entry.reason == MISS_AMBIGUOUS
        # Unrelated callers kept their sites, without a query.
        resolves = len(reg.resolves)
        assert isinstance(await cache.lookup(_key(1), _caller(1)), Site)
        assert len(reg.resolves) == resolves

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_router_callers_of_a_contested_address_ask_the_registry() -> None:
    reg = _registry(2, nets=("net-a", "net-b"))
    # The same address on both networks of one router: refused through the router.
    reg.put_instance(_instance(5, "net-b", ip="10.0.0.2"))
    reg.put_router(Router("router-1", ("net-a", "net-b")))
    cache = SiteCache(reg, RenderOptions(), prerender=Scope(routers=frozenset({"router-1"})))
    caller = Caller(ip=parse_ip("10.0.0.2"), router_id="router-1")

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        await _settled(cache, 3)
        entry = await cache.lookup(("", "router-1", "10.0.0.2"), caller)
        assert isinstance(entry, Miss) and entry.reason == MISS_AMBIGUOUS
        assert reg.resolves == [1]
        other = Caller(ip=parse_ip("10.0.0.3"), router_id="router-1")
        entry = await cache.lookup(("", "router-1", "10.0.0.3"), other)
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(1)
        assert reg.resolves == [1]

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_renders_a_new_instance_when_its_change_arrives() -> None:
    reg = _registry(2)
    cache = SiteCache(reg, RenderOptions(), prerender=Scope(everything=True))

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        await _settled(cache, 2)
        reg.put_instance(_instance(9))
        await cache.apply_notice(Notice(reg.revision(), reg.revision() - 1, frozenset({_uuid(9)}), True, False))
        assert reg.change_reads == 0  # the notice said it all
        # One query, when the change arrived, for whom the new addresses resolve to.
        assert reg.resolves == [1]
        await _settled(cache, 3)
        entry = await cache.lookup(_key(9), _caller(9))
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(9)
        assert reg.resolves == [1]

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_notice_after_a_gap_reads_the_change_log() -> None:
    reg = _registry(2)
    cache = SiteCache(reg, RenderOptions())
    key = _key(0)

    async def run() -> None:
        await cache.poll_once()
        assert isinstance(await cache.lookup(key, _caller(0)), Site)
        reg.put_instance(_instance(0, name="renamed"))
        reg.put_instance(_instance(1, name="renamed"))
        # Only the second write's notice arrives: the first is read from the log.
        assert await cache.apply_notice(Notice(reg.revision(), reg.revision() - 1, frozenset({_uuid(1)})))
        assert reg.change_reads == 1
        entry = await cache.lookup(key, _caller(0))
        assert isinstance(entry, Site) and entry.instance.name == "renamed"
        # A notice the cache already holds changes nothing.
        assert not await cache.apply_notice(Notice(reg.revision(), reg.revision() - 1, frozenset({_uuid(1)})))

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_index_takes_the_registry_answer_for_a_changed_instance() -> None:
    # Two sites rendered ahead of four instances: a changed instance that takes the
    # address of one not rendered must not be answered from the index.
    reg = _registry(4)
    cache = SiteCache(reg, RenderOptions(), max_sites=2, prerender=Scope(everything=True))

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        await _settled(cache, 2)  # instances 0 and 1, in address order
        reg.put_instance(_instance(0, ip="10.0.0.5"))  # the address of instance 3
        await cache.apply_notice(Notice(reg.revision(), reg.revision() - 1, frozenset({_uuid(0)}), True, False))
        await asyncio.sleep(0.05)
        entry = await cache.lookup(_key(3), _caller(3))
        assert isinstance(entry, Miss) and entry.reason == MISS_AMBIGUOUS

    try:
        asyncio.run(run())
    finally:
        cache.close()
