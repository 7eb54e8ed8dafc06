"""Rendered sites per caller, kept in step with the registry, and ready before they are asked.

The hot path is two dict lookups: (scope, caller IP) -> Site, then path -> Document.

What is cached, and how it is bounded:

- ``by_caller``: what each caller was answered (a Site, or a Miss for a caller no
  instance matches), for the request path and for the compiled fast path's tables;
- the sites themselves by instance, at most ``max_sites`` (rendered sites are tens of
  kilobytes: an operator with 100,000 instances keeps the newest ones, the oldest
  go first and are rendered again when asked);
- with ``prerender`` (serve's default), sites rendered in the background when the
  cache starts (for the instances on the networks and routers this server answers
  for, read in batches: who owns which address with one query per batch of
  networks, then the instances a batch at a time) and for every instance a change
  brings, so a guest's first request usually finds its site ready; with them, an
  index of which scope and address resolves to each of those sites, as the
  registry answered, so that first request needs no query. The index holds the
  addresses of rendered sites only: its size follows ``max_sites``.

A caller whose site is not ready waits in a queue that the registry thread empties a
batch at a time: one query per scope for the whole batch (``Registry.resolve_many``),
then each caller is answered as soon as its own site is ready rather than after the
batch. A site made for a request is rendered a section at a time (one version of
one tree) as its paths are asked, on the event loop: the first request waits for
the documents of its own version only (``Site.lazily``).

Changes arrive by polling the registry's revision counter, and, with PostgreSQL, at
once through the registry's change feed (LISTEN/NOTIFY); the poll then runs only as
a slower safety net. Either way exactly what changed is dropped: the changed
instances, every negative entry, and, when ports moved, the callers of the addresses
involved. When networks or routers change everything is dropped and rebuilt.

When the registry cannot be reached, cached callers keep their answers (stale,
counted) and uncached callers get RegistryUnavailable at once, which the handler
answers 503 with Retry-After, never 404; the poll probes with backoff, and the first
answer ends the outage. Outages are logged once each, and once at their end.

Registry calls run on one worker thread (psycopg sessions stay on that thread); the
change feed's connection lives on the event loop, and so, with PostgreSQL, does the
connection that resolves first requests (the registry's AsyncReader): a first
request then waits for the server's round trip, not for the thread to get the CPU
and the interpreter lock from a busy loop and back. With SQLite on a file, a small
batch of first requests (INLINE_BATCH callers) is resolved on the event loop
instead: the read is in-process work of about a millisecond, and on a core the
loop keeps busy, handing it to the thread and back costs more than the read, up to
several milliseconds each way for the thread to get the CPU and the interpreter
lock (docs/benchmarks.md, "first-request"). SQLite's readers in WAL mode (the
registry's) wait for no writer; a read that takes longer than INLINE_STALL_S all
the same sends them back to the thread for INLINE_PAUSE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from meta169.api import vendordata
from meta169.api.identity import NeutronIdentity
from meta169.api.vendordata import DynamicTarget
from meta169.errors import AmbiguousCaller, NotFound, RegistryError, RegistryUnavailable
from meta169.http.wire import SiteSlots, WireEntry
from meta169.metrics.instruments import ServeMetrics
from meta169.model import Caller, Instance, Network, Router, parse_ip
from meta169.registry import Changes, Registry
from meta169.registry.base import AsyncReader, ChangeFeed, Notice, Resolution
from meta169.render import RenderOptions, Site
from meta169.render.document import Document

log = logging.getLogger("meta169.cache")
T = TypeVar("T")

# A caller the registry could not resolve, remembered until the next change so an
# unknown or misconfigured guest retrying in a loop costs one dict lookup per try.
MISS_UNKNOWN = "unknown"
MISS_AMBIGUOUS = "ambiguous"
MISS_TENANT = "tenant"


@dataclass(frozen=True, slots=True)
class Miss:
    reason: str
    error: RegistryError


Entry = Site | Miss

# Distinct request paths remembered per caller for the fast path: a site has a few
# hundred documents at most, each asked with and without a trailing slash.
MAX_WIRE_PATHS = 4096
# Rendered sites kept by default: about 30 KB each once compacted (shared keys and
# documents). With 100,000 instances registered the rest of serve (the address index
# among it) is about 120 MB, so 4,000 sites keep a node under 300 MB (bench.run scale).
DEFAULT_MAX_SITES = 4_000
# Negative entries kept at most (a guest scanning addresses makes one per address).
MAX_MISSES = 65_536
# Callers resolved by one registry call, and instances read by one prerender call.
RESOLVE_BATCH = 256
PRERENDER_BATCH = 128
# First requests resolved on the event loop at once, at most (see the docstring); a
# larger batch (a storm) is resolved on the registry thread, where it does not hold
# up the answers to cached callers.
INLINE_BATCH = 4
INLINE_STALL_S = 0.05
INLINE_PAUSE_S = 60.0
# Rendering on the event loop yields after this much work, so a storm of first
# requests delays the compiled fast path's answers by at most this long.
RENDER_SLICE_S = 0.003
# A change listing more instances than this is not read back instance by instance.
RELOAD_MAX = 2_000
# Polling while the change feed is healthy: only a safety net.
RELAXED_POLL_S = 5.0
# Probing an unreachable registry, and reconnecting the change feed: doubling from
# the first to the last, with jitter so that many serve nodes do not retry together.
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 5.0
# Retry-After of a 503 for a caller not cached while the registry is unreachable.
RETRY_AFTER_S = 2
# A first request waits at most this long for the registry (plus the dynamic vendor
# data targets' timeouts), then gets 503 with Retry-After: a database that stopped
# answering without closing its connections must not hold guests for the kernel's
# TCP timeouts. The lookup goes on, and its result is kept for the next request.
LOOKUP_DEADLINE_S = 5.0
# Several full rebuilds asked within this long (an import writing many networks)
# make one.
REBUILD_DEBOUNCE_S = 0.1
# Bodies up to this size are shared between sites when equal (listings, most leaves).
_SHARED_BODY_MAX = 1024
_SHARED_DOCS_MAX = 65_536


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose callers a server answers: those of ``networks`` and ``routers``, or,
    with ``everything`` (a proxy or Neutron listener), those of any."""

    networks: frozenset[str] = frozenset()
    routers: frozenset[str] = frozenset()
    everything: bool = False


