"""The registry contract: what every backend (memory, SQLite, PostgreSQL) provides.

The metadata plane calls :meth:`Registry.resolve_many` (who are these callers),
:meth:`Registry.port_owners`, :meth:`Registry.get_instances` and
:meth:`Registry.get_networks` (what it renders before the first request),
:meth:`Registry.revision`, :meth:`Registry.changed_since` and
:meth:`Registry.change_feed` (what to drop from its caches),
:meth:`Registry.has_instances` (its readiness check) and the password
methods. The admin side calls the rest; an import writes through
:meth:`Registry.apply_batch`, one transaction for the whole inventory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meta169.errors import AmbiguousCaller, UnknownCaller, ValidationError
from meta169.model import Caller, Instance, Network, Router


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed after a revision: instance uuids, plus whether topology changed.

    ``topology`` is true when networks, routers or ports changed, which can move a
    caller IP from one instance to another; callers then drop their resolution caches.
    """

    revision: int
    instances: frozenset[str]
    topology: bool


@dataclass(frozen=True, slots=True)
class Batch:
    """Writes made in one transaction, under one revision: all of them or none.

    They are made in this order: instances removed (their IPs freed), networks,
    routers and instances stored (each as its ``put_*`` would), routers removed,
    then networks removed. Removing what is already absent is no error (someone
    else removed it); removing a network something still uses, or storing a network
    whose subnets leave out the address of a port on it after the batch
    (``registry/integrity.py``), is a Conflict, and then nothing of the batch is
    written.
    """

    networks: Sequence[Network] = ()
    routers: Sequence[Router] = ()
    instances: Sequence[Instance] = ()
    delete_instances: Sequence[str] = ()
    delete_routers: Sequence[str] = ()
    delete_networks: Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in _BATCH_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for kind, idents in (
            ("network", [n.id for n in self.networks]),
            ("router", [r.id for r in self.routers]),
            ("instance", [i.uuid for i in self.instances]),
        ):
            seen: set[str] = set()
            for ident in idents:
                if ident in seen:
                    raise ValidationError(f"a batch stores {kind} {ident} twice")
                seen.add(ident)

    def __len__(self) -> int:
        """How many writes the batch holds."""
        return sum(len(getattr(self, name)) for name in _BATCH_FIELDS)


_BATCH_FIELDS = ("networks", "routers", "instances", "delete_instances", "delete_routers", "delete_networks")


@dataclass(frozen=True, slots=True)
class Notice:
    """A write another process committed, as a change feed pushes it.

    It says what ``changed_since(since)`` would say at ``revision``; ``instances``
    None means it does not list them (too many for one notification): ask
    :meth:`Registry.changed_since`. ``networks_changed`` False says the topology
    changed only by the ports of the instances listed (no network or router was
    written), so a reader need not drop what it knows of the others.
    """

    revision: int
    since: int
    instances: frozenset[str] | None
    topology: bool = False
    networks_changed: bool = True

    def changes(self) -> Changes | None:
        """The changes it carries, or None when only the change log can tell."""
        if self.instances is None:
            return None
        return Changes(self.revision, self.instances, self.topology)


class ChangeFeed(Protocol):
    """Writes pushed as they commit (PostgreSQL's LISTEN/NOTIFY), on the event loop.

    ``connect`` starts listening (a write committed after it returns is noticed);
    ``notices`` yields them until the connection is lost, which raises
    RegistryUnavailable; ``close`` may be called at any time, also twice.
    """

    async def connect(self) -> None: ...
    def notices(self) -> AsyncIterator[Notice]: ...
    async def close(self) -> None: ...


# What resolve_many answers per caller: the instance, or why there is none.
Resolution = Instance | UnknownCaller | AmbiguousCaller


class AsyncReader(Protocol):
    """Callers resolved on the event loop over a connection of the reader's own
    (PostgreSQL: psycopg's asynchronous connection), for a store whose reads go over
    the network (see :meth:`Registry.async_reader`).

    ``resolve_many`` is :meth:`Registry.resolve_many`, awaited; it raises
    RegistryUnavailable when the store cannot be reached or does not answer within
    the reader's timeout, RegistryError for any other failure. ``close`` may be
    called at any time, also twice; the next read connects again.
    """

    async def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]: ...
    def close(self) -> None: ...


