"""The lab's own registry: a SQLite file in its state directory, filled from the plan.

``lab up`` writes every network, router and instance of the plan into it before
``meta169 serve`` starts; the ``unknown-instance`` fault deletes one instance and its
heal puts the same one back. The rows come from :mod:`meta169.lab.plan`; this module
only writes them. Knows nothing of namespaces, processes or the state file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from meta169.errors import NotFound
from meta169.lab import plan as lp
from meta169.lab.plan import LabPlan, VMPlan

if TYPE_CHECKING:
    from meta169.registry.base import Registry


@contextlib.contextmanager
def opened(plan: LabPlan, *, create: bool = False) -> Iterator[Registry]:
    """The lab's registry, closed on exit; ``create``: made if missing (seeding)."""
    # Imported here: the registry's drivers are not needed to plan or inspect a lab.
    from meta169.registry import open_registry

    registry = open_registry(plan.paths.registry_url, create=create)
    try:
        yield registry
    finally:
        registry.close()


def seed_registry(plan: LabPlan) -> None:
    """Write the plan's networks, routers and instances; the file then readable by root only."""
    with opened(plan, create=True) as registry:
        for network in lp.networks(plan):
            registry.put_network(network)
        for router in lp.routers(plan):
            registry.put_router(router)
        for inst in lp.instances(plan):
            registry.put_instance(inst)
    with contextlib.suppress(FileNotFoundError):
        plan.paths.registry.chmod(0o600)  # user data and keys: root's only


def unregister(plan: LabPlan, vm: VMPlan) -> None:
    """Delete ``vm``'s instance (serve then answers it 404); already gone is fine."""
    with opened(plan) as registry, contextlib.suppress(NotFound):  # already gone: the fault holds
        registry.delete_instance(vm.uuid)


def register(plan: LabPlan, vm: VMPlan) -> None:
    """Put ``vm``'s instance back as ``lab up`` wrote it."""
    with opened(plan) as registry:
        registry.put_instance(lp.instance(plan, vm))
