"""The registry in process memory, for tests and demos.

Same contract and the same answers as the SQL backends (the contract tests run
against all of them); nothing survives the process.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence

from meta169.errors import AmbiguousCaller, Conflict, NotFound, UnknownCaller, ValidationError
from meta169.model import Caller, Instance, Network, Router
from meta169.registry._common import (
    DEFAULT_CHANGE_LOG_SIZE,
    beyond_horizon,
    full_changes,
    stored_instance,
)
from meta169.registry.base import AsyncReader, Batch, ChangeFeed, Changes, Resolution
from meta169.registry.integrity import SHOWN, narrows, network_in_use, require_ports_within


class MemoryRegistry:
    """A :class:`~meta169.registry.base.Registry` held in dictionaries, thread-safe."""

    def __init__(self, *, change_log_size: int = DEFAULT_CHANGE_LOG_SIZE) -> None:
        if change_log_size < 1:
            raise ValueError("change_log_size must be >= 1")
        self._lock = threading.Lock()
        self._networks: dict[str, Network] = {}
        self._routers: dict[str, Router] = {}
        self._instances: dict[str, Instance] = {}
        self._passwords: dict[str, str] = {}
        # (network id, normalized ip) -> uuids: the resolve index.
        self._owners: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._revision = 0
        self._log: deque[tuple[int, str | None]] = deque()
        self._log_size = change_log_size

    def close(self) -> None:
        pass

    # -- bookkeeping (called with the lock held) ---------------------------------------

    def _bump(self, *changed: str | None) -> None:
        self._revision += 1
        horizon = self._revision - self._log_size
        while self._log and self._log[0][0] <= horizon:
            self._log.popleft()
        self._log.extend((self._revision, c) for c in changed)

    def _require_networks(self, network_ids: Iterable[str], who: str) -> None:
        missing = [n for n in network_ids if n not in self._networks]
        if missing:
            raise Conflict(f"{who} refers to unknown network(s) {', '.join(missing)}")

    def _index(self, instance: Instance, add: bool) -> None:
        for port in instance.ports:
            for ip in port.ips:
                key = (port.network_id, str(ip))
                if add:
                    self._owners[key].add(instance.uuid)
                else:
                    self._owners[key].discard(instance.uuid)
                    if not self._owners[key]:
                        del self._owners[key]

    # -- writes -----------------------------------------------------------------------

    def put_network(self, network: Network) -> None:
        with self._lock:
            if narrows(self._networks.get(network.id), network):
                self._require_ports_within({network.id: network})
            self._networks[network.id] = network
            self._bump(None)

    def put_router(self, router: Router) -> None:
        with self._lock:
            self._store_router(router)
            self._bump(None)

    def put_instance(self, instance: Instance) -> None:
        instance = stored_instance(instance)
        with self._lock:
            if self._store_instance(instance):
                self._bump(instance.uuid, None)
            else:
                self._bump(instance.uuid)

    def delete_instance(self, uuid: str) -> None:
        with self._lock:
            old = self._remove_instance(uuid)
            if old is None:
                raise NotFound(f"no instance {uuid}")
            if old.ports:
                self._bump(uuid, None)
            else:
                self._bump(uuid)

    def delete_network(self, network_id: str) -> None:
        with self._lock:
            if not self._remove_network(network_id):
                raise NotFound(f"no network {network_id}")
            self._bump(None)

    def delete_router(self, router_id: str) -> None:
        with self._lock:
            if self._routers.pop(router_id, None) is None:
                raise NotFound(f"no router {router_id}")
            self._bump(None)

    def apply_batch(self, batch: Batch) -> int:
        instances = [stored_instance(i) for i in batch.instances]
        with self._lock:
            if not len(batch):
                return self._revision
            # All or nothing: a failure midway puts the dictionaries back.
            saved = (dict(self._networks), dict(self._routers), dict(self._instances), dict(self._passwords))
            try:
                changed: list[str | None] = []
                topology = bool(batch.networks or batch.routers)
                for uuid in batch.delete_instances:
                    old = self._remove_instance(uuid)
                    if old is not None:
                        changed.append(uuid)
                        topology = topology or bool(old.ports)
                narrowed = {n.id: n for n in batch.networks if narrows(self._networks.get(n.id), n)}
                for network in batch.networks:
                    self._networks[network.id] = network
                for router in batch.routers:
                    self._store_router(router)
                for instance in instances:
                    topology = self._store_instance(instance) or topology
                    changed.append(instance.uuid)
                for router_id in batch.delete_routers:
                    topology = self._routers.pop(router_id, None) is not None or topology
                for network_id in batch.delete_networks:
                    topology = self._remove_network(network_id) or topology
                self._require_ports_within(narrowed)
            except BaseException:
                self._networks, self._routers, self._instances, self._passwords = saved
                self._owners.clear()
                for instance in self._instances.values():
                    self._index(instance, add=True)
                raise
            self._bump(*changed, *([None] if topology else []))
            return self._revision

    # -- writes' steps (called with the lock held) -------------------------------------

    def _store_router(self, router: Router) -> None:
        self._require_networks(router.network_ids, f"router {router.id}")
        self._routers[router.id] = router

    def _store_instance(self, instance: Instance) -> bool:
        """Store ``instance``; whether its ports changed."""
        self._require_networks(sorted({p.network_id for p in instance.ports}), f"instance {instance.uuid}")
        old = self._instances.get(instance.uuid)
        if old is not None:
            self._index(old, add=False)
        self._instances[instance.uuid] = instance
        self._index(instance, add=True)
        return (() if old is None else old.ports) != instance.ports

    def _remove_instance(self, uuid: str) -> Instance | None:
        old = self._instances.pop(uuid, None)
        if old is not None:
            self._index(old, add=False)
            self._passwords.pop(uuid, None)
        return old

    def _remove_network(self, network_id: str) -> bool:
        if network_id not in self._networks:
            return False
        users = sorted(i.uuid for i in self._instances.values() if any(p.network_id == network_id for p in i.ports))
        routers = sorted(r.id for r in self._routers.values() if network_id in r.network_ids)
        if users or routers:
            named = [(uuid, self._instances[uuid].name) for uuid in users[:SHOWN]]
            raise network_in_use(network_id, named, len(users), routers)
        del self._networks[network_id]
        return True

    def _require_ports_within(self, networks: Mapping[str, Network]) -> None:
        """The batch's Conflict when a port stored on ``networks`` (those it wrote
        narrower) is outside all of their subnets now."""
        if not networks:
            return
        require_ports_within(
            networks,
            ((net, ip, uuid) for (net, ip), uuids in self._owners.items() if net in networks for uuid in uuids),
            lambda uuids: {uuid: self._instances[uuid].name for uuid in uuids},
        )

    # -- reads ------------------------------------------------------------------------

    def get_instance(self, uuid: str) -> Instance:
        with self._lock:
            found = self._instances.get(uuid)
        if found is None:
            raise NotFound(f"no instance {uuid}")
        return found

    def get_network(self, network_id: str) -> Network:
        with self._lock:
            found = self._networks.get(network_id)
        if found is None:
            raise NotFound(f"no network {network_id}")
        return found

    def get_router(self, router_id: str) -> Router:
        with self._lock:
            found = self._routers.get(router_id)
        if found is None:
            raise NotFound(f"no router {router_id}")
        return found

    def list_instances(self, *, limit: int | None = None, marker: str | None = None) -> Sequence[Instance]:
        if limit is not None and limit < 0:
            raise ValidationError(f"limit must be >= 0, not {limit}")
        with self._lock:
            keys = sorted(self._instances)
            start = 0 if marker is None else bisect.bisect_right(keys, marker)
            end = len(keys) if limit is None else start + limit
            return [self._instances[k] for k in keys[start:end]]

    def count_instances(self) -> int:
        with self._lock:
            return len(self._instances)

    def has_instances(self) -> bool:
        with self._lock:
            return bool(self._instances)

    def list_networks(self) -> Sequence[Network]:
        with self._lock:
            return [self._networks[k] for k in sorted(self._networks)]

    def list_routers(self) -> Sequence[Router]:
        with self._lock:
            return [self._routers[k] for k in sorted(self._routers)]

    def resolve(self, caller: Caller) -> Instance:
        with self._lock:
            found = self._resolve(caller)
        if isinstance(found, Instance):
            return found
        raise found

    def _resolve(self, caller: Caller) -> Resolution:
        ip = str(caller.ip)
        if caller.network_id is not None:
            scope: tuple[str, ...] = (caller.network_id,)
        else:
            router = self._routers.get(caller.router_id or "")
            scope = () if router is None else router.network_ids
        uuids = sorted({u for net in scope for u in self._owners.get((net, ip), ())})
        if len(uuids) == 1:
            return self._instances[uuids[0]]
        if not uuids:
            return UnknownCaller(caller.scope, ip)
        return AmbiguousCaller(caller.scope, ip, uuids)

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        with self._lock:  # one moment for all of them, as the SQL backends read
            return [self._resolve(caller) for caller in callers]

    def get_instances(self, uuids: Iterable[str]) -> Sequence[Instance]:
        with self._lock:
            return [self._instances[u] for u in sorted(set(uuids)) if u in self._instances]

    def port_owners(self, network_ids: Sequence[str]) -> Sequence[tuple[str, str, str]]:
        wanted = set(network_ids)
        with self._lock:
            return [
                (network_id, ip, uuid)
                for (network_id, ip), uuids in sorted(self._owners.items())
                if network_id in wanted
                for uuid in sorted(uuids)
            ]

    def get_networks(self, network_ids: Iterable[str]) -> dict[str, Network]:
        with self._lock:
            return {n: self._networks[n] for n in sorted(set(network_ids)) if n in self._networks}

    def change_feed(self) -> ChangeFeed | None:
        return None

    def async_reader(self, *, timeout: float) -> AsyncReader | None:
        return None

    # -- passwords --------------------------------------------------------------------

    def get_password(self, uuid: str) -> str:
        with self._lock:
            if uuid not in self._instances:
                raise NotFound(f"no instance {uuid}")
            return self._passwords.get(uuid, "")

    def set_password(self, uuid: str, password: str) -> None:
        with self._lock:
            if uuid not in self._instances:
                raise NotFound(f"no instance {uuid}")
            if self._passwords.get(uuid):
                raise Conflict(f"instance {uuid} already has a password")
            self._passwords[uuid] = password
            self._bump(uuid)

    def clear_password(self, uuid: str) -> None:
        with self._lock:
            if uuid not in self._instances:
                raise NotFound(f"no instance {uuid}")
            self._passwords.pop(uuid, None)
            self._bump(uuid)

    @property
    def reads_in_process(self) -> bool:
        # In process, but the tests' and the lab's memory registry keeps serve's
        # lookups on the registry thread, as every other store's.
        return False

    # -- change tracking --------------------------------------------------------------

    def revision(self) -> int:
        with self._lock:
            return self._revision

    def changed_since(self, revision: int) -> Changes:
        with self._lock:
            current = self._revision
            if beyond_horizon(revision, current, self._log_size):
                logged = [u for _, u in self._log if u is not None]
                return full_changes(current, [*self._instances, *logged])
            entries = [u for rev, u in self._log if rev > revision]
        return Changes(
            revision=current,
            instances=frozenset(u for u in entries if u is not None),
            topology=any(u is None for u in entries),
        )