@runtime_checkable
class Registry(Protocol):
    # -- writes (admin) ---------------------------------------------------------
    def put_network(self, network: Network) -> None:
        """Insert or replace by id. Subnets that would leave the address of a port
        already on the network outside all of them are a Conflict, and nothing is
        written (``registry/integrity.py``), as in :meth:`apply_batch`."""

    def put_router(self, router: Router) -> None: ...
    def put_instance(self, instance: Instance) -> None:
        """Insert or replace by uuid; ports are replaced with the instance's."""

    def delete_instance(self, uuid: str) -> None:
        """Raises NotFound when absent."""

    def delete_network(self, network_id: str) -> None: ...
    def delete_router(self, router_id: str) -> None: ...
    def apply_batch(self, batch: Batch) -> int:
        """Make every write of ``batch`` in one transaction; the revision after it.

        An empty batch writes nothing and returns the current revision. Raises
        Conflict or RegistryError, and then nothing of the batch is written.
        """

    # -- reads ------------------------------------------------------------------
    def get_instance(self, uuid: str) -> Instance:
        """Raises NotFound when absent."""

    def get_network(self, network_id: str) -> Network: ...
    def get_router(self, router_id: str) -> Router: ...
    def list_instances(self, *, limit: int | None = None, marker: str | None = None) -> Sequence[Instance]:
        """Instances in uuid order: at most ``limit`` of them (all when None), those
        after the uuid ``marker`` when given (the last of the previous page; it need
        not exist any more, so an instance removed between two pages does not break
        the walk)."""

    def count_instances(self) -> int:
        """How many instances there are, without reading them."""

    def has_instances(self) -> bool:
        """Whether there is at least one instance: one index probe."""

    def list_networks(self) -> Sequence[Network]: ...
    def list_routers(self) -> Sequence[Router]: ...

    def resolve(self, caller: Caller) -> Instance:
        """The one instance that owns ``caller.ip`` within the caller's scope.

        Raises UnknownCaller for none, AmbiguousCaller for several. A router scope
        covers the networks attached to that router.
        """

    def resolve_many(self, callers: Sequence[Caller]) -> list[Resolution]:
        """:meth:`resolve` for each caller, in order, read at one moment: one query
        per scope rather than per caller. The errors are returned, not raised."""

    def get_instances(self, uuids: Iterable[str]) -> Sequence[Instance]:
        """The instances among ``uuids`` that exist, by uuid."""

    def port_owners(self, network_ids: Sequence[str]) -> Sequence[tuple[str, str, str]]:
        """(network id, IP in normalized text, instance uuid) of every port IP on
        ``network_ids``: who owns which address, without reading the instances."""

    def get_networks(self, network_ids: Iterable[str]) -> dict[str, Network]:
        """The networks among ``network_ids`` that exist, by id."""

    # -- instance password (Nova's password API) ------------------------------------
    def get_password(self, uuid: str) -> str: ...
    def set_password(self, uuid: str, password: str) -> None:
        """Raises Conflict if a non-empty password is already set."""

    def clear_password(self, uuid: str) -> None: ...

    @property
    def reads_in_process(self) -> bool:
        """Whether a read is in-process work that any thread may do at once (so a
        caller may run it on its event loop): no network, no connection bound to a
        thread."""

    def async_reader(self, *, timeout: float) -> AsyncReader | None:
        """A reader resolving callers on the running event loop, each read answered
        within ``timeout`` seconds, or None when reads are better made in-process or
        on a thread (SQLite, memory). It does no IO until its first read."""

    # -- change tracking -------------------------------------------------------------
    def revision(self) -> int:
        """A counter bumped by every write, shared by every process using the store."""

    def changed_since(self, revision: int) -> Changes: ...

    def change_feed(self) -> ChangeFeed | None:
        """A feed pushing this store's writes as they commit, or None when the store
        has none (SQLite, memory): readers then poll :meth:`revision`."""

    def close(self) -> None: ...
