"""The registry contract: what every backend (memory, SQLite, PostgreSQL) provides.

The metadata plane only ever calls :meth:`Registry.resolve` (who is this caller),
:meth:`Registry.revision` and :meth:`Registry.changed_since` (what to drop from its
caches), and the password methods. The admin side calls the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Registry(Protocol):
    # -- writes (admin) ---------------------------------------------------------
    def put_network(self, network: Network) -> None: ...
    def put_router(self, router: Router) -> None: ...
    def put_instance(self, instance: Instance) -> None:
        """Insert or replace by uuid; ports are replaced with the instance's."""

    def delete_instance(self, uuid: str) -> None:
        """Raises NotFound when absent."""

    def delete_network(self, network_id: str) -> None: ...
    def delete_router(self, router_id: str) -> None: ...

    # -- reads ------------------------------------------------------------------
    def get_instance(self, uuid: str) -> Instance:
        """Raises NotFound when absent."""

    def get_network(self, network_id: str) -> Network: ...
    def get_router(self, router_id: str) -> Router: ...
    def list_instances(self) -> Sequence[Instance]: ...
    def list_networks(self) -> Sequence[Network]: ...
    def list_routers(self) -> Sequence[Router]: ...

    def resolve(self, caller: Caller) -> Instance:
        """The one instance that owns ``caller.ip`` within the caller's scope.

        Raises UnknownCaller for none, AmbiguousCaller for several. A router scope
        covers the networks attached to that router.
        """

    # -- instance password (Nova's password API) ------------------------------------
    def get_password(self, uuid: str) -> str: ...
    def set_password(self, uuid: str, password: str) -> None:
        """Raises Conflict if a non-empty password is already set."""

    def clear_password(self, uuid: str) -> None: ...

    # -- change tracking -------------------------------------------------------------
    def revision(self) -> int:
        """A counter bumped by every write, shared by every process using the store."""

    def changed_since(self, revision: int) -> Changes: ...

    def close(self) -> None: ...
