"""The ``meta169 doctor`` command lines that ``lab doctor`` and ``lab status`` give.

The guest doctor runs inside a VM's namespace with that VM's lease; the host doctor
runs in the host's namespace and is pointed at this lab only: its namespaces,
listener file, upstream (and secret) and registry. Pure apart from
:func:`prepare_guest_root`. Knows the plan's paths, not how the lab is run.
"""

from __future__ import annotations

from pathlib import Path

from meta169.errors import LabError
from meta169.lab import plan as lp
from meta169.lab.plan import LabPlan, TcpUpstream
from meta169.plumbing import netns


def guest_doctor_argv(plan: LabPlan, vm: str, *extra: str, files_root: Path | None = None) -> list[str]:
    """``meta169 doctor`` inside VM ``vm``: its lease, and ``files_root`` for the guest's
    config files, by default an empty directory (a VM shares the host's filesystem,
    whose /etc says nothing about the guest)."""
    chosen = plan.vm(vm)
    paths = plan.paths
    root = files_root if files_root is not None else paths.guest_root
    argv = [plan.config.python, "-m", "meta169", "doctor", "--files-root", str(root),
            "--lease", str(paths.dhclient(vm).lease), *extra]  # fmt: skip
    return netns.in_netns(chosen.netns, argv)


def host_doctor_argv(plan: LabPlan, tcp: TcpUpstream | None, vm: str | None = None, *extra: str) -> list[str]:
    """``meta169 doctor --host`` for this lab only (``tcp``: the proxy reaches serve over
    TCP with this secret); with ``vm``, that VM as the caller to resolve."""
    paths = plan.paths
    argv = [plan.config.python, "-m", "meta169", "--registry", paths.registry_url, "doctor", "--host",
            "--proxy-listeners", str(paths.listeners), "--upstream", lp.upstream(plan, tcp)]  # fmt: skip
    if tcp is not None:
        argv += ["--secret-file", str(tcp.proxy_secret)]
    for tenant in plan.tenants:
        if tenant.router_ns is not None:
            argv += ["--netns", f"{tenant.router_ns}=router"]
        argv += ["--netns", f"{tenant.dhcp_ns}=dhcp"]
    if vm is not None:
        chosen = plan.vm(vm)
        argv += ["--network", chosen.network_id, "--ip", str(chosen.ip)]
    return argv + list(extra)


def prepare_guest_root(plan: LabPlan) -> Path:
    """Create the empty directory :func:`guest_doctor_argv` points ``--files-root`` at."""
    root = plan.paths.guest_root
    try:
        root.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create {root}: {exc}") from exc
    return root