@dataclass(slots=True)
class _Pending:
    """A caller being resolved, and the lookups waiting for it (each with its own
    deadline: answering one wakes its request's task at once, with no chain of
    callbacks between the result and the request)."""

    key: Hashable
    caller: Caller | NeutronIdentity
    waiters: list[asyncio.Future[Entry]] = field(default_factory=list)
    settled: bool = False

    def settle(self, entry: Entry) -> None:
        self.settled = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(entry)
        self.waiters.clear()

    def fail(self, exc: BaseException) -> None:
        self.settled = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # mark retrieved; the lookup re-raises it itself
        self.waiters.clear()


def _expire(waiter: asyncio.Future[Entry], deadline: float) -> None:
    if not waiter.done():
        waiter.set_exception(RegistryUnavailable(f"no answer from the registry within {deadline:g} s"))
        waiter.exception()


@dataclass(frozen=True, slots=True)
class _Single:
    """A caller of a batch that failed for one unreadable instance: resolved alone."""

    pending: _Pending


# A caller's scope and address, as the registry resolves them: (network id, "",
# address) or ("", router id, address), the address in normalized text.
ScopeKey = tuple[str, str, str]


def scope_key(caller: Caller) -> ScopeKey:
    return (caller.network_id or "", caller.router_id or "", str(caller.ip))


@dataclass(slots=True)
class _Ownership:
    """Whose site each scope key gets, for the sites rendered ahead only: each entry
    is what ``Registry.resolve`` answered for that key (read from the scope's every
    port IP when the index was built, asked of the registry for a changed
    instance), so answering from it never differs from asking."""

    networks: frozenset[str]
    routers: dict[str, Router]
    owners: dict[ScopeKey, str] = field(default_factory=dict)
    keys_of: dict[str, tuple[ScopeKey, ...]] = field(default_factory=dict)
    # Keys claimed by several instances since: only the registry answers those.
    contested: set[ScopeKey] = field(default_factory=set)

    def claim(self, uuid: str, keys: Iterable[ScopeKey]) -> None:
        mine: list[ScopeKey] = []
        for key in keys:
            if key in self.contested:
                continue
            held = self.owners.get(key)
            if held is None or held == uuid:
                self.owners[key] = uuid
                mine.append(key)
            else:
                del self.owners[key]
                self.contested.add(key)
        self.keys_of[uuid] = (*self.keys_of.get(uuid, ()), *mine)

    def release(self, uuid: str) -> None:
        for key in self.keys_of.pop(uuid, ()):
            if self.owners.get(key) == uuid:
                del self.owners[key]

    def contest(self, keys: Iterable[ScopeKey]) -> None:
        """Another instance now claims these too (it changed): refuse them here."""
        for key in keys:
            self.owners.pop(key, None)
            self.contested.add(key)

    def keys(self, instance: Instance) -> list[ScopeKey]:
        """The scope keys the instance's addresses have in this server's scope."""
        out: list[ScopeKey] = []
        for port in instance.ports:
            if port.network_id not in self.networks:
                continue
            for ip in port.ips:
                out.append((port.network_id, "", str(ip)))
                out.extend(("", r.id, str(ip)) for r in self.routers.values() if port.network_id in r.network_ids)
        return out


def _resolve_rows(rows: Iterable[tuple[str, str, str]], routers: Mapping[str, Router]) -> dict[ScopeKey, str]:
    """What ``Registry.resolve`` answers for every scope key, from every port IP of the
    scope's networks: the one owner of each key (keys owned by several left out)."""
    owners: dict[ScopeKey, str | None] = {}

    def put(key: ScopeKey, uuid: str) -> None:
        held = owners.get(key, uuid)
        owners[key] = uuid if held == uuid else None

    by_network: dict[str, list[Router]] = {}
    for router in routers.values():
        for network_id in router.network_ids:
            by_network.setdefault(network_id, []).append(router)
    for network_id, ip, uuid in rows:
        put((network_id, "", ip), uuid)
        for router in by_network.get(network_id, ()):
            put(("", router.id, ip), uuid)
    return {key: uuid for key, uuid in owners.items() if uuid is not None}


def _in_order(
    callers: Sequence[Caller | NeutronIdentity], resolved: Sequence[Resolution], by_id: Iterable[Instance]
) -> list[Resolution | NotFound]:
    """Each caller's answer: the next of ``resolved`` for a caller by address (in
    order), the instance of ``by_id`` for Neutron's caller by instance id."""
    answers = iter(resolved)
    instances = {i.uuid: i for i in by_id}
    found: list[Resolution | NotFound] = []
    for caller in callers:
        if isinstance(caller, Caller):
            found.append(next(answers))
        else:
            instance = instances.get(caller.instance_id)
            found.append(instance if instance is not None else NotFound(f"no instance {caller.instance_id}"))
    return found


def _networks_needed(found: Iterable[Resolution | NotFound], known: frozenset[str]) -> set[str]:
    """The networks the instances ``found`` have ports on that are not ``known``."""
    return {p.network_id for i in found if isinstance(i, Instance) for p in i.ports} - known


