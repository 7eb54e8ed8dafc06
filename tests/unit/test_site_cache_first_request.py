"""The first request of a caller the site cache has never seen: only what it asks is
rendered, the registry read is made on the event loop when reads are in-process
(SQLite), and the deadline, the batching and the outage rules hold either way
(docs/benchmarks.md, "first-request")."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from meta169.api import cache as cache_module
from meta169.api.cache import INLINE_BATCH, Scope, SiteCache
from meta169.api.metadata import MetadataApp
from meta169.errors import RegistryUnavailable
from meta169.http.listen import Binding
from meta169.http.message import Response
from meta169.model import Caller, Instance, Network, Port, Subnet, parse_ip
from meta169.registry.base import Resolution
from meta169.registry.memory import MemoryRegistry
from meta169.render import RenderOptions, Site, build_site
from tests.http_parse import parse_request


class RecordingRegistry(MemoryRegistry):
    """The memory registry, recording the thread and the size of each resolve_many;
    it can be made slow or unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.delay = 0.0
        self.gate: threading.Event | None = None
        self.down = False

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        self.calls.append((threading.get_ident(), len(callers)))
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise RegistryUnavailable("registry down (test)")
        return super().resolve_many(callers)


def _uuid(n: int) -> str:
    return f"{n:08d}-0000-4000-8000-00000000f1f1"


def _ip(n: int) -> str:
    return f"10.0.{n // 200}.{n % 200 + 2}"


def _registry(count: int) -> RecordingRegistry:
    reg = RecordingRegistry()
    reg.put_network(Network(id="net-a", subnets=(Subnet(cidr=ipaddress.ip_network("10.0.0.0/16")),)))
    for n in range(count):
        reg.put_instance(
            Instance(
                uuid=_uuid(n),
                name=f"vm{n}",
                project_id="proj",
                user_data=b"#cloud-config\n",
                ports=(Port("net-a", f"fa:16:3e:00:{n // 256:02x}:{n % 256:02x}", (parse_ip(_ip(n)),)),),
            )
        )
    return reg


def _caller(n: int) -> Caller:
    return Caller(ip=parse_ip(_ip(n)), network_id="net-a")


def _key(n: int) -> tuple[str, str, str]:
    return ("net-a", "", _ip(n))


async def _get(app: MetadataApp, path: str, peer: str) -> tuple[int, bytes]:
    req = parse_request(f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode(), peer)
    assert req is not None
    result: Any = app(req)
    if isinstance(result, Awaitable):
        result = await result
    if isinstance(result, Response):
        return result.status, result.body
    return 200, result[1]


def _without_seed(body: bytes) -> bytes:
    start = body.find(b'"random_seed": "')
    return body if start < 0 else body[:start] + body[body.index(b'"', start + 16) :]


def test_site_cache_first_request_renders_only_the_version_asked() -> None:
    reg = _registry(1)
    cache = SiteCache(reg, RenderOptions())
    app = MetadataApp(cache, Binding("network", "net-a"))
    path = "/openstack/latest/meta_data.json"

    async def run() -> None:
        status, body = await _get(app, path, _ip(0))
        whole = build_site(reg.get_instance(_uuid(0)), {"net-a": reg.get_network("net-a")}, RenderOptions())
        doc = whole.lookup(path)
        assert doc is not None
        assert status == 200 and _without_seed(body) == _without_seed(doc.body)
        site = cache.by_caller[_key(0)]
        assert isinstance(site, Site) and not site.is_complete
        assert site.rendered == sum(p.startswith("/openstack/latest") for p in whole.documents)
        # The guest's next request, in another version, renders that version too.
        status, body = await _get(app, "/latest/meta-data/instance-id", _ip(0))
        assert (status, body) == (200, _uuid(0).encode())
        assert site.rendered < len(whole.documents) // 4

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_renders_ahead_whole_sites_sharing_their_small_documents() -> None:
    reg = _registry(3)
    cache = SiteCache(reg, RenderOptions(), prerender=Scope(everything=True))

    async def run() -> None:
        await cache.poll_once()
        cache.start()
        for _ in range(500):
            if cache.site_count == 3:
                break
            await asyncio.sleep(0.01)
        sites = [await cache.lookup(_key(n), _caller(n)) for n in range(3)]
        assert all(isinstance(s, Site) and s.is_complete for s in sites)
        assert reg.calls == []  # answered from what was rendered ahead
        first, second = (s for s in sites[:2] if isinstance(s, Site))
        assert first.lookup("/latest/meta-data/block-device-mapping") is second.lookup(
            "/latest/meta-data/block-device-mapping"
        )
        assert first.lookup("/latest/meta-data/instance-id") is not second.lookup("/latest/meta-data/instance-id")

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_first_request_read_on_the_event_loop_when_reads_are_inline() -> None:
    reg = _registry(2)
    inline = SiteCache(reg, RenderOptions(), inline_lookups=True)
    threaded = SiteCache(reg, RenderOptions(), inline_lookups=False)

    async def run() -> None:
        loop_thread = threading.get_ident()
        entry = await inline.lookup(_key(0), _caller(0))
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(0)
        entry = await threaded.lookup(_key(1), _caller(1))
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(1)
        assert [thread == loop_thread for thread, _ in reg.calls] == [True, False]

    try:
        asyncio.run(run())
    finally:
        inline.close()
        threaded.close()


