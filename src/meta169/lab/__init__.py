"""``meta169 lab``: a real metadata path on one machine, built from network namespaces.

Two tenants share 10.0.0.0/24: tenant A reaches 169.254.169.254 through a router
namespace's REDIRECT, tenant B (isolated) through its DHCP namespace, which owns the
metadata address. Real dnsmasq, dhclient, ``meta169 serve`` and one ``meta169 proxy``
run in it; cloud-init (or anything else) runs inside the VM namespaces.

- ``plan``       the topology as data (names, addresses, registry objects, configs); pure
- ``state``      the state file ``lab up`` writes as it goes, so ``lab down`` is exact
- ``processes``  detached background processes, stopped by PID after a cmdline check
- ``faults``     the faults ``lab break``/``lab heal`` inflict and undo, as a table
- ``lab``        :class:`Lab`: up, load, status, exec, fault seams, break/heal, down
- ``cli``        the ``meta169 lab`` click group

Never creates anything in the host's namespace (no veth leg, no address, no rule)
and never touches host files outside its state directory.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meta169.lab.lab import Lab, TeardownReport, check_prerequisites, lab_namespaces
    from meta169.lab.plan import LabConfig, LabPlan, TenantPlan, VMPlan, plan_lab

# Defaults the CLI shows in --help. They live here, not in ``plan``, so that
# ``meta169 serve`` and friends do not import the lab to build their command line.
DEFAULT_NAME = "default"
DEFAULT_STATE_ROOT = Path("/run/meta169-lab")
DEFAULT_VMS_PER_NETWORK = 2
MAX_VMS_PER_NETWORK = 9

_EXPORTS = {
    "Lab": "meta169.lab.lab",
    "TeardownReport": "meta169.lab.lab",
    "check_prerequisites": "meta169.lab.lab",
    "lab_namespaces": "meta169.lab.lab",
    "LabConfig": "meta169.lab.plan",
    "LabPlan": "meta169.lab.plan",
    "TenantPlan": "meta169.lab.plan",
    "VMPlan": "meta169.lab.plan",
    "plan_lab": "meta169.lab.plan",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_STATE_ROOT",
    "DEFAULT_VMS_PER_NETWORK",
    "MAX_VMS_PER_NETWORK",
    "Lab",
    "LabConfig",
    "LabPlan",
    "TeardownReport",
    "TenantPlan",
    "VMPlan",
    "check_prerequisites",
    "lab_namespaces",
    "plan_lab",
]
