"""``lab up`` and ``lab down``: the order a lab is made and removed in, and cleanup on failure.

:func:`up` refuses a lab that is already there, then runs the steps of :func:`steps`
in order: namespaces, wiring, router rules, the registry, the identity signing key,
serve and the proxy, dnsmasq, dhclient, and the checks that every VM got its lease
and its route to 169.254.169.254. Whatever a step makes is recorded in the ledger as it is made;
when a step fails, or the user interrupts, :func:`teardown` removes everything made
so far before a :class:`LabError` naming the step is raised (the interrupt is
re-raised as is).

:func:`teardown` stops the recorded processes (guests first), kills the lab's
processes that were never recorded (found in /proc by their markers), and deletes
every namespace with the lab's prefix together with anything still inside it, so
``lab down`` is exact even after a crash or without a state file. :func:`down`
then removes the lab's files.

Knows the order and the guarantees, not how any one thing is made: that is
:mod:`~meta169.lab.network`, :mod:`~meta169.lab.seed` and
:mod:`~meta169.lab.supervise`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from meta169.errors import ConfigError, LabError, Meta169Error
from meta169.identity.signer import generate_identity_key
from meta169.lab import network, qemu, seed, state
from meta169.lab import plan as lp
from meta169.lab.names import DEFAULT_STATE_ROOT
from meta169.lab.plan import LabConfig, LabPlan
from meta169.lab.state import Ledger
from meta169.lab.supervise import Supervisor
from meta169.plumbing import netns
from meta169.plumbing.command import Runner

REQUIRED_TOOLS = ("ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore")


@dataclass(frozen=True, slots=True)
class TeardownReport:
    """What a teardown removed, and what it could not."""

    namespaces: tuple[str, ...]
    processes: tuple[str, ...]
    problems: tuple[str, ...]


def check_prerequisites(config: LabConfig) -> None:
    """Root, iproute2, iptables, dnsmasq, dhclient and IPv6; LabError naming what is missing."""
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")
    missing = [t for t in (*REQUIRED_TOOLS, config.dnsmasq_binary, config.dhclient_binary) if not shutil.which(t)]
    if missing:
        raise LabError(f"the lab needs these programs, not found on PATH: {', '.join(missing)}")
    if not Path("/proc/net/if_inet6").exists():
        raise LabError("IPv6 is disabled in this kernel; the lab serves fe80::a9fe:a9fe too")
    if config.qemu:
        missing = qemu.missing_tools()
        if missing:
            raise LabError(f"QEMU guests need {', '.join(missing)} (apt-get install qemu-system-x86 qemu-utils)")
        qemu.image_of(lp.plan_lab(config))


def steps(
    plan: LabPlan, ledger: Ledger, supervisor: Supervisor, runner: Runner
) -> Iterator[tuple[str, Callable[[], None]]]:
    """The steps of ``lab up``, in order, each with the name a failure reports."""
    yield "create namespaces", functools.partial(_create_namespaces, plan, ledger, runner)
    for tenant in plan.tenants:
        yield f"wire tenant {tenant.key} ({tenant.mode})", functools.partial(network.wire, tenant, runner=runner)
    for vm in plan.qemu_vms:
        yield f"wire QEMU guest {vm.name}", functools.partial(qemu.wire, vm, runner=runner)
    for tenant in plan.tenants:
        if tenant.router_ns is not None:
            yield (
                f"router rules in {tenant.router_ns}",
                functools.partial(network.apply_router_rules, plan, tenant.key, runner=runner),
            )
    yield "seed the registry", functools.partial(seed.seed_registry, plan)
    yield "make the identity signing key", functools.partial(make_identity_key, plan)
    yield "start meta169 serve and proxy", supervisor.start_servers
    for tenant in plan.tenants:
        yield f"start dnsmasq for {tenant.network.id}", functools.partial(supervisor.start_dnsmasq, tenant)
    if plan.qemu_vms:
        # Booting takes minutes under TCG: the guests boot while the rest comes up.
        yield "start QEMU guests", supervisor.start_guests
    yield "start dhclient in every VM", supervisor.start_dhclients
    yield "check VM addresses and routes", functools.partial(network.check_vms, plan, runner=runner)
    yield "wait for IPv6 duplicate address detection", functools.partial(network.wait_for_dad, plan, runner=runner)
    if plan.qemu_vms:
        yield "wait for QEMU guests to boot", supervisor.await_guests


def make_identity_key(plan: LabPlan) -> None:
    """The key serve signs identity documents with, as ``meta169 identity init`` makes it;
    ``meta169 identity cert`` prints its certificate while the lab is up."""
    try:
        generate_identity_key(plan.paths.identity_dir)
    except ConfigError as exc:
        raise LabError(str(exc)) from exc


def up(plan: LabPlan, ledger: Ledger, supervisor: Supervisor, runner: Runner) -> float:
    """Build the lab of ``plan``; the seconds the steps took.

    On failure, or on KeyboardInterrupt, tears down what it made and raises
    (LabError naming the failed step; the interrupt as is). Either way the state
    file ends up saying "up" or "failed" (with the error).
    """
    check_prerequisites(plan.config)
    _prepare(plan, ledger)
    step = "starting"
    started = time.monotonic()
    try:
        for name, action in steps(plan, ledger, supervisor, runner):
            step = name
            action()
    except BaseException as exc:
        try:
            report = teardown(plan, ledger, supervisor, runner)
        except Exception as cleanup:  # the original failure must still be reported
            report = TeardownReport((), (), (f"teardown crashed: {cleanup!r}",))
        detail = "" if not report.problems else "; cleanup also failed: " + "; ".join(report.problems)
        ledger.update(replace(ledger.state, status="failed", error=f"{step}: {exc}{detail}"))
        if not isinstance(exc, Exception):
            raise
        undo = "everything it had made was removed" if not report.problems else "some things are left"
        raise LabError(f"lab {plan.name}: up failed at step '{step}': {exc} ({undo}){detail}") from exc
    ledger.update(replace(ledger.state, status="up", error=""))
    return time.monotonic() - started


def down(
    plan: LabPlan, ledger: Ledger, supervisor: Supervisor, runner: Runner, *, keep_files: bool = False
) -> TeardownReport:
    """Remove every namespace, veth, rule and process of the lab; then its files.

    LabError when something could not be removed (the state file then stays, so
    ``lab down`` can be run again).
    """
    report = teardown(plan, ledger, supervisor, runner)
    if report.problems:
        ledger.update(replace(ledger.state, status="failed", error="; ".join(report.problems)))
        raise LabError(f"lab {plan.name}: down left things behind: {'; '.join(report.problems)}")
    if not keep_files:
        remove_files(plan)
        ledger.persist = False  # the state file is gone on purpose: nothing writes it again
    ledger.update(replace(ledger.state, status="down", error=""))
    return report


def teardown(plan: LabPlan, ledger: Ledger, supervisor: Supervisor, runner: Runner) -> TeardownReport:
    """Stop the lab's processes and delete its namespaces; what went and what could not."""
    stopped, problems = supervisor.stop_all()
    stopped += [f"PID {pid}" for pid in supervisor.kill_strays()]
    problems += qemu.remove_overlays(plan)  # also when lab up failed: a guest's disk never outlives it
    removed: list[str] = []
    recorded = ledger.state
    for ns in network.lab_namespaces(plan.prefix):
        try:
            network.remove_namespace(plan, ns, runner=runner)
            removed.append(ns)
        except (OSError, Meta169Error) as exc:
            problems.append(f"delete namespace {ns}: {exc}")
        recorded = recorded.without_namespace(ns)
    ledger.update(recorded)
    left = network.lab_namespaces(plan.prefix)
    if left:
        problems.append(f"namespaces still present: {', '.join(left)}")
    still = supervisor.strays()
    if still:
        problems.append(f"processes still running: {', '.join(map(str, still))}")
    return TeardownReport(tuple(removed), tuple(stopped), tuple(problems))


