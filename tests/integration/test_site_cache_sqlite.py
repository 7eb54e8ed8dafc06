"""The site cache on a SQLite file: a never-seen caller's registry read is made on the
event loop (no thread hand-off), while a writer holds the file, and a database kept in
memory stays on the registry thread (docs/benchmarks.md, "first-request")."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from meta169.api.cache import SiteCache
from meta169.model import Caller, Instance, Network, Port, Subnet, parse_ip
from meta169.registry import open_registry, sqlalchemy_url
from meta169.registry.base import Resolution
from meta169.registry.memory import MemoryRegistry
from meta169.registry.sql import SqlRegistry
from meta169.render import RenderOptions, Site

UUIDS = [f"{n:08d}-0000-4000-8000-00000000a5a5" for n in range(3)]


class RecordingSqlRegistry(SqlRegistry):
    """SQLite, recording the thread of each resolve_many."""

    threads: list[int]

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        self.threads.append(threading.get_ident())
        return super().resolve_many(callers)


def _fill(url: str) -> None:
    registry = open_registry(url, create=True)
    try:
        registry.put_network(Network(id="net-a", subnets=(Subnet(cidr=ipaddress.ip_network("10.0.0.0/24")),)))
        for n, uuid in enumerate(UUIDS):
            registry.put_instance(
                Instance(
                    uuid=uuid,
                    name=f"vm{n}",
                    ports=(Port("net-a", f"fa:16:3e:00:00:{n:02x}", (parse_ip(f"10.0.0.{n + 2}"),)),),
                )
            )
    finally:
        registry.close()


def test_site_cache_reads_inline_from_sqlite_files_only(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    _fill(url)
    for registry, inline in (
        (open_registry(url), True),
        (SqlRegistry.open("sqlite://"), False),  # in memory: a database per connection
        (MemoryRegistry(), False),
    ):
        try:
            assert registry.reads_in_process is inline
        finally:
            registry.close()


def test_site_cache_first_request_on_sqlite_is_read_on_the_event_loop_while_a_writer_holds_the_file(
    tmp_path: Path,
) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    _fill(url)
    registry = RecordingSqlRegistry.open(sqlalchemy_url(url))
    registry.threads = []
    writer = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
    cache = SiteCache(registry, RenderOptions())

    async def run() -> None:
        for n in range(2):
            entry = await cache.lookup(
                ("net-a", "", f"10.0.0.{n + 2}"), Caller(ip=parse_ip(f"10.0.0.{n + 2}"), network_id="net-a")
            )
            assert isinstance(entry, Site) and entry.instance.uuid == UUIDS[n]
            doc = entry.lookup("/latest/meta-data/instance-id")
            assert doc is not None and doc.body == UUIDS[n].encode()

    try:
        # WAL: a reader waits for no writer, so the loop is never held by one.
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE registry_revision SET revision = revision")
        asyncio.run(run())
        writer.execute("ROLLBACK")
        assert registry.threads == [threading.get_ident()] * 2
    finally:
        cache.close()
        registry.close()
        writer.close()
