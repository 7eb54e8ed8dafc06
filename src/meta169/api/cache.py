"""Rendered sites per caller, kept in step with the registry.

The hot path is two dict lookups: (scope, caller IP) -> Site, then path -> Document.
Misses go to the registry on one worker thread (SQLite connections and psycopg
sessions stay on that thread). A poller asks the registry for its revision and drops
exactly what changed, so an import done by another process shows within one poll.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from meta169.api import vendordata
from meta169.api.identity import NeutronIdentity
from meta169.api.vendordata import DynamicTarget
from meta169.errors import AmbiguousCaller, NotFound, RegistryError, UnknownCaller
from meta169.http.wire import SiteSlots, WireEntry
from meta169.metrics.instruments import ServeMetrics
from meta169.model import Caller, Instance, Network
from meta169.registry import Registry
from meta169.render import RenderOptions, Site, build_site

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


class SiteCache:
    def __init__(
        self,
        registry: Registry,
        options: RenderOptions,
        *,
        max_entries: int = 200_000,
        vendordata_targets: Sequence[DynamicTarget] = (),
        vendordata_timeout: float = 2.0,
        metrics: ServeMetrics | None = None,
    ) -> None:
        # Counts the registry polls (the lookups are counted by their callers).
        self._metrics = metrics
        self._targets = tuple(vendordata_targets)
        self._vendordata_timeout = vendordata_timeout
        self._registry = registry
        self._options = options
        self._max = max_entries
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meta169-registry")
        self.by_caller: dict[Hashable, Entry] = {}
        self._sites: dict[str, Site] = {}
        self._revision = -1
        # Bumped when the render options change (a reload): a site rendered with the
        # old ones while the change happened is served once but not remembered.
        self._epoch = 0
        self._inflight: dict[Hashable, asyncio.Future[Entry]] = {}
        # The fast path's tables (http.wire) by network id and by router id, each
        # mapping caller address text to a slot. Only ever changed in place:
        # compiled code holds them.
        self._wire_networks: dict[str, SiteSlots] = {}
        self._wire_routers: dict[str, SiteSlots] = {}

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def render_options(self) -> RenderOptions:
        return self._options

    def set_render_options(self, options: RenderOptions) -> None:
        """Render with ``options`` from now on (a reload): every cached site is dropped."""
        self._options = options
        self._epoch += 1
        self.invalidate(frozenset(), topology=True)

    async def lookup(self, key: Hashable, caller: Caller | NeutronIdentity) -> Entry:
        """Resolve and render on a miss; concurrent misses for one key share the work."""
        cached = self.by_caller.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Entry] = loop.create_future()
        self._inflight[key] = fut
        revision, epoch = self._revision, self._epoch
        try:
            entry = await loop.run_in_executor(self._executor, self._load, caller)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved; waiters re-raise it themselves
            raise
        finally:
            del self._inflight[key]
        if not fut.done():
            fut.set_result(entry)
        # Only remember results computed against the revision still current; a
        # change that landed meanwhile will be picked up by the next lookup.
        if revision == self._revision and epoch == self._epoch:
            if len(self.by_caller) >= self._max:
                self.by_caller.clear()
                self._forget_wire(None)
            self.by_caller[key] = entry
            if isinstance(entry, Site):
                self._sites[entry.instance.uuid] = entry
        return entry

    def _load(self, caller: Caller | NeutronIdentity) -> Entry:
        try:
            if isinstance(caller, NeutronIdentity):
                instance = self._registry.get_instance(caller.instance_id)
                # Nova: an instance of another tenant is "not found", never served.
                if instance.project_id != caller.tenant_id:
                    return Miss(MISS_TENANT, NotFound(f"instance {caller.instance_id} is not in {caller.tenant_id}"))
            else:
                instance = self._registry.resolve(caller)
        except UnknownCaller as exc:
            return Miss(MISS_UNKNOWN, exc)
        except AmbiguousCaller as exc:
            return Miss(MISS_AMBIGUOUS, exc)
        except NotFound as exc:
            return Miss(MISS_UNKNOWN, exc)
        site = self._sites.get(instance.uuid)
        if site is not None and site.instance == instance:
            return site
        options = self._options
        if self._targets:
            # On the registry thread, like every miss: a slow target delays only the
            # first request of this instance, bounded by the timeout per target.
            dynamic = vendordata.fetch(self._targets, instance, timeout=self._vendordata_timeout)
            options = dataclasses.replace(options, vendor_data2_dynamic={**options.vendor_data2_dynamic, **dynamic})
        return build_site(instance, self._networks_of(instance), options)

    def _networks_of(self, instance: Instance) -> dict[str, Network]:
        networks: dict[str, Network] = {}
        for port in instance.ports:
            if port.network_id not in networks:
                try:
                    networks[port.network_id] = self._registry.get_network(port.network_id)
                except NotFound:
                    log.warning("instance %s has a port on unknown network %s", instance.uuid, port.network_id)
        return networks

    @property
    def wire_scopes(self) -> tuple[dict[str, SiteSlots], dict[str, SiteSlots]]:
        """The fast path's tables by network id and by router id (proxy listeners)."""
        return self._wire_networks, self._wire_routers

    def wire_sites(self, network_id: str, router_id: str) -> SiteSlots:
        """The fast path's table for one scope (a network listener or a router listener)."""
        if network_id:
            return self._wire_networks.setdefault(network_id, {})
        return self._wire_routers.setdefault(router_id, {})

    def remember_wire(self, key: tuple[str, str, object], peer: str, site: Site, path: bytes, entry: WireEntry) -> None:
        """Let the fast path repeat a reply the Python path just gave the caller
        cached under ``key`` (network id, router id, address), whose address the
        request spelled ``peer``.

        Only while ``site`` is still what the cache holds for the caller: a site
        loaded across a registry change is served once but never remembered.
        """
        if self.by_caller.get(key) is not site:
            return
        sites = self.wire_sites(key[0], key[1])
        slot = sites.get(peer)
        if slot is None or slot[1] != site.instance.uuid:
            slot = sites[peer] = ({}, site.instance.uuid)
        if len(slot[0]) < MAX_WIRE_PATHS:
            slot[0][path] = entry

    def _forget_wire(self, uuids: frozenset[str] | None) -> None:
        for tables in (self._wire_networks, self._wire_routers):
            for sites in tables.values():
                if uuids is None:
                    sites.clear()
                    continue
                for peer in [p for p, (_, uuid) in sites.items() if uuid in uuids]:
                    del sites[peer]

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run a registry call on the registry thread (password writes and reads)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- invalidation ------------------------------------------------------------------------
    async def poll_forever(
        self, interval: float, on_poll: Callable[[bool, RegistryError | None], None] | None = None
    ) -> None:
        """Poll every ``interval``; ``on_poll`` hears after each poll whether anything
        changed, or the error (the server's readiness checks)."""
        loop = asyncio.get_running_loop()
        self._revision = await loop.run_in_executor(self._executor, self._registry.revision)
        metrics = self._metrics
        if metrics is not None:
            metrics.poll_ok(self._revision)
        while True:
            await asyncio.sleep(interval)
            try:
                changed = await self.poll_once()
            except RegistryError as exc:
                if metrics is not None:
                    metrics.polls.inc(("failed",))
                log.error("registry poll failed, serving cached data: %s", exc)
                if on_poll is not None:
                    on_poll(False, exc)
                continue
            if metrics is not None:
                metrics.poll_ok(self._revision)
            if on_poll is not None:
                on_poll(changed, None)

    async def poll_once(self) -> bool:
        """Drop what changed since the last poll; whether anything did."""
        loop = asyncio.get_running_loop()
        current = await loop.run_in_executor(self._executor, self._registry.revision)
        if current == self._revision:
            return False
        changes = await loop.run_in_executor(self._executor, self._registry.changed_since, self._revision)
        self._revision = changes.revision
        self.invalidate(changes.instances, topology=changes.topology)
        return True

    def invalidate(self, uuids: frozenset[str], *, topology: bool) -> None:
        if topology:
            self.by_caller.clear()
            self._sites.clear()
            self._forget_wire(None)
            return
        for uuid in uuids:
            self._sites.pop(uuid, None)
        self._forget_wire(uuids)
        # Drop the changed instances' entries, and every negative one: a new
        # instance may have taken an IP that had none.
        stale = [k for k, e in self.by_caller.items() if isinstance(e, Miss) or e.instance.uuid in uuids]
        for k in stale:
            del self.by_caller[k]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
