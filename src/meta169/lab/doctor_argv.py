"""The ``meta169 doctor`` command lines that ``lab doctor`` and ``lab status`` give.

The guest doctor runs inside a VM's namespace with that VM's lease; the host doctor
runs in the host's namespace and is pointed at this lab only: its namespaces,
listener file, upstream (and secret) and registry (:func:`host_doctor_scope`, which
the doctor also reads when it discovers a lab that is up). Pure apart from
:func:`prepare_guest_root`. Knows the plan's paths, not how the lab is run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meta169.errors import LabError
from meta169.lab import plan as lp
from meta169.lab.plan import LabPlan, TcpUpstream
from meta169.lab.state import labs_under
from meta169.lab.supervise import tcp_upstream
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


def host_doctor_scope(plan: LabPlan, tcp: TcpUpstream | None) -> dict[str, Any]:
    """What the host doctor checks for this lab, as data: namespaces with their roles,
    the listener file, the upstream (and the proxy's secret file when on TCP), the registry.

    ``meta169 doctor --host`` without arguments finds a lab that is up by its state
    file and checks this; :func:`host_doctor_argv` names the same on a command line.
    """
    paths = plan.paths
    namespaces: list[tuple[str, str]] = []
    for tenant in plan.tenants:
        if tenant.router_ns is not None:
            namespaces.append((tenant.router_ns, "router"))
        namespaces.append((tenant.dhcp_ns, "dhcp"))
    return {
        "namespaces": namespaces,
        "listener_files": [str(paths.listeners)],
        "upstream": lp.upstream(plan, tcp),
        "secret_file": str(tcp.proxy_secret) if tcp is not None else "",
        "registry": paths.registry_url,
    }


def up_lab_scopes(root: Path) -> tuple[tuple[tuple[str, dict[str, Any]], ...], tuple[str, ...]]:
    """For each lab that is up under ``root`` (a state root or one lab's directory):
    ("lab NAME (its state file)", :func:`host_doctor_scope`); and the state files that
    could not be read."""
    states, problems = labs_under(root)
    out = []
    for state in states:
        if state.status != "up":
            continue
        plan = lp.plan_lab(state.config)
        out.append((f"lab {plan.name} ({plan.paths.state})", host_doctor_scope(plan, tcp_upstream(plan, state))))
    return tuple(out), problems


def host_doctor_argv(plan: LabPlan, tcp: TcpUpstream | None, vm: str | None = None, *extra: str) -> list[str]:
    """``meta169 doctor --host`` for this lab only (``tcp``: the proxy reaches serve over
    TCP with this secret); with ``vm``, that VM as the caller to resolve."""
    scope = host_doctor_scope(plan, tcp)
    argv = [plan.config.python, "-m", "meta169", "--registry", scope["registry"], "doctor", "--host"]
    for listeners in scope["listener_files"]:
        argv += ["--proxy-listeners", listeners]
    argv += ["--upstream", scope["upstream"]]
    if scope["secret_file"]:
        argv += ["--secret-file", scope["secret_file"]]
    for ns, role in scope["namespaces"]:
        argv += ["--netns", f"{ns}={role}"]
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