def remove_files(plan: LabPlan, *, keep_root: bool = False) -> None:
    """Delete the files this lab writes (only those: the directory may hold others)."""
    paths = plan.paths
    roles = ("serve", "proxy")
    files = [paths.state, paths.listeners, paths.serve_socket, paths.secret("serve"), paths.secret("proxy")]
    files += [paths.registry.with_name(paths.registry.name + sfx) for sfx in ("", "-wal", "-shm", "-journal")]
    files += [paths.pid_file(r) for r in roles] + [paths.log(r) for r in roles]
    files += [p for vm in plan.qemu_vms for p in (paths.pid_file(f"qemu-{vm.name}"), paths.log(f"qemu-{vm.name}"))]
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    dirs = [paths.dnsmasq_dir(t.key) for t in plan.tenants] + [paths.vm_dir(v.name) for v in plan.vms]
    dirs.append(paths.identity_dir)
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        paths.guest_root.rmdir()  # only when empty: the doctor's --files-root
    if not keep_root:
        with contextlib.suppress(OSError):
            paths.root.rmdir()  # only when empty
            if paths.root.parent == DEFAULT_STATE_ROOT:
                paths.root.parent.rmdir()  # ours too, when no other lab is in it


def _prepare(plan: LabPlan, ledger: Ledger) -> None:
    # Refuse a lab that is there (recorded, or namespaces left by a crash), then start
    # the state file afresh in a clean state directory.
    paths = plan.paths
    previous = state.load(paths.state)
    if previous is not None and previous.status in ("building", "up"):
        raise LabError(
            f"lab {plan.name} is already {previous.status} (state in {paths.root}); "
            f"run meta169 lab down --name {plan.name} first"
        )
    leftovers = network.lab_namespaces(plan.prefix)
    if leftovers:
        raise LabError(
            f"namespaces of an earlier lab {plan.name} remain ({', '.join(leftovers)}); "
            f"run meta169 lab down --name {plan.name} first"
        )
    try:
        paths.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        # dnsmasq re-reads its hosts file after dropping root: others must traverse.
        paths.root.chmod(0o755)
    except OSError as exc:
        raise LabError(f"cannot create the lab state directory {paths.root}: {exc}") from exc
    remove_files(plan, keep_root=True)
    ledger.persist = True
    ledger.save()


def _create_namespaces(plan: LabPlan, ledger: Ledger, runner: Runner) -> None:
    # Each recorded right after it exists, so a crash leaves nothing unrecorded for long
    # (and teardown sweeps by prefix for that instant).
    for ns in plan.namespaces:
        netns.add(ns, runner=runner)
        ledger.update(ledger.state.with_namespace(ns))
