"""What ``lab status`` shows: the VMs, the faults, the processes (alive or not), the namespaces.

A function of the plan and the recorded state that also looks at the system (which
namespaces exist, whether each recorded PID is still the lab's). Changes nothing.
Knows nothing of how the lab is built or how the status is printed (that is the CLI's).
"""

from __future__ import annotations

from typing import Any

from meta169.lab import faults as lf
from meta169.lab import plan as lp
from meta169.lab import qemu
from meta169.lab.doctor_argv import guest_doctor_argv, host_doctor_argv
from meta169.lab.network import lab_namespaces
from meta169.lab.plan import LabPlan, VMPlan
from meta169.lab.state import LabState
from meta169.lab.supervise import is_alive, tcp_upstream


def status(plan: LabPlan, state: LabState) -> dict[str, Any]:
    """What ``lab status --json`` prints."""
    present = set(lab_namespaces(plan.prefix))
    paths = plan.paths
    tcp = tcp_upstream(plan, state)
    return {
        "name": plan.name,
        "state_dir": str(plan.config.directory),
        "status": state.status,
        "error": state.error,
        "registry": paths.registry_url,
        "serve_socket": str(paths.serve_socket),
        "listeners": str(paths.listeners),
        "upstream": lp.upstream(plan, tcp),
        "proxy_secret_file": str(tcp.proxy_secret) if tcp is not None else None,
        "identity_key_dir": str(paths.identity_dir),
        "faults": [
            {**f.to_json(), "description": lf.describe(f), "affects": [v.name for v in lf.affected(plan, f)]}
            for f in state.faults
        ],
        "host_doctor": host_doctor_argv(plan, tcp),
        "vms": [
            {**describe_vm(vm), "lease": str(paths.dhclient(vm.name).lease), "doctor": guest_doctor_argv(plan, vm.name)}
            if vm.kind == "netns"
            else {**describe_vm(vm), **qemu.describe(plan, vm)}
            for vm in plan.vms
        ],
        "processes": [
            {"role": p.role, "pid": p.pid, "netns": p.netns, "alive": is_alive(plan, p)} for p in state.processes
        ],
        "namespaces": [{"name": ns, "exists": ns in present} for ns in plan.namespaces],
    }


def describe_vm(vm: VMPlan) -> dict[str, Any]:
    """One VM as ``lab status --json`` prints it."""
    return {
        "name": vm.name,
        "netns": vm.netns,
        "uuid": vm.uuid,
        "hostname": vm.hostname,
        "ip": str(vm.ip),
        "ipv6_link_local": str(vm.link_local),
        "mac": vm.mac,
        "interface": vm.iface,
        "network": vm.network_id,
        "project": vm.project_id,
        "tenant": vm.tenant,
        "mode": vm.mode,
        "kind": vm.kind,
    }