class SiteCache:
    def __init__(
        self,
        registry: Registry,
        options: RenderOptions,
        *,
        max_sites: int = DEFAULT_MAX_SITES,
        prerender: Scope | None = None,
        vendordata_targets: Sequence[DynamicTarget] = (),
        vendordata_timeout: float = 2.0,
        metrics: ServeMetrics | None = None,
        inline_lookups: bool | None = None,
        async_lookups: bool = True,
    ) -> None:
        """``inline_lookups``: resolve small batches of first requests on the event
        loop (None: when the registry's reads are in-process, SQLite on a file);
        ``async_lookups``: resolve first requests through the registry's
        asynchronous reader when it has one (PostgreSQL), not on the registry thread."""
        if max_sites < 1:
            raise ValueError("max_sites must be >= 1")
        # Counts the registry polls and the outages (the lookups are counted by their callers).
        self._metrics = metrics
        self._targets = tuple(vendordata_targets)
        self._vendordata_timeout = vendordata_timeout
        self._deadline = LOOKUP_DEADLINE_S + vendordata_timeout * len(self._targets)
        self._registry = registry
        self._options = options
        self._max_sites = max_sites
        # Rendering ahead asks no dynamic vendor data target: those are asked when a
        # guest asks, as Nova does.
        self._scope = prerender if not self._targets else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meta169-registry")
        self._inline = registry.reads_in_process if inline_lookups is None else inline_lookups
        self._reader = registry.async_reader(timeout=LOOKUP_DEADLINE_S) if async_lookups else None
        # Monotonic time until which lookups go to the registry thread (after a slow read).
        self._inline_paused_until = 0.0
        # Set while a caller resolved on the loop at once has this turn of the loop.
        self._inline_turn = False
        # Set while a caller is read over the asynchronous reader in its own request.
        self._reading = False
        # Dynamic vendor data is fetched here, so a slow target delays only its own
        # instances, not the registry thread.
        self._vd_executor = (
            ThreadPoolExecutor(max_workers=8, thread_name_prefix="meta169-vendordata") if self._targets else None
        )
        self.by_caller: dict[Hashable, Entry] = {}
        self._caller_keys: dict[str, list[Hashable]] = {}
        self._miss_keys: set[Hashable] = set()
        # Insertion order is age: the oldest sites are evicted first.
        self._sites: dict[str, Site] = {}
        self._networks: dict[str, Network] = {}
        self._ownership: _Ownership | None = None
        self._shared_docs: dict[tuple[str, bytes], Document] = {}
        self._revision = -1
        # Bumped when the render options change (a reload): a site rendered with the
        # old ones while the change happened is served once but not remembered.
        self._epoch = 0
        # Each invalidation bumps the generation; a result read before a change that
        # concerns it is served to its caller but not remembered.
        self._gen = 0
        self._topology_gen = 0
        self._changed_at: dict[str, int] = {}
        self._inflight: dict[Hashable, _Pending] = {}
        self._queue: list[_Pending | _Single] = []
        self._resolver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._rebuild: asyncio.Task[object] | None = None
        self._lock: asyncio.Lock | None = None
        self._poke: asyncio.Event | None = None
        # Registry reachability: the outage count tells a call that began before an
        # outage (whose success proves nothing) from one that began during it.
        self._up = True
        self._outages = 0
        self._down_since = 0.0
        self._listening = False
        # Told (up, detail) when the registry becomes unreachable or reachable again.
        self.on_registry_state: Callable[[bool, str], None] | None = None
        # The fast path's tables (http.wire) by network id and by router id, each
        # mapping caller address text to a slot. Only ever changed in place:
        # compiled code holds them.
        self._wire_networks: dict[str, SiteSlots] = {}
        self._wire_routers: dict[str, SiteSlots] = {}
        self._wire_of: dict[str, list[tuple[SiteSlots, str]]] = {}

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def render_options(self) -> RenderOptions:
        return self._options

    @property
    def registry_up(self) -> bool:
        """Whether the registry answered the last time it was asked."""
        return self._up

    @property
    def listening(self) -> bool:
        """Whether the change feed is connected (changes arrive as they commit)."""
        return self._listening

    @property
    def revision(self) -> int:
        """The registry revision the cache is current with (-1 before the first read)."""
        return self._revision

    @property
    def site_count(self) -> int:
        return len(self._sites)

    def set_render_options(self, options: RenderOptions) -> None:
        """Render with ``options`` from now on (a reload): every cached site is dropped."""
        self._options = options
        self._epoch += 1
        self.invalidate(frozenset(), topology=True)

    # -- lookups -----------------------------------------------------------------------------
    async def lookup(self, key: Hashable, caller: Caller | NeutronIdentity) -> Entry:
        """Resolve and render on a miss; concurrent misses for one key share the work.

        Raises RegistryUnavailable at once for a caller not cached while the
        registry is unreachable, or when the registry has not answered within the
        deadline (LOOKUP_DEADLINE_S), and any RegistryError the registry raised.
        """
        cached = self.by_caller.get(key)
        if cached is not None:
            return cached
        ready = self._ready_entry(caller)
        if ready is not None:
            self._remember(key, ready)
            return ready
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Entry] = loop.create_future()
        pending = self._inflight.get(key)
        if pending is None:
            if not self._up:
                raise RegistryUnavailable("the registry is unreachable and this caller is not cached")
            pending = self._inflight[key] = _Pending(key, caller, [waiter])
            if self._inline_now(loop):
                # Nothing else waits: this caller at once, with no task between the
                # request and the read (its waiter is settled when this returns,
                # unless dynamic vendor data is being fetched).
                await self._resolve_now(pending)
            elif self._reader is not None and self._reader_now():
                # The same over the asynchronous reader: awaited in this request's
                # task; callers arriving meanwhile queue for the resolver.
                await self._resolve_now(pending, self._reader)
            else:
                self._queue.append(pending)
                if self._resolver is None:
                    self._resolver = loop.create_task(self._resolve_queue())
        else:
            pending.waiters.append(waiter)
        if waiter.done():
            return waiter.result()
        # The deadline fails this lookup only: the resolution goes on for the others
        # and is kept for the next request.
        timer = loop.call_later(self._deadline, _expire, waiter, self._deadline)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _inline_now(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a new caller is resolved on the loop at once: reads are inline,
        nothing is queued or being resolved, and no caller was resolved so in this
        turn of the loop (callers arriving together are batched instead)."""
        if not self._inline or self._queue or self._resolver is not None or self._inline_turn:
            return False
        if self._vd_executor is not None:
            return False  # the vendor data fetch is bounded by the deadline: through the queue
        if time.monotonic() < self._inline_paused_until:
            return False
        self._inline_turn = True
        loop.call_soon(self._end_inline_turn)
        return True

    def _end_inline_turn(self) -> None:
        self._inline_turn = False

    def _reader_now(self) -> bool:
        """Whether a new caller is resolved over the asynchronous reader at once, in
        its own request: nothing is queued or being resolved, no such read runs, and
        no dynamic vendor data is asked (its fetch is bounded by the queue's deadline)."""
        if self._queue or self._resolver is not None or self._reading or self._vd_executor is not None:
            return False
        self._reading = True
        return True

    async def _resolve_now(self, pending: _Pending, reader: AsyncReader | None = None) -> None:
        """Resolve one caller on the loop and settle it (see :meth:`_resolve_queue`):
        in-process (SQLite), or awaiting ``reader`` (bounded by its timeout)."""
        gen, epoch = self._gen, self._epoch
        started = time.perf_counter()
        known = frozenset(self._networks)
        try:
            if reader is None:
                found, networks = self._call_inline(self._fetch_callers, [pending.caller], known)
                self._read_took("loop", started)
            else:
                try:
                    found, networks = await self._fetch_callers_async(reader, [pending.caller], known)
                finally:
                    self._reading = False
                self._read_took("connection", started)
        except RegistryError as exc:
            self._fail(pending, exc)
            return
        except BaseException as exc:
            self._fail(pending, RegistryError(f"lookup abandoned: {exc!r}"))
            raise
        if self._topology_gen <= gen:
            self._networks.update(networks)
        try:
            await self._settle([pending], found, networks, gen, epoch)
        except BaseException as exc:
            self._fail(pending, RegistryError(f"lookup abandoned: {exc!r}"))
            raise

    def _ready_entry(self, caller: Caller | NeutronIdentity) -> Entry | None:
        """The entry a caller gets without the registry: its site rendered ahead, as
        the ownership index names it (or, for Neutron, as the instance id does)."""
        if isinstance(caller, NeutronIdentity):
            site = self._sites.get(caller.instance_id)
            if site is None:
                return None
            if site.instance.project_id != caller.tenant_id:
                return Miss(MISS_TENANT, NotFound(f"instance {caller.instance_id} is not in {caller.tenant_id}"))
            return site
        ownership = self._ownership
        if ownership is None:
            return None
        uuid = ownership.owners.get(scope_key(caller))
        return None if uuid is None else self._sites.get(uuid)

    async def _resolve_queue(self) -> None:
        """Answer the waiting callers a batch at a time, until none waits."""
        try:
            while self._queue:
                if isinstance(self._queue[0], _Single):
                    batch, self._queue = [self._queue[0].pending], self._queue[1:]
                else:
                    size = next((i for i, p in enumerate(self._queue) if isinstance(p, _Single)), len(self._queue))
                    taken = self._queue[: min(size, RESOLVE_BATCH)]
                    self._queue = self._queue[len(taken) :]
                    batch = [p for p in taken if isinstance(p, _Pending)]
                gen, epoch = self._gen, self._epoch
                callers = [p.caller for p in batch]
                started = time.perf_counter()
                try:
                    known = frozenset(self._networks)
                    if self._inline and len(callers) <= INLINE_BATCH and time.monotonic() >= self._inline_paused_until:
                        found, networks = self._call_inline(self._fetch_callers, callers, known)
                        self._read_took("loop", started)
                    elif self._reader is not None:
                        found, networks = await self._fetch_callers_async(self._reader, callers, known)
                        self._read_took("connection", started)
                    else:
                        found, networks = await self._call(self._fetch_callers, callers, known)
                        self._read_took("thread", started)
                except RegistryError as exc:
                    if isinstance(exc, RegistryUnavailable) or len(batch) == 1:
                        for pending in batch:
                            self._fail(pending, exc)
                    else:
                        # One unreadable instance must not fail the others: one by one.
                        self._queue[:0] = [_Single(p) for p in batch]
                    continue
                except BaseException as exc:
                    for pending in batch:
                        self._fail(pending, RegistryError(f"lookup abandoned: {exc!r}"))
                    raise
                if self._topology_gen <= gen:
                    self._networks.update(networks)
                try:
                    await self._settle(batch, found, networks, gen, epoch)
                except BaseException as exc:
                    for pending in batch:
                        self._fail(pending, RegistryError(f"lookup abandoned: {exc!r}"))
                    raise
        finally:
            self._resolver = None
            if self._queue:  # cancelled with callers waiting
                for queued in self._queue:
                    pending = queued.pending if isinstance(queued, _Single) else queued
                    self._fail(pending, RegistryError("lookup abandoned: the cache is closing"))
                self._queue = []

    def _read_took(self, via: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.registry_reads.observe(time.perf_counter() - started, (via,))

    def _fail(self, pending: _Pending, exc: BaseException) -> None:
        if self._inflight.get(pending.key) is pending:
            del self._inflight[pending.key]
        if not pending.settled:
            pending.fail(exc)

    def _fetch_callers(
        self, callers: Sequence[Caller | NeutronIdentity], known: frozenset[str]
    ) -> tuple[list[Resolution | NotFound], dict[str, Network]]:
        """On the registry thread: who the callers are, and the networks their sites
        need that the cache does not hold."""
        plain = [c for c in callers if isinstance(c, Caller)]
        resolved = self._registry.resolve_many(plain) if plain else []
        ids = [c.instance_id for c in callers if isinstance(c, NeutronIdentity)]
        found = _in_order(callers, resolved, self._registry.get_instances(ids) if ids else ())
        need = _networks_needed(found, known)
        return found, (self._registry.get_networks(need) if need else {})

    async def _fetch_callers_async(
        self, reader: AsyncReader, callers: Sequence[Caller | NeutronIdentity], known: frozenset[str]
    ) -> tuple[list[Resolution | NotFound], dict[str, Network]]:
        """:meth:`_fetch_callers` with the callers resolved by ``reader`` on the loop
        (within its timeout). Neutron's callers (by instance id) and networks the
        cache has not read yet (the first caller of a network after a start or a
        topology change) are read on the registry thread, within the lookup's
        deadline: a caller resolved in its own request has no other."""
        plain = [c for c in callers if isinstance(c, Caller)]
        resolved = await self._watched(reader.resolve_many(plain)) if plain else []
        ids = [c.instance_id for c in callers if isinstance(c, NeutronIdentity)]
        by_id = await self._call_within(self._registry.get_instances, ids) if ids else ()
        found = _in_order(callers, resolved, by_id)
        need = _networks_needed(found, known)
        return found, (await self._call_within(self._registry.get_networks, need) if need else {})

    async def _call_within(self, fn: Callable[..., T], *args: object) -> T:
        """:meth:`_call`, given up (RegistryUnavailable) after the lookup's deadline;
        the thread's read goes on and its result is dropped."""
        try:
            async with asyncio.timeout(self._deadline):
                return await self._call(fn, *args)
        except TimeoutError as exc:
            raise RegistryUnavailable(f"no answer from the registry within {self._deadline:g} s") from exc

    async def _settle(
        self,
        batch: Sequence[_Pending],
        found: Sequence[Resolution | NotFound],
        networks: Mapping[str, Network],
        gen: int,
        epoch: int,
    ) -> None:
        """Render and answer each caller of a batch in turn, yielding to the loop
        between sites."""
        started = time.perf_counter()
        for pending, result in zip(batch, found, strict=True):
            if pending.settled:
                continue
            entry: Entry
            miss = self._miss_of(pending.caller, result)
            if miss is not None:
                entry = miss
            else:
                assert isinstance(result, Instance)
                entry = await self._site_for(result, networks, gen, epoch)
            if self._inflight.get(pending.key) is pending:
                del self._inflight[pending.key]
            pending.settle(entry)
            if epoch == self._epoch and not self._stale(entry, gen):
                self._remember(pending.key, entry)
            if time.perf_counter() - started > RENDER_SLICE_S:
                await asyncio.sleep(0)
                started = time.perf_counter()

    @staticmethod
    def _miss_of(caller: Caller | NeutronIdentity, result: Resolution | NotFound) -> Miss | None:
        if isinstance(result, Instance):
            if isinstance(caller, NeutronIdentity) and result.project_id != caller.tenant_id:
                # Nova: an instance of another tenant is "not found", never served.
                return Miss(MISS_TENANT, NotFound(f"instance {caller.instance_id} is not in {caller.tenant_id}"))
            return None
        if isinstance(result, AmbiguousCaller):
            return Miss(MISS_AMBIGUOUS, result)
        return Miss(MISS_UNKNOWN, result)

    async def _site_for(self, instance: Instance, networks: Mapping[str, Network], gen: int, epoch: int) -> Site:
        """The instance's site: the cached one if it is still this instance's,
        else rendered (and kept unless a change since ``gen`` concerns it)."""
        site = self._sites.get(instance.uuid)
        if site is not None and site.instance == instance:
            return site
        site = await self._render(instance, networks)
        if epoch == self._epoch and not self._stale(site, gen):
            self._store_site(site)
        return site

    async def _render(self, instance: Instance, networks: Mapping[str, Network], *, whole: bool = False) -> Site:
        """The instance's site: rendered ``whole`` (ahead of any request), else a
        section at a time as its paths are asked, so a first request waits for the
        version it asks only (about a twentieth of the site)."""
        mine: dict[str, Network] = {}
        for port in instance.ports:
            network = networks.get(port.network_id) or self._networks.get(port.network_id)
            if network is not None:
                mine[port.network_id] = network
            elif port.network_id not in mine:
                log.warning("instance %s has a port on unknown network %s", instance.uuid, port.network_id)
        options = self._options
        if self._vd_executor is not None:
            loop = asyncio.get_running_loop()
            options = await loop.run_in_executor(self._vd_executor, self._with_vendordata, instance, options)
        site = Site.lazily(instance, mine, options, share=self._share)
        return site.complete() if whole else site

    def _with_vendordata(self, instance: Instance, options: RenderOptions) -> RenderOptions:
        # A slow target delays only this instance's first request, bounded by the
        # timeout per target.
        dynamic = vendordata.fetch(self._targets, instance, timeout=self._vendordata_timeout)
        return dataclasses.replace(options, vendor_data2_dynamic={**options.vendor_data2_dynamic, **dynamic})

    def _share(self, doc: Document) -> Document:
        """An equal small document another site holds, else ``doc`` (kept for the next
        site): with the path keys interned, sites take a third of the memory."""
        if doc.fresh is not None or len(doc.body) > _SHARED_BODY_MAX:
            return doc
        shared = self._shared_docs
        if len(shared) > _SHARED_DOCS_MAX:
            shared.clear()
        return shared.setdefault((doc.content_type, doc.body), doc)

    def _stale(self, entry: Entry, gen: int) -> bool:
        """Whether a change since ``gen`` concerns ``entry`` (read at ``gen``)."""
        if isinstance(entry, Miss):
            return self._gen != gen
        return self._topology_gen > gen or self._changed_at.get(entry.instance.uuid, -1) > gen

    # -- what is kept --------------------------------------------------------------------------
    def _remember(self, key: Hashable, entry: Entry) -> None:
        held = self.by_caller.get(key)
        if held is entry:
            return
        if held is not None:
            self._forget_key(key)
        if isinstance(entry, Miss):
            if len(self._miss_keys) >= MAX_MISSES:
                self._drop_misses()
            self._miss_keys.add(key)
        else:
            if self._sites.get(entry.instance.uuid) is not entry:
                self._store_site(entry)
            self._caller_keys.setdefault(entry.instance.uuid, []).append(key)
        self.by_caller[key] = entry

    def _forget_key(self, key: Hashable) -> None:
        held = self.by_caller.pop(key, None)
        if isinstance(held, Miss):
            self._miss_keys.discard(key)
        elif held is not None:
            keys = self._caller_keys.get(held.instance.uuid)
            if keys is not None:
                with contextlib.suppress(ValueError):
                    keys.remove(key)

    def _store_site(self, site: Site) -> None:
        uuid = site.instance.uuid
        held = self._sites.get(uuid)
        if held is site:
            return
        if held is not None:
            self._drop_site(uuid)
        self._sites[uuid] = site
        if len(self._sites) > self._max_sites:
            # The oldest eighth at once: eviction walks the fast path's tables.
            count = max(1, self._max_sites // 8)
            oldest = [u for u, _ in zip(self._sites, range(count), strict=False)]
            for old in oldest:
                self._drop_site(old)

    def _drop_site(self, uuid: str) -> None:
        self._sites.pop(uuid, None)
        if self._ownership is not None:
            self._ownership.release(uuid)
        for key in self._caller_keys.pop(uuid, ()):
            entry = self.by_caller.get(key)
            if isinstance(entry, Site) and entry.instance.uuid == uuid:
                del self.by_caller[key]
        self._forget_wire_of(uuid)

    def _drop_misses(self) -> None:
        for key in self._miss_keys:
            self.by_caller.pop(key, None)
        self._miss_keys.clear()

    # -- the compiled fast path's tables ---------------------------------------------------------
    @property
    def wire_scopes(self) -> tuple[dict[str, SiteSlots], dict[str, SiteSlots]]:
        """The fast path's tables by network id and by router id (proxy listeners)."""
        return self._wire_networks, self._wire_routers

    def wire_sites(self, network_id: str, router_id: str) -> SiteSlots:
        """The fast path's table for one scope (a network listener or a router listener)."""
        if network_id:
            return self._wire_networks.setdefault(network_id, {})
        return self._wire_routers.setdefault(router_id, {})

    def remember_wire(
        self,
        key: tuple[str, str, object],
        peer: str,
        site: Site,
        entries: Iterable[tuple[bytes, WireEntry]],
        *,
        tokens_required: bool = False,
    ) -> None:
        """Let the fast path repeat replies the Python path gives the caller cached
        under ``key`` (network id, router id, address), whose address the request
        spelled ``peer``: each entry is a request path and its reply; with
        ``tokens_required`` (IMDSv2 ``http_tokens: required``) only to requests
        carrying a token it knows (``http.wire``).

        Only while ``site`` is still what the cache holds for the caller: a site
        loaded across a registry change is served once but never remembered.
        """
        if self.by_caller.get(key) is not site:
            return
        sites = self.wire_sites(key[0], key[1])
        slot = sites.get(peer)
        uuid = site.instance.uuid
        if slot is None or slot[1] != uuid:
            slot = sites[peer] = ({}, uuid, tokens_required)
            self._wire_of.setdefault(uuid, []).append((sites, peer))
        elif (len(slot) == 3 and slot[2]) != tokens_required:
            slot = sites[peer] = ({}, uuid, tokens_required)
        table = slot[0]
        for path, entry in entries:
            if len(table) >= MAX_WIRE_PATHS:
                break
            table[path] = entry

    def remembers_wire(self, key: tuple[str, str, object], peer: str, site: Site, path: bytes) -> bool:
        """Whether the fast path holds ``path`` for this caller and ``site`` already, or
        can hold no more for it."""
        slot = self.wire_sites(key[0], key[1]).get(peer)
        if slot is None or slot[1] != site.instance.uuid:
            return False
        return path in slot[0] or len(slot[0]) >= MAX_WIRE_PATHS

    def _forget_wire_of(self, uuid: str) -> None:
        for sites, peer in self._wire_of.pop(uuid, ()):
            slot = sites.get(peer)
            if slot is not None and slot[1] == uuid:
                del sites[peer]

    def _forget_wire(self, uuids: Iterable[str] | None) -> None:
        if uuids is not None:
            for uuid in uuids:
                self._forget_wire_of(uuid)
            return
        for tables in (self._wire_networks, self._wire_routers):
            for sites in tables.values():
                sites.clear()
        self._wire_of.clear()

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run a registry call on the registry thread (password writes and reads)."""
        return await self._call(fn, *args)

    def _call_inline(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the event loop, as :meth:`_call` runs it on the registry
        thread; a slow one sends the next ones to the thread for a while."""
        outage = self._outages
        started = time.monotonic()
        try:
            result = fn(*args)
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            raise
        finally:
            took = time.monotonic() - started
            if took > INLINE_STALL_S:
                self._inline_paused_until = time.monotonic() + INLINE_PAUSE_S
                log.warning(
                    "a registry read on the event loop took %.0f ms: first requests are resolved on the "
                    "registry thread for the next %.0f s",
                    took * 1000,
                    INLINE_PAUSE_S,
                )
        if not self._up and outage == self._outages:
            self._registry_back()
        return result

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the registry thread; its outcome says whether the
        registry is reachable."""
        return await self._watched(asyncio.get_running_loop().run_in_executor(self._executor, fn, *args))

    async def _watched(self, read: Awaitable[T]) -> T:
        """Await a registry read begun just now; its outcome says whether the
        registry is reachable."""
        outage = self._outages
        try:
            result = await read
        except RegistryUnavailable as exc:
            self._registry_down(exc)
            raise
        if not self._up and outage == self._outages:
            self._registry_back()
        return result

    # -- registry reachability ---------------------------------------------------------------------
    def _registry_down(self, exc: RegistryUnavailable) -> None:
        if not self._up:
            return
        self._up = False
        self._outages += 1
        self._down_since = time.monotonic()
        cached = len(self._sites)
        log.error(
            "registry unreachable, answering the %d cached instances from cache and other callers 503 "
            "until it is back: %s",
            cached,
            exc,
        )
        if self._metrics is not None:
            self._metrics.registry_state(False)
        if self._poke is not None:
            self._poke.set()
        if self.on_registry_state is not None:
            self.on_registry_state(False, f"unreachable: {exc}")

    def _registry_back(self) -> None:
        if self._up:
            return
        self._up = True
        log.warning("registry reachable again after %.1f s", time.monotonic() - self._down_since)
        if self._metrics is not None:
            self._metrics.registry_state(True)
        if self.on_registry_state is not None:
            self.on_registry_state(True, "")

    # -- invalidation ------------------------------------------------------------------------
    def _loop_state(self) -> tuple[asyncio.Lock, asyncio.Event]:
        # Made on first use, on the loop that uses them.
        if self._lock is None or self._poke is None:
            self._lock, self._poke = asyncio.Lock(), asyncio.Event()
        return self._lock, self._poke

    async def poll_forever(
        self, interval: float, on_poll: Callable[[bool, RegistryError | None], None] | None = None
    ) -> None:
        """Poll every ``interval`` (every RELAXED_POLL_S while the change feed is
        connected; with backoff while the registry is unreachable); ``on_poll``
        hears after each poll whether anything changed, or the error (the server's
        readiness checks)."""
        _, poke = self._loop_state()
        metrics = self._metrics
        backoff = BACKOFF_FIRST_S
        first = True
        while True:
            if not first:
                if not self._up:
                    delay = backoff
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                elif self._listening:
                    delay = max(interval, RELAXED_POLL_S)
                else:
                    delay = interval
                poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poke.wait(), delay)
            first = False
            try:
                changed = await self.poll_once()
            except RegistryError as exc:
                if metrics is not None:
                    metrics.polls.inc(("failed",))
                if not isinstance(exc, RegistryUnavailable):
                    log.error("registry poll failed, serving cached data: %s", exc)
                if on_poll is not None:
                    on_poll(False, exc)
                continue
            backoff = BACKOFF_FIRST_S
            if metrics is not None:
                metrics.poll_ok(self._revision)
            if on_poll is not None:
                on_poll(changed, None)

    async def poll_once(self) -> bool:
        """Drop what changed since the last poll; whether anything did."""
        lock, _ = self._loop_state()
        async with lock:
            return await self._poll_locked()

    async def _poll_locked(self) -> bool:
        current = await self._call(self._registry.revision)
        if self._revision < 0:
            # The first read: whatever was cached before it (nothing, normally) may
            # predate changes this revision already holds.
            self._revision = current
            if self.by_caller or self._sites:
                self.invalidate(frozenset(), topology=True)
            return False
        if current == self._revision:
            return False
        changes = await self._call(self._registry.changed_since, self._revision)
        await self._apply(changes, networks_changed=True)
        return True

    async def apply_notice(self, notice: Notice) -> bool:
        """Apply a change the change feed pushed; whether anything was dropped.

        A notice following the revision the cache holds is applied as it says; one
        after a gap (or listing nothing) makes the cache ask the change log, as a
        poll does.
        """
        lock, _ = self._loop_state()
        async with lock:
            changes = notice.changes()
            if changes is not None and notice.revision <= self._revision:
                return False  # a poll got there first
            if changes is None or notice.since != self._revision:
                return await self._poll_locked()
            await self._apply(changes, networks_changed=notice.networks_changed)
            if self._metrics is not None:
                self._metrics.revision.set(self._revision)
            return True

    async def listen_forever(
        self, feed: ChangeFeed, on_change: Callable[[bool, RegistryError | None], None] | None = None
    ) -> None:
        """Keep the change feed connected, reconnecting with backoff, and apply what
        it pushes. After each connect the revision is checked in full: whatever
        committed while it was not listening is picked up then."""
        _, poke = self._loop_state()
        backoff = BACKOFF_FIRST_S
        lost = False
        while True:
            try:
                await feed.connect()
                self._listening = True
                if lost:
                    log.warning("listening for registry changes again")
                lost = False
                changed = await self.poll_once()
                if on_change is not None:
                    on_change(changed, None)
                backoff = BACKOFF_FIRST_S
                async for notice in feed.notices():
                    changed = await self.apply_notice(notice)
                    if on_change is not None:
                        on_change(changed, None)
            except RegistryError as exc:
                if not lost:
                    # Unreachable registries are logged by the poll that probes them.
                    log.log(
                        logging.INFO if not self._up else logging.WARNING,
                        "not listening for registry changes (polling meanwhile): %s",
                        exc,
                    )
                lost = True
            finally:
                self._listening = False
                poke.set()  # poll at the normal rate now
                await feed.close()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _apply(self, changes: Changes, *, networks_changed: bool) -> None:
        """Drop what ``changes`` says changed, then render ahead what it brought."""
        uuids = changes.instances
        full = changes.topology and (networks_changed or len(uuids) > RELOAD_MAX)
        fresh: dict[str, Instance] | None = None
        networks: dict[str, Network] = {}
        verified: dict[str, list[ScopeKey]] = {}
        if not full and uuids and len(uuids) <= RELOAD_MAX and (changes.topology or self._scope is not None):
            # Ports unchanged: the addresses resolve as before, nothing to ask.
            verify = self._ownership if changes.topology else None
            loaded, networks, verified = await self._call(self._fetch_changed, uuids, frozenset(self._networks), verify)
            fresh = {i.uuid: i for i in loaded}
        self._revision = max(self._revision, changes.revision)
        if full:
            self.invalidate(uuids, topology=True)
            return
        if not changes.topology and self._ownership is not None:
            verified = {u: list(self._ownership.keys_of.get(u, ())) for u in uuids}
        self.invalidate(uuids, topology=False, moved=fresh if changes.topology else None)
        self._networks.update(networks)
        ownership = self._ownership
        if fresh is not None and ownership is not None:
            for instance in fresh.values():
                keys = ownership.keys(instance)
                if changes.topology:
                    # Whoever held these addresses before shares them now, or lost them.
                    ownership.contest(k for k in keys if ownership.owners.get(k, instance.uuid) != instance.uuid)
                ownership.claim(instance.uuid, verified.get(instance.uuid, ()))
        if self._scope is not None:
            if fresh is not None:
                wanted = [i for i in fresh.values() if self._in_scope(i)]
                if wanted:
                    self._spawn(self._render_ahead(wanted, networks, self._gen, self._epoch))
            elif len(uuids) > RELOAD_MAX:
                self._schedule_rebuild()

    def _fetch_instances(
        self, uuids: Iterable[str], known: frozenset[str]
    ) -> tuple[Sequence[Instance], dict[str, Network]]:
        loaded = self._registry.get_instances(uuids)
        need = {p.network_id for i in loaded for p in i.ports} - known
        return loaded, (self._registry.get_networks(need) if need else {})

    def _fetch_changed(
        self, uuids: Iterable[str], known: frozenset[str], ownership: _Ownership | None
    ) -> tuple[Sequence[Instance], dict[str, Network], dict[str, list[ScopeKey]]]:
        """On the registry thread: the changed instances, the networks they need, and
        which of their scope keys the registry resolves to each of them alone."""
        loaded, networks = self._fetch_instances(uuids, known)
        verified: dict[str, list[ScopeKey]] = {}
        if ownership is not None:
            asked = [(i.uuid, key) for i in loaded for key in ownership.keys(i)]
            callers = [
                Caller(ip=parse_ip(key[2]), network_id=key[0] or None, router_id=key[1] or None) for _, key in asked
            ]
            answers = self._registry.resolve_many(callers) if callers else []
            for (uuid, key), answer in zip(asked, answers, strict=True):
                if isinstance(answer, Instance) and answer.uuid == uuid:
                    verified.setdefault(uuid, []).append(key)
        return loaded, networks, verified

    def invalidate(self, uuids: Iterable[str], *, topology: bool, moved: Mapping[str, Instance] | None = None) -> None:
        """Drop the cached entries of ``uuids`` and every negative entry; with
        ``topology`` (networks or routers changed), everything. ``moved`` holds the
        changed instances whose ports changed, as they are now: callers of their
        addresses are dropped too, whoever they were (an address now claimed twice
        must be refused, not served to its former owner)."""
        self._gen += 1
        gen = self._gen
        if topology:
            self._topology_gen = gen
            self._changed_at.clear()
            self.by_caller.clear()
            self._caller_keys.clear()
            self._miss_keys.clear()
            self._sites.clear()
            self._networks.clear()
            self._ownership = None
            self._forget_wire(None)
            self._schedule_rebuild()
            return
        if len(self._changed_at) > 100_000:
            # Forgetting when instances changed makes every result in flight stale.
            self._changed_at.clear()
            self._topology_gen = gen
        for uuid in uuids:
            self._changed_at[uuid] = gen
            self._drop_site(uuid)
        self._drop_misses()
        if moved:
            addresses = {str(ip) for instance in moved.values() for port in instance.ports for ip in port.ips}
            for key, entry in list(self.by_caller.items()):
                if isinstance(key, tuple) and len(key) == 3 and key[0] != "neutron" and str(key[2]) in addresses:
                    self._forget_key(key)
                    if isinstance(entry, Site):
                        self._forget_wire_of(entry.instance.uuid)

    # -- rendering ahead ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start rendering ahead (with ``prerender``): on the running loop."""
        if self._scope is not None and self._ownership is None:
            self._schedule_rebuild(debounce=0.0)

    def _in_scope(self, instance: Instance) -> bool:
        scope = self._scope
        if scope is None:
            return False
        if scope.everything:
            return True
        ownership = self._ownership
        if ownership is None:
            return False  # a rebuild is on its way, and will render it
        return any(p.network_id in ownership.networks for p in instance.ports)

    def _spawn(self, coro: Coroutine[object, object, object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule_rebuild(self, debounce: float = REBUILD_DEBOUNCE_S) -> None:
        if self._scope is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # invalidated outside a loop (tests): nothing to schedule on
            return
        if self._rebuild is not None and not self._rebuild.done():
            self._rebuild.cancel()
        self._rebuild = self._spawn(self._rebuild_scope(debounce))

    async def _rebuild_scope(self, debounce: float) -> None:
        """Read who owns which address in the scope, then render its instances,
        oldest network first, until ``max_sites`` are held."""
        scope = self._scope
        assert scope is not None
        if debounce:
            await asyncio.sleep(debounce)
        lock, _ = self._loop_state()
        try:
            async with lock:
                if self._revision < 0:
                    # The first read of the revision, before the sites: a poll that
                    # read it after them would take them for stale and drop them.
                    self._revision = await self._call(self._registry.revision)
                gen, epoch = self._gen, self._epoch
                networks, routers, rows = await self._call(self._read_scope, scope)
                if self._topology_gen > gen:  # a newer rebuild is on its way
                    return
                ownership = _Ownership(frozenset(networks), routers)
                resolved = _resolve_rows(rows, routers)
                self._ownership = ownership
                self._networks.update(networks)
        except RegistryError as exc:
            log.warning("could not read the registry to render ahead (sites render when asked): %s", exc)
            return
        started = time.monotonic()
        # Who each key resolves to, grouped by instance (ambiguous keys left out).
        keys_of: dict[str, list[ScopeKey]] = {}
        for key, uuid in resolved.items():
            keys_of.setdefault(uuid, []).append(key)
        del resolved, rows
        for uuid in self._sites:
            ownership.claim(uuid, keys_of.get(uuid, ()))
        wanted = [u for u in keys_of if u not in self._sites]
        budget = self._max_sites - len(self._sites)
        wanted = wanted[: max(0, budget)]
        rendered = 0
        for start in range(0, len(wanted), PRERENDER_BATCH):
            chunk = wanted[start : start + PRERENDER_BATCH]
            gen = self._gen
            try:
                instances, more = await self._call(self._fetch_instances, chunk, frozenset(self._networks))
            except RegistryError as exc:
                log.warning("rendering ahead stopped after %d sites: %s", rendered, exc)
                return
            if self._topology_gen > gen:
                return  # a newer rebuild is on its way
            self._networks.update(more)
            kept = await self._render_ahead(instances, more, gen, epoch)
            rendered += len(kept)
            if self._ownership is ownership:
                for uuid in kept:
                    ownership.claim(uuid, keys_of.get(uuid, ()))
        if rendered:
            log.info(
                "rendered %d sites ahead in %.2f s (%d addresses of %d instances indexed)",
                rendered,
                time.monotonic() - started,
                len(ownership.owners),
                len(keys_of),
            )

    def _read_scope(self, scope: Scope) -> tuple[dict[str, Network], dict[str, Router], Sequence[tuple[str, str, str]]]:
        """On the registry thread: the scope's networks, routers and address owners."""
        registry = self._registry
        if scope.everything:
            networks = {n.id: n for n in registry.list_networks()}
            routers = {r.id: r for r in registry.list_routers()}
        else:
            routers = {}
            for router_id in sorted(scope.routers):
                with contextlib.suppress(NotFound):
                    routers[router_id] = registry.get_router(router_id)
            wanted = set(scope.networks).union(*(r.network_ids for r in routers.values()))
            networks = registry.get_networks(wanted)
        return networks, routers, registry.port_owners(sorted(networks))

    async def _render_ahead(
        self, instances: Sequence[Instance], networks: Mapping[str, Network], gen: int, epoch: int
    ) -> list[str]:
        """Render ``instances`` (read at ``gen``) on the loop, a slice at a time; the
        uuids of those kept."""
        kept: list[str] = []
        started = time.perf_counter()
        for instance in instances:
            if epoch != self._epoch or self._stale_instance(instance.uuid, gen):
                continue
            held = self._sites.get(instance.uuid)
            if held is not None and held.instance == instance:
                kept.append(instance.uuid)
                continue
            site = await self._render(instance, networks, whole=True)
            if epoch == self._epoch and not self._stale_instance(instance.uuid, gen):
                self._store_site(site)
                kept.append(instance.uuid)
            if time.perf_counter() - started > RENDER_SLICE_S:
                await asyncio.sleep(0)
                started = time.perf_counter()
        return kept

    def _stale_instance(self, uuid: str, gen: int) -> bool:
        return self._topology_gen > gen or self._changed_at.get(uuid, -1) > gen

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._resolver is not None:
            self._resolver.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._reader is not None:
            self._reader.close()
        if self._vd_executor is not None:
            self._vd_executor.shutdown(wait=False, cancel_futures=True)
