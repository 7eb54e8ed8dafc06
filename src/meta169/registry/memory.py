"""The registry in process memory, for tests and demos.

Same contract and the same answers as the SQL backends (the contract tests run
against all of them); nothing survives the process.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

from meta169.errors import AmbiguousCaller, Conflict, NotFound, UnknownCaller
from meta169.model import Caller, Instance, Network, Router
from meta169.registry._common import (
    DEFAULT_CHANGE_LOG_SIZE,
    beyond_horizon,
    full_changes,
    stored_instance,
)
from meta169.registry.base import Changes


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
            self._networks[network.id] = network
            self._bump(None)

    def put_router(self, router: Router) -> None:
        with self._lock:
            self._require_networks(router.network_ids, f"router {router.id}")
            self._routers[router.id] = router
            self._bump(None)

    def put_instance(self, instance: Instance) -> None:
        instance = stored_instance(instance)
        with self._lock:
            self._require_networks(sorted({p.network_id for p in instance.ports}), f"instance {instance.uuid}")
            old = self._instances.get(instance.uuid)
            if old is not None:
                self._index(old, add=False)
            self._instances[instance.uuid] = instance
            self._index(instance, add=True)
            old_ports = () if old is None else old.ports
            if old_ports != instance.ports:
                self._bump(instance.uuid, None)
            else:
                self._bump(instance.uuid)

    def delete_instance(self, uuid: str) -> None:
        with self._lock:
            old = self._instances.pop(uuid, None)
            if old is None:
                raise NotFound(f"no instance {uuid}")
            self._index(old, add=False)
            self._passwords.pop(uuid, None)
            if old.ports:
                self._bump(uuid, None)
            else:
                self._bump(uuid)

    def delete_network(self, network_id: str) -> None:
        with self._lock:
            if network_id not in self._networks:
                raise NotFound(f"no network {network_id}")
            users = sorted(i.uuid for i in self._instances.values() if any(p.network_id == network_id for p in i.ports))
            if users:
                raise Conflict(f"network {network_id} has ports of instances {', '.join(users)}")
            routers = sorted(r.id for r in self._routers.values() if network_id in r.network_ids)
            if routers:
                raise Conflict(f"network {network_id} is attached to routers {', '.join(routers)}")
            del self._networks[network_id]
            self._bump(None)

    def delete_router(self, router_id: str) -> None:
        with self._lock:
            if self._routers.pop(router_id, None) is None:
                raise NotFound(f"no router {router_id}")
            self._bump(None)

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

    def list_instances(self) -> Sequence[Instance]:
        with self._lock:
            return [self._instances[k] for k in sorted(self._instances)]

    def list_networks(self) -> Sequence[Network]:
        with self._lock:
            return [self._networks[k] for k in sorted(self._networks)]

    def list_routers(self) -> Sequence[Router]:
        with self._lock:
            return [self._routers[k] for k in sorted(self._routers)]

    def resolve(self, caller: Caller) -> Instance:
        ip = str(caller.ip)
        with self._lock:
            if caller.network_id is not None:
                scope: tuple[str, ...] = (caller.network_id,)
            else:
                router = self._routers.get(caller.router_id or "")
                scope = () if router is None else router.network_ids
            uuids = sorted({u for net in scope for u in self._owners.get((net, ip), ())})
            if len(uuids) == 1:
                return self._instances[uuids[0]]
        if not uuids:
            raise UnknownCaller(caller.scope, ip)
        raise AmbiguousCaller(caller.scope, ip, uuids)

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
