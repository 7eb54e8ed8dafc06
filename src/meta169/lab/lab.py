"""The lab as a running thing: build it from a plan, inspect it, run commands in it, tear it down.

:class:`Lab` is the IO shell over :mod:`meta169.lab.plan`. ``Lab.up`` creates the
namespaces, bridges, veths, addresses and router rules of the plan (through
:mod:`meta169.plumbing`), seeds the lab's own SQLite registry, starts ``meta169
serve``, one ``meta169 proxy``, dnsmasq per network and dhclient per VM, and checks
that every VM got its lease and its route to 169.254.169.254. Each step is
recorded in the state file as it happens; when a step fails, everything made so far
is removed before a :class:`LabError` naming the step is raised.

``Lab.load`` rebuilds a Lab from the state file (``lab status``, ``lab exec``,
``lab down`` from another process). Teardown stops what was recorded, sweeps
/proc for processes carrying the lab's marker arguments and the lab's namespaces
for anything still inside, and deletes every namespace with the lab's prefix.

The fault seams (routes, router rules, proxy, server, registry, the proxy-to-serve
wiring) exist for ``lab break``/``lab heal`` (:mod:`meta169.lab.faults`, which
:meth:`Lab.break_fault` and :meth:`Lab.heal` drive and record) and the doctor's
tests. Never creates a link in, or changes a file of, the host:
every interface lives in a lab namespace, every file in the state directory.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from meta169.errors import LabError, Meta169Error, NotFound
from meta169.lab import DEFAULT_NAME, DEFAULT_STATE_ROOT, processes, state
from meta169.lab import faults as lf
from meta169.lab import plan as lp
from meta169.lab.plan import LabConfig, LabPlan, TcpUpstream, TenantPlan, VMPlan
from meta169.lab.state import FaultRecord, LabState, ProcessRecord
from meta169.plumbing import dhclient, dnsmasq, iptables, netns
from meta169.plumbing.command import CommandResult, Runner, kill_checked, run

if TYPE_CHECKING:
    from meta169.registry.base import Registry

T = TypeVar("T")

REQUIRED_TOOLS = ("ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore")
_SERVE_READY = re.compile(r"meta169 serve: listening on")
_PROXY_READY = re.compile(r"meta169 proxy: (\d+) listeners up")
# CentOS /etc/sysconfig/network-scripts/ifup-eth adds this unless NOZEROCONF=yes [BRIEF 1].
ZEROCONF_ROUTE = ("169.254.0.0/16",)
ZEROCONF_ATTRS = ("scope", "link", "metric", "1002")
FAMILIES: tuple[iptables.Family, ...] = (4, 6)
_DHCLIENT_TIMEOUT = 15  # seconds for one lease (dhclient's own timeout statement)
_SETTLE_TIMEOUT = 5.0  # seconds for a VM to see a break or heal (serve polls the registry every 0.5 s)


@dataclass(frozen=True, slots=True)
class TeardownReport:
    """What a teardown removed, and what it could not."""

    namespaces: tuple[str, ...]
    processes: tuple[str, ...]
    problems: tuple[str, ...]


def lab_namespaces(prefix: str) -> tuple[str, ...]:
    """Namespaces that exist now and carry ``prefix`` (the lab's own, and nobody else's)."""
    try:
        names = sorted(p.name for p in netns.NETNS_DIR.iterdir())
    except FileNotFoundError:
        return ()
    return tuple(n for n in names if n.startswith(prefix))


def check_prerequisites(config: LabConfig) -> None:
    """Root, iproute2, iptables, dnsmasq, dhclient and IPv6; LabError naming what is missing."""
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")
    missing = [t for t in (*REQUIRED_TOOLS, config.dnsmasq_binary, config.dhclient_binary) if not shutil.which(t)]
    if missing:
        raise LabError(f"the lab needs these programs, not found on PATH: {', '.join(missing)}")
    if not Path("/proc/net/if_inet6").exists():
        raise LabError("IPv6 is disabled in this kernel; the lab serves fe80::a9fe:a9fe too")


class Lab:
    """One lab: its plan, its recorded state and the handles of the processes it started.

    Build one with :meth:`up` or :meth:`load`; the constructor does no IO.
    """

    def __init__(self, plan: LabPlan, lab_state: LabState, *, runner: Runner = run, persist: bool = True) -> None:
        self.plan = plan
        self._state = lab_state
        self._runner = runner
        self._persist = persist
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.up_seconds = 0.0

    # -- construction -------------------------------------------------------------------

    @classmethod
    def up(cls, config: LabConfig, *, runner: Runner = run) -> Lab:
        """Build the lab ``config`` describes and return it once every VM has its lease.

        On failure, or on KeyboardInterrupt, tears down what it made and raises
        (LabError naming the failed step; the interrupt as is).
        """
        check_prerequisites(config)
        plan = lp.plan_lab(config)
        lab = cls(plan, LabState(config), runner=runner)
        lab._prepare()
        step = "starting"
        started = time.monotonic()
        try:
            for name, action in lab._steps():
                step = name
                action()
        except BaseException as exc:
            try:
                report = lab._teardown()
            except Exception as cleanup:  # the original failure must still be reported
                report = TeardownReport((), (), (f"teardown crashed: {cleanup!r}",))
            detail = "" if not report.problems else "; cleanup also failed: " + "; ".join(report.problems)
            lab._state = replace(lab._state, status="failed", error=f"{step}: {exc}{detail}")
            lab._save()
            if not isinstance(exc, Exception):
                raise
            undo = "everything it had made was removed" if not report.problems else "some things are left"
            raise LabError(f"lab {config.name}: up failed at step '{step}': {exc} ({undo}){detail}") from exc
        lab._state = replace(lab._state, status="up", error="")
        lab._save()
        lab.up_seconds = time.monotonic() - started
        return lab

    @classmethod
    def load(cls, config: LabConfig, *, runner: Runner = run) -> Lab:
        """The lab recorded in ``config``'s state directory (LabError when there is none)."""
        path = lp.LabPaths(config.directory).state
        found = state.load(path)
        if found is None:
            raise LabError(f"no lab {config.name!r}: {path} does not exist (start one with meta169 lab up)")
        if found.config.name != config.name:
            raise LabError(f"{path} records lab {found.config.name!r}, not {config.name!r}")
        return cls(lp.plan_lab(found.config), found, runner=runner)

    @classmethod
    def down_named(cls, config: LabConfig, *, keep_files: bool = False, runner: Runner = run) -> TeardownReport:
        """``lab down``: tear down the lab in ``config``'s state directory, recorded or not.

        Without a state file (a crash before it was written, or it was removed) the
        lab's namespaces and marked processes are still found and removed.
        """
        path = lp.LabPaths(config.directory).state
        found = state.load(path)
        if found is None:
            lab = cls(lp.plan_lab(config), LabState(config, status="down"), runner=runner, persist=False)
        else:
            lab = cls(lp.plan_lab(found.config), found, runner=runner)
        return lab.down(keep_files=keep_files)

    # -- what it is -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def state(self) -> LabState:
        return self._state

    @property
    def vms(self) -> tuple[VMPlan, ...]:
        return self.plan.vms

    def vm(self, name: str) -> VMPlan:
        return self.plan.vm(name)

    def status(self) -> dict[str, Any]:
        """What ``lab status --json`` prints: the VMs, the processes (alive or not), the namespaces."""
        present = set(lab_namespaces(self.plan.prefix))
        paths = self.plan.paths
        tcp = self._tcp()
        return {
            "name": self.name,
            "state_dir": str(self.plan.config.directory),
            "status": self._state.status,
            "error": self._state.error,
            "registry": paths.registry_url,
            "serve_socket": str(paths.serve_socket),
            "listeners": str(paths.listeners),
            "upstream": lp.upstream(self.plan, tcp),
            "proxy_secret_file": str(tcp.proxy_secret) if tcp is not None else None,
            "faults": [
                {**f.to_json(), "description": lf.describe(f), "affects": [v.name for v in lf.affected(self.plan, f)]}
                for f in self._state.faults
            ],
            "host_doctor": self.host_doctor_argv(),
            "vms": [
                {**describe_vm(vm), "lease": str(paths.dhclient(vm.name).lease), "doctor": self.doctor_argv(vm.name)}
                for vm in self.plan.vms
            ],
            "processes": [
                {
                    "role": p.role,
                    "pid": p.pid,
                    "netns": p.netns,
                    "alive": processes.is_ours(p.pid, self._marker(p.role)),
                }
                for p in self._state.processes
            ],
            "namespaces": [{"name": ns, "exists": ns in present} for ns in self.plan.namespaces],
        }

    # -- using it -------------------------------------------------------------------------------

    def exec(self, vm: str, argv: Sequence[str], *, input: str | None = None, check: bool = False) -> CommandResult:
        """Run ``argv`` inside VM ``vm``'s namespace and wait for it."""
        return netns.exec_in(self.plan.vm(vm).netns, argv, input=input, check=check, runner=self._runner)

    def exec_argv(self, vm: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside VM ``vm`` (for callers that run it themselves)."""
        return netns.in_netns(self.plan.vm(vm).netns, argv)

    def call(self, vm: str, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in a thread inside VM ``vm``'s namespace; sockets it opens are the VM's."""
        return netns.call_in_netns(self.plan.vm(vm).netns, fn)

    # -- fault seams (lab break / heal, doctor tests) ----------------------------------------

    def remove_router_rules(self, tenant: str = "a") -> None:
        """Delete the REDIRECT/MARK/DROP rules from ``tenant``'s router (IPv4 and IPv6)."""
        ns = self._router_ns(tenant)
        for family in FAMILIES:
            iptables.remove(ns, family, runner=self._runner)

    def apply_router_rules(self, tenant: str = "a") -> None:
        """(Re)install ``tenant``'s router rules; idempotent."""
        ns = self._router_ns(tenant)
        for ruleset in lp.router_rulesets(self.plan.tenant(tenant)):
            iptables.apply(ns, ruleset, runner=self._runner)

    def stop_proxy(self) -> None:
        self._stop_role("proxy")

    def start_proxy(self) -> None:
        """Write the listener file and start the lab's one proxy; wait until every listener is up."""
        self._await_proxy(*self._launch_proxy())

    def stop_server(self) -> None:
        self._stop_role("serve")

    def start_server(self) -> None:
        """Start ``meta169 serve`` on the lab's Unix socket; wait until it listens."""
        self._await_server(*self._launch_server())

    def add_zeroconf_route(self, vm: str, *, drop_host_route: bool = True) -> None:
        """The seed's guest: ``169.254.0.0/16 dev eth0 scope link metric 1002`` (CentOS
        ifup-eth's "Add Zeroconf route"), optionally without the DHCP /32 host route."""
        plan = self.plan.vm(vm)
        if drop_host_route:
            self.exec(vm, ["ip", "-4", "route", "del", f"{lp.METADATA_V4}/32"], check=False)
        self.exec(vm, ["ip", "-4", "route", "replace", *ZEROCONF_ROUTE, "dev", plan.iface, *ZEROCONF_ATTRS], check=True)

    def restore_routes(self, vm: str) -> None:
        """Undo :meth:`add_zeroconf_route`: the /32 via the DHCP next hop back, the /16 gone."""
        plan = self.plan.vm(vm)
        host_route = [f"{lp.METADATA_V4}/32", "via", str(expected_metadata_hop(plan)), "dev", plan.iface]
        self.exec(vm, ["ip", "-4", "route", "replace", *host_route], check=True)
        self.exec(vm, ["ip", "-4", "route", "del", *ZEROCONF_ROUTE, "dev", plan.iface, *ZEROCONF_ATTRS], check=False)
        self.exec(vm, ["ip", "-4", "neigh", "flush", "dev", plan.iface, "to", str(lp.METADATA_V4)], check=False)

    def remove_host_route(self, vm: str) -> None:
        """A guest whose DHCP client ignored option 121: its 169.254.169.254/32 is gone."""
        self.exec(vm, ["ip", "-4", "route", "del", f"{lp.METADATA_V4}/32"], check=False)

    def ensure_proxy(self) -> None:
        """Start the proxy unless it runs (heal: idempotent)."""
        if not self._running("proxy"):
            self.start_proxy()

    def ensure_server(self) -> None:
        """Start serve unless it runs (heal: idempotent)."""
        if not self._running("serve"):
            self.start_server()

    def use_tcp_upstream(self, port: int, *, serve_secret: bytes, proxy_secret: bytes) -> None:
        """Restart serve with a second proxy listener on 127.0.0.1:``port`` (HMAC with
        ``serve_secret``) and the proxy against it, signing with ``proxy_secret``."""
        paths = self.plan.paths
        _write_secret(paths.secret("serve"), serve_secret)
        _write_secret(paths.secret("proxy"), proxy_secret)
        self._state = replace(self._state, tcp_port=port)
        self._save()
        self._restart_servers()

    def use_unix_upstream(self) -> None:
        """The lab's normal wiring: the proxy talks to serve on its Unix socket; secrets removed."""
        self._state = replace(self._state, tcp_port=None)
        self._save()
        self._restart_servers()
        for role in ("serve", "proxy"):
            self.plan.paths.secret(role).unlink(missing_ok=True)

    def unregister(self, vm: str) -> None:
        """Delete VM ``vm``'s instance from the lab's registry (serve then answers it 404)."""
        with self._registry() as registry, contextlib.suppress(NotFound):  # already gone: the fault holds
            registry.delete_instance(self.plan.vm(vm).uuid)

    def register(self, vm: str) -> None:
        """Put VM ``vm``'s instance back as ``lab up`` made it."""
        with self._registry() as registry:
            registry.put_instance(lp.instance(self.plan, self.plan.vm(vm)))

    def metadata(
        self, vm: str, path: str = "/latest/meta-data/instance-id", *, timeout: float = 2.0
    ) -> tuple[int, bytes]:
        """One GET of http://169.254.169.254``path`` from inside ``vm``: (status, body).

        The socket is opened by a thread inside the VM's namespace, so the request
        takes the guest's routes; OSError (refused, timed out) propagates.
        """

        def get() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(str(lp.METADATA_V4), 80, timeout=timeout)
            try:
                conn.request("GET", path)
                reply = conn.getresponse()
                return reply.status, reply.read()
            finally:
                conn.close()

        return self.call(vm, get)

    def await_metadata(self, vm: str, *, status: int = 200, timeout: float = _SETTLE_TIMEOUT) -> None:
        """Wait until ``vm`` gets ``status`` for its instance-id (and, for 200, its own uuid)."""
        want = self.plan.vm(vm).uuid.encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, body = self.metadata(vm, timeout=min(2.0, timeout))
                seen = f"HTTP {got} {body[:80]!r}"
                if got == status and (status != 200 or body == want):
                    return
            except OSError as exc:
                seen = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise LabError(f"{vm}: GET http://{lp.METADATA_V4}/latest/meta-data/instance-id gave {seen} "
                               f"after {timeout:g}s, not HTTP {status}")  # fmt: skip
            time.sleep(0.1)

    # -- lab break / lab heal --------------------------------------------------------------------

    @property
    def faults(self) -> tuple[FaultRecord, ...]:
        return self._state.faults

    def break_fault(self, name: str, vm: str | None = None) -> FaultRecord:
        """``lab break NAME [VM]``: inflict fault ``name`` and record it.

        ConfigError for an unknown fault or a VM it cannot break; LabError when
        something it would change is already broken, or when inflicting fails (what
        it had changed is then healed again).
        """
        self._refresh()
        if self._state.status != "up":
            raise LabError(f"lab {self.name} is {self._state.status}, not up: nothing to break")
        row = lf.fault(name)
        target = lf.target_of(self.plan, row, vm)
        busy = lf.conflict(self._state.faults, row, target)
        if busy is not None:
            again = "is already active" if busy.key == (row.name, target) else "already changes what it would change"
            hint = lf.heal_command(busy) + ("" if self.name == DEFAULT_NAME else f" --name {self.name}")
            raise LabError(f"fault {lf.describe(busy)} {again}; heal it first: {hint}")
        record = FaultRecord(row.name, target, vm, time.time())
        # Recorded first: a break killed halfway is still known to heal.
        self._state = self._state.with_fault(record)
        self._save()
        try:
            row.inflict(self, record)
        except BaseException as exc:
            self._state = self._state.without_fault(record)
            self._save()
            problem = ""
            try:
                row.heal(self, record)
            except Exception as undo:  # the original failure must still be reported
                problem = f"; undoing it failed too: {undo}"
            if not isinstance(exc, Exception):
                raise
            raise LabError(f"lab break {name}: {exc}{problem}") from exc
        return record

    def heal(self, vm: str | None = None, *, everything: bool = False) -> tuple[FaultRecord, ...]:
        """``lab heal [VM] [--all]``: undo recorded faults (see :func:`faults.to_heal`), last first.

        Then waits until every VM they broke, and no other fault still breaks, gets
        its own instance id again (LabError when one does not). A no-op returning ()
        when nothing is broken.
        """
        self._refresh()
        chosen = lf.to_heal(self.plan, self._state.faults, vm, everything=everything)
        for record in chosen:
            self._state = self._state.without_fault(record)
            self._save()
            try:
                lf.fault(record.fault).heal(self, record)
            except BaseException:
                self._state = self._state.with_fault(record)  # still broken: heal can be retried
                self._save()
                raise
        touched = {v.name: v for r in chosen for v in lf.affected(self.plan, r)}
        broken = set(v.name for v in lf.still_broken(self.plan, self._state.faults, list(touched.values())))
        for name in touched:
            if name not in broken:
                self.await_metadata(name)
        return chosen

    # -- doctor command lines --------------------------------------------------------------------

    def doctor_argv(self, vm: str, *extra: str, files_root: Path | None = None) -> list[str]:
        """``meta169 doctor`` inside VM ``vm``: its lease, and ``files_root`` for the guest's
        config files, by default an empty directory (a VM shares the host's filesystem,
        whose /etc says nothing about the guest)."""
        plan = self.plan.vm(vm)
        paths = self.plan.paths
        root = files_root if files_root is not None else paths.guest_root
        argv = [self.plan.config.python, "-m", "meta169", "doctor", "--files-root", str(root),
                "--lease", str(paths.dhclient(vm).lease), *extra]  # fmt: skip
        return netns.in_netns(plan.netns, argv)

    def host_doctor_argv(self, vm: str | None = None, *extra: str) -> list[str]:
        """``meta169 doctor --host`` for this lab only: its namespaces, listener file,
        upstream (and secret), registry; with ``vm``, that VM as the caller to resolve."""
        paths = self.plan.paths
        tcp = self._tcp()
        argv = [self.plan.config.python, "-m", "meta169", "--registry", paths.registry_url, "doctor", "--host",
                "--proxy-listeners", str(paths.listeners), "--upstream", lp.upstream(self.plan, tcp)]  # fmt: skip
        if tcp is not None:
            argv += ["--secret-file", str(tcp.proxy_secret)]
        for tenant in self.plan.tenants:
            if tenant.router_ns is not None:
                argv += ["--netns", f"{tenant.router_ns}=router"]
            argv += ["--netns", f"{tenant.dhcp_ns}=dhcp"]
        if vm is not None:
            plan = self.plan.vm(vm)
            argv += ["--network", plan.network_id, "--ip", str(plan.ip)]
        return argv + list(extra)

    def prepare_guest_root(self) -> Path:
        """Create the empty directory :meth:`doctor_argv` points ``--files-root`` at."""
        root = self.plan.paths.guest_root
        try:
            root.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise LabError(f"cannot create {root}: {exc}") from exc
        return root

    # -- teardown -------------------------------------------------------------------------------

    def down(self, *, keep_files: bool = False) -> TeardownReport:
        """Remove every namespace, veth, rule and process of the lab; then its files.

        LabError when something could not be removed (the state file then stays, so
        ``lab down`` can be run again).
        """
        self._refresh()
        report = self._teardown()
        if report.problems:
            self._state = replace(self._state, status="failed", error="; ".join(report.problems))
            self._save()
            raise LabError(f"lab {self.name}: down left things behind: {'; '.join(report.problems)}")
        self._state = replace(self._state, status="down", error="")
        if keep_files:
            self._save()
        else:
            self._remove_files()
        return report

    # -- internals: building ------------------------------------------------------------------

    def _steps(self) -> Iterator[tuple[str, Callable[[], None]]]:
        plan = self.plan
        yield "create namespaces", self._create_namespaces
        for tenant in plan.tenants:
            yield f"wire tenant {tenant.key} ({tenant.mode})", functools.partial(self._wire, tenant)
        for tenant in plan.tenants:
            if tenant.router_ns is not None:
                yield f"router rules in {tenant.router_ns}", functools.partial(self.apply_router_rules, tenant.key)
        yield "seed the registry", self._seed_registry
        yield "start meta169 serve and proxy", self._start_servers
        for tenant in plan.tenants:
            yield f"start dnsmasq for {tenant.network.id}", functools.partial(self._start_dnsmasq, tenant)
        yield "start dhclient in every VM", self._start_dhclients
        yield "check VM addresses and routes", self._check_vms
        yield "wait for IPv6 duplicate address detection", self._wait_for_dad

    def _prepare(self) -> None:
        paths = self.plan.paths
        previous = state.load(paths.state)
        if previous is not None and previous.status in ("building", "up"):
            raise LabError(
                f"lab {self.name} is already {previous.status} (state in {paths.root}); "
                f"run meta169 lab down --name {self.name} first"
            )
        leftovers = lab_namespaces(self.plan.prefix)
        if leftovers:
            raise LabError(
                f"namespaces of an earlier lab {self.name} remain ({', '.join(leftovers)}); "
                f"run meta169 lab down --name {self.name} first"
            )
        try:
            paths.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            # dnsmasq re-reads its hosts file after dropping root: others must traverse.
            paths.root.chmod(0o755)
        except OSError as exc:
            raise LabError(f"cannot create the lab state directory {paths.root}: {exc}") from exc
        self._remove_files(keep_root=True)
        self._save()

    def _create_namespaces(self) -> None:
        for ns in self.plan.namespaces:
            netns.add(ns, runner=self._runner)
            self._state = self._state.with_namespace(ns)
            self._save()

    def _wire(self, tenant: TenantPlan) -> None:
        run_ = self._runner
        sw = tenant.switch_ns
        # Snooping off: with no MLD querier on this bridge, a snooped report could
        # stop neighbour solicitations for fe80::a9fe:a9fe reaching its owner.
        run_(netns.ip_argv(sw, "link", "add", lp.BRIDGE, "type", "bridge", "mcast_snooping", "0"))
        netns.link_up(sw, lp.BRIDGE, runner=run_)
        legs: list[tuple[str, str, str, str]] = [
            (f"{lp.SWITCH_PORT_PREFIX}dhcp", tenant.dhcp_ns, lp.DHCP_IFACE, lp.lab_mac(tenant.key, 2)),
        ]
        if tenant.router_ns is not None:
            legs.append((f"{lp.SWITCH_PORT_PREFIX}qr", tenant.router_ns, lp.ROUTER_IFACE, lp.lab_mac(tenant.key, 1)))
        legs += [(vm.switch_port, vm.netns, vm.iface, vm.mac) for vm in tenant.vms]
        for port, peer_ns, peer_if, mac in legs:
            netns.create_veth(port, sw, peer_if, peer_ns, mac_b=mac, runner=run_)
            run_(netns.ip_argv(sw, "link", "set", "dev", port, "master", lp.BRIDGE))
        prefix = lp.SUBNET.prefixlen
        netns.add_address(tenant.dhcp_ns, lp.DHCP_IFACE, ipaddress.ip_interface(f"{lp.DHCP_IP}/{prefix}"), runner=run_)
        if tenant.router_ns is not None:
            netns.add_address(
                tenant.router_ns, lp.ROUTER_IFACE, ipaddress.ip_interface(f"{lp.GATEWAY_IP}/{prefix}"), runner=run_
            )
            # The router answers neighbour solicitations for fe80::a9fe:a9fe, so the
            # guest's packet reaches the ip6tables REDIRECT (an IPv4 packet reaches it
            # by the /32 route via the gateway instead).
            netns.add_metadata_address(tenant.router_ns, lp.ROUTER_IFACE, family=6, nodad=True, runner=run_)
        else:
            # Isolated mode: the DHCP port itself owns the metadata addresses
            # [neutron agent/linux/dhcp.py DeviceManager.setup, METADATA_CIDR].
            netns.add_metadata_address(tenant.dhcp_ns, lp.DHCP_IFACE, family=4, runner=run_)
            netns.add_metadata_address(tenant.dhcp_ns, lp.DHCP_IFACE, family=6, nodad=True, runner=run_)

    def _seed_registry(self) -> None:
        from meta169.registry import open_registry

        registry = open_registry(self.plan.paths.registry_url)
        try:
            for network in lp.networks(self.plan):
                registry.put_network(network)
            for router in lp.routers(self.plan):
                registry.put_router(router)
            for inst in lp.instances(self.plan):
                registry.put_instance(inst)
        finally:
            registry.close()
        with contextlib.suppress(FileNotFoundError):
            self.plan.paths.registry.chmod(0o600)  # user data and keys: root's only

    def _start_dnsmasq(self, tenant: TenantPlan) -> None:
        cfg = lp.dnsmasq_config(self.plan, tenant)
        handle = dnsmasq.start(cfg, tenant.dhcp_ns, binary=self.plan.config.dnsmasq_binary)
        self._record(f"dnsmasq-{tenant.key}", handle.pid, tenant.dhcp_ns, handle.process)

    def _start_dhclients(self) -> None:
        def start_one(vm: VMPlan) -> dhclient.DhclientHandle:
            return dhclient.start(
                vm.netns,
                vm.iface,
                self.plan.paths.vm_dir(vm.name),
                timeout=_DHCLIENT_TIMEOUT,
                binary=self.plan.config.dhclient_binary,
            )

        # Concurrently: each waits for its own DISCOVER/OFFER round trip.
        vms = self.plan.vms
        with ThreadPoolExecutor(max_workers=len(vms)) as pool:
            futures = [(vm, pool.submit(start_one, vm)) for vm in vms]
        failures = []
        for vm, future in futures:
            try:
                handle = future.result()
            except Meta169Error as exc:
                failures.append(f"{vm.name}: {exc}")
                continue
            self._record(f"dhclient-{vm.name}", handle.pid, vm.netns, handle.process)
        if failures:
            raise LabError("dhclient failed in " + "; ".join(failures))

    def _check_vms(self) -> None:
        problems = []
        for vm in self.plan.vms:
            want = ipaddress.ip_interface(f"{vm.ip}/{lp.SUBNET.prefixlen}")
            have = netns.addresses(vm.netns, vm.iface, runner=self._runner)
            if want not in have:
                problems.append(f"{vm.name} has {', '.join(map(str, have)) or 'no address'}, not {want}")
                continue
            hop = str(expected_metadata_hop(vm))
            got = route_get(vm.netns, str(lp.METADATA_V4), runner=self._runner).get("gateway")
            if got != hop:
                problems.append(f"{vm.name} routes 169.254.169.254 via {got or 'on-link'}, not via {hop} (option 121)")
        if problems:
            raise LabError("; ".join(problems))

    def _wait_for_dad(self) -> None:
        for vm in self.plan.vms:
            netns.wait_for_dad(vm.netns, vm.iface, runner=self._runner)
        for tenant in self.plan.tenants:
            if tenant.router_ns is not None:
                netns.wait_for_dad(tenant.router_ns, lp.ROUTER_IFACE, runner=self._runner)

    def _start_servers(self) -> None:
        # Both at once: each spends most of its start-up importing Python modules,
        # and the proxy opens its listeners without needing serve to be up yet.
        server, proxy = self._launch_server(), self._launch_proxy()
        self._await_server(*server)
        self._await_proxy(*proxy)

    def _launch_server(self) -> tuple[processes.Background, int]:
        offset = _size(self.plan.paths.log("serve"))
        return self._start_background("serve", lp.serve_argv(self.plan, self._tcp())), offset

    def _await_server(self, bg: processes.Background, offset: int) -> None:
        processes.wait_for_line(bg, _SERVE_READY, timeout=self.plan.config.ready_timeout, offset=offset)

    def _launch_proxy(self) -> tuple[processes.Background, int]:
        paths = self.plan.paths
        _write_text(paths.listeners, json.dumps(lp.listeners_document(self.plan), indent=2) + "\n")
        offset = _size(paths.log("proxy"))
        return self._start_background("proxy", lp.proxy_argv(self.plan, self._tcp())), offset

    def _await_proxy(self, bg: processes.Background, offset: int) -> None:
        match = processes.wait_for_line(bg, _PROXY_READY, timeout=self.plan.config.ready_timeout, offset=offset)
        wanted = len(lp.proxy_listeners(self.plan))
        if int(match.group(1)) != wanted:
            log = processes.tail(self.plan.paths.log("proxy"))
            raise LabError(f"proxy opened {match.group(1)} of {wanted} listeners; its log:\n{log}")

    def _start_background(self, role: str, argv: list[str]) -> processes.Background:
        paths = self.plan.paths
        bg = processes.start(role, argv, log=paths.log(role), pid_file=paths.pid_file(role), marker=self._marker(role))
        self._record(role, bg.pid, None, bg.process)
        return bg

    def _record(self, role: str, pid: int, ns: str | None, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None:
            self._children[role] = process
        self._state = self._state.with_process(ProcessRecord(role, pid, ns))
        self._save()

    def _marker(self, role: str) -> str:
        paths = self.plan.paths
        if role == "serve":
            return f"unix:{paths.serve_socket}=proxy"
        if role == "proxy":
            return str(paths.listeners)
        kind, _, key = role.partition("-")
        if kind == "dnsmasq":
            return f"--conf-file={lp.dnsmasq_config(self.plan, self.plan.tenant(key)).paths.conf}"
        if kind == "dhclient":
            return str(paths.dhclient(key).lease)
        raise LabError(f"unknown lab process role {role!r}")

    def _tcp(self) -> TcpUpstream | None:
        port = self._state.tcp_port
        if port is None:
            return None
        paths = self.plan.paths
        return TcpUpstream(port, paths.secret("serve"), paths.secret("proxy"))

    def _running(self, role: str) -> bool:
        record = self._state.process(role)
        return record is not None and processes.is_ours(record.pid, self._marker(role))

    def _restart_servers(self) -> None:
        self.stop_proxy()
        self.stop_server()
        self._start_servers()

    @contextlib.contextmanager
    def _registry(self) -> Iterator[Registry]:
        from meta169.registry import open_registry

        registry = open_registry(self.plan.paths.registry_url)
        try:
            yield registry
        finally:
            registry.close()

    def _refresh(self) -> None:
        """Adopt what another process (``meta169 lab break``/``heal``) recorded since."""
        found = state.load(self.plan.paths.state) if self._persist else None
        if found is None or found.config.name != self.name:
            return
        self._state = found
        for role, child in list(self._children.items()):
            record = found.process(role)
            if record is None or record.pid != child.pid:
                child.poll()  # reaps it when another process stopped it
                del self._children[role]

    def _router_ns(self, tenant: str) -> str:
        ns = self.plan.tenant(tenant).router_ns
        if ns is None:
            raise LabError(f"tenant {tenant} is isolated: it has no router")
        return ns

    # -- internals: teardown ----------------------------------------------------------------------

    def _stop_role(self, role: str) -> None:
        record = self._state.process(role)
        if record is None:
            return
        self._stop_record(record)
        self._state = self._state.without_process(role)
        self._save()

    def _stop_record(self, record: ProcessRecord) -> None:
        child = self._children.pop(record.role, None)
        kind, _, key = record.role.partition("-")
        if kind == "dnsmasq":
            paths = lp.dnsmasq_config(self.plan, self.plan.tenant(key)).paths
            dnsmasq.stop(dnsmasq.DnsmasqHandle(record.pid, record.netns or "", paths, child))
        elif kind == "dhclient":
            dpaths = self.plan.paths.dhclient(key)
            dhclient.stop(dhclient.DhclientHandle(record.pid, record.netns or "", dpaths, child))
        else:
            log = self.plan.paths.log(record.role)
            processes.stop(processes.Background(record.role, record.pid, self._marker(record.role), log, child))
        self.plan.paths.pid_file(record.role).unlink(missing_ok=True)

    def _teardown(self) -> TeardownReport:
        problems: list[str] = []
        stopped: list[str] = []
        # Guests first (no renewals racing the servers' exit), then the servers.
        order = {"dhclient": 0, "proxy": 1, "serve": 2, "dnsmasq": 3}
        for record in sorted(self._state.processes, key=lambda p: order.get(p.role.partition("-")[0], 9)):
            try:
                self._stop_record(record)
                stopped.append(record.role)
            except (OSError, Meta169Error) as exc:
                problems.append(f"stop {record.role} (PID {record.pid}): {exc}")
            self._state = self._state.without_process(record.role)
        self._save()
        # Anything of ours not (yet) recorded: a crash between start and record.
        markers = set(lp.process_markers(self.plan))
        stray = processes.find_marked(markers, exclude={os.getpid()})
        kill_checked(stray, lambda pid: bool(markers.intersection(processes.cmdline(pid))))
        stopped += [f"PID {pid}" for pid in stray]
        removed: list[str] = []
        for ns in lab_namespaces(self.plan.prefix):
            try:
                self._clear_namespace(ns)
                netns.delete(ns, runner=self._runner)
                removed.append(ns)
            except (OSError, Meta169Error) as exc:
                problems.append(f"delete namespace {ns}: {exc}")
            self._state = self._state.without_namespace(ns)
        self._save()
        left = lab_namespaces(self.plan.prefix)
        if left:
            problems.append(f"namespaces still present: {', '.join(left)}")
        still = processes.find_marked(markers, exclude={os.getpid()})
        if still:
            problems.append(f"processes still running: {', '.join(map(str, still))}")
        return TeardownReport(tuple(removed), tuple(stopped), tuple(problems))

    def _clear_namespace(self, ns: str) -> None:
        if ns in {t.router_ns for t in self.plan.tenants}:
            # Our rules go with the namespace; removing them first keeps the
            # "never leave a rule of ours" promise independent of that.
            for family in FAMILIES:
                with contextlib.suppress(Meta169Error):
                    iptables.remove(ns, family, runner=self._runner)
        # Processes inside a namespace of ours are ours (it was made by this lab).
        try:
            inode = (netns.NETNS_DIR / ns).stat().st_ino
        except OSError:
            return
        pids = netns.pids(ns, runner=self._runner)
        kill_checked(pids, lambda pid: _netns_inode(pid) == inode)

    def _save(self) -> None:
        if self._persist and self.plan.paths.root.is_dir():
            state.save(self._state, self.plan.paths.state)

    def _remove_files(self, *, keep_root: bool = False) -> None:
        """Delete the files this lab writes (only those: the directory may hold others)."""
        paths = self.plan.paths
        roles = ("serve", "proxy")
        files = [paths.state, paths.listeners, paths.serve_socket, paths.secret("serve"), paths.secret("proxy")]
        files += [paths.registry.with_name(paths.registry.name + sfx) for sfx in ("", "-wal", "-shm", "-journal")]
        files += [paths.pid_file(r) for r in roles] + [paths.log(r) for r in roles]
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        dirs = [paths.dnsmasq_dir(t.key) for t in self.plan.tenants] + [paths.vm_dir(v.name) for v in self.plan.vms]
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            paths.guest_root.rmdir()  # only when empty: the doctor's --files-root
        if not keep_root:
            with contextlib.suppress(OSError):
                paths.root.rmdir()  # only when empty
                if paths.root.parent == DEFAULT_STATE_ROOT:
                    paths.root.parent.rmdir()  # ours too, when no other lab is in it
        self._persist = keep_root


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
    }


def expected_metadata_hop(vm: VMPlan) -> ipaddress.IPv4Address:
    """Where option 121 sends 169.254.169.254: the gateway (routed) or the DHCP port (isolated)."""
    return lp.GATEWAY_IP if vm.mode == "router" else lp.DHCP_IP


def route_get(ns: str, destination: str, *, runner: Runner = run) -> dict[str, Any]:
    """``ip -j route get DEST`` inside ``ns``: the route the kernel would use."""
    out = runner(netns.ip_argv(ns, "-j", "route", "get", destination)).stdout
    try:
        routes = json.loads(out)
    except ValueError as exc:
        raise LabError(f"ip route get {destination} in {ns} printed no JSON: {exc}") from exc
    return dict(routes[0]) if routes else {}


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _write_secret(path: Path, secret: bytes) -> None:
    # Mode 0600 from the start: serve and the proxy refuse a secret others can read.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret + b"\n")
        path.chmod(0o600)
    except OSError as exc:
        raise LabError(f"cannot write {path}: {exc}") from exc


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise LabError(f"cannot write {path}: {exc}") from exc
