"""``meta169 lab``: a real metadata path on one machine, built from network namespaces.

Two tenants share 10.0.0.0/24: tenant A reaches 169.254.169.254 through a router
namespace's REDIRECT, tenant B (isolated) through its DHCP namespace, which owns the
metadata address. Real dnsmasq, dhclient, ``meta169 serve`` and one ``meta169 proxy``
run in it; cloud-init (or anything else) runs inside the VM namespaces.

- ``names``        the defaults (name, state root, VMs per network); constants only
- ``plan``         the topology as data (names, addresses, registry objects, configs); pure
- ``state``        the state file ``lab up`` writes as it goes, so ``lab down`` is exact
- ``network``      namespaces, bridges, veths, addresses, router rules; VM checks
- ``seed``         the lab's own registry, filled from the plan
- ``processes``    detached background processes, stopped by PID after a cmdline check
- ``supervise``    the lab's processes by role: serve, proxy, dnsmasq, dhclient
- ``guest``        inside a VM: its metadata routes, a GET of 169.254.169.254
- ``image``        the Debian 12 guest image (mmdebstrap, cloud-init), cached by recipe
- ``agent``        a qemu-guest-agent client: commands and files inside a QEMU guest
- ``qemu``         a VM as a real guest: QEMU (TCG) on a tap in the tenant's L2
- ``doctor_argv``  the ``meta169 doctor`` command lines for a VM and for the host
- ``status``       what ``lab status`` shows
- ``lifecycle``    ``lab up`` and ``lab down``: order, and cleanup on failure
- ``faults``       the faults ``lab break``/``lab heal`` inflict and undo, as a table
- ``lab``          :class:`Lab`, a facade over the modules above
- ``cli``          the ``meta169 lab`` click group

Never creates anything in the host's namespace (no veth leg, no address, no rule)
and never touches host files outside its state directory.

This package only re-exports; its submodules import each other, never it. The
heavy names load on first use, so that building the CLI does not import the lab.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from meta169.lab.names import DEFAULT_NAME, DEFAULT_STATE_ROOT, DEFAULT_VMS_PER_NETWORK, MAX_VMS_PER_NETWORK

if TYPE_CHECKING:
    from meta169.lab.lab import Lab
    from meta169.lab.lifecycle import TeardownReport, check_prerequisites
    from meta169.lab.network import lab_namespaces
    from meta169.lab.plan import LabConfig, LabPlan, TenantPlan, VMPlan, plan_lab

_EXPORTS = {
    "Lab": "meta169.lab.lab",
    "TeardownReport": "meta169.lab.lifecycle",
    "check_prerequisites": "meta169.lab.lifecycle",
    "lab_namespaces": "meta169.lab.network",
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