def test_site_cache_inline_reads_batch_callers_arriving_together_on_the_registry_thread() -> None:
    reg = _registry(300)
    cache = SiteCache(reg, RenderOptions(), inline_lookups=True)

    async def run() -> None:
        loop_thread = threading.get_ident()
        entries = await asyncio.gather(*(cache.lookup(_key(n), _caller(n)) for n in range(300)))
        assert [e.instance.uuid for e in entries if isinstance(e, Site)] == [_uuid(n) for n in range(300)]
        # The first alone and at once; the others, arrived in the same turn of the
        # loop, in batches, on the registry thread as they are larger than INLINE_BATCH.
        assert reg.calls[0] == (loop_thread, 1)
        assert sum(size for _, size in reg.calls) == 300 and len(reg.calls) <= 3
        assert all(thread != loop_thread for thread, size in reg.calls if size > INLINE_BATCH)

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_slow_inline_read_sends_reads_to_the_registry_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "INLINE_STALL_S", 0.01)
    reg = _registry(2)
    reg.delay = 0.02
    cache = SiteCache(reg, RenderOptions(), inline_lookups=True)

    async def run() -> None:
        loop_thread = threading.get_ident()
        for n in range(2):
            entry = await cache.lookup(_key(n), _caller(n))
            assert isinstance(entry, Site) and entry.instance.uuid == _uuid(n)
        assert [thread == loop_thread for thread, _ in reg.calls] == [True, False]

    try:
        asyncio.run(run())
    finally:
        cache.close()


def test_site_cache_unreachable_registry_read_inline_serves_cached_callers_and_refuses_others() -> None:
    reg = _registry(3)
    cache = SiteCache(reg, RenderOptions(), inline_lookups=True)

    async def run() -> None:
        cached = await cache.lookup(_key(0), _caller(0))
        reg.down = True
        with pytest.raises(RegistryUnavailable):
            await cache.lookup(_key(1), _caller(1))
        assert not cache.registry_up
        calls = len(reg.calls)
        with pytest.raises(RegistryUnavailable):
            await cache.lookup(_key(2), _caller(2))  # at once: the registry is not asked
        assert len(reg.calls) == calls
        assert await cache.lookup(_key(0), _caller(0)) is cached
        reg.down = False
        await cache.poll_once()
        assert cache.registry_up
        entry = await cache.lookup(_key(2), _caller(2))
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(2)

    try:
        asyncio.run(run())
    finally:
        cache.close()


@pytest.mark.parametrize("inline", [False, True])
def test_site_cache_lookup_past_its_deadline_fails_alone_and_its_result_is_kept(
    monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    monkeypatch.setattr(cache_module, "LOOKUP_DEADLINE_S", 0.5)
    reg = _registry(2)
    cache = SiteCache(reg, RenderOptions(), inline_lookups=inline)

    async def run() -> None:
        if inline:
            # A registry thread read is what a deadline bounds: hold the loop's
            # inline turn with another caller so that this one is queued.
            await cache.lookup(_key(1), _caller(1))
            cache._inline_paused_until = time.monotonic() + 60  # as after a slow read
        reg.gate = threading.Event()
        first = asyncio.ensure_future(cache.lookup(_key(0), _caller(0)))
        await asyncio.sleep(0.25)
        second = asyncio.ensure_future(cache.lookup(_key(0), _caller(0)))
        await asyncio.sleep(0.35)  # past the first one's deadline, before the second's
        assert first.done() and isinstance(first.exception(), RegistryUnavailable)
        assert not second.done()
        reg.gate.set()
        entry = await second
        assert isinstance(entry, Site) and entry.instance.uuid == _uuid(0)
        assert cache.by_caller[_key(0)] is entry

    try:
        asyncio.run(run())
    finally:
        cache.close()
