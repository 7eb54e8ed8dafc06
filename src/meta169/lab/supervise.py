"""The lab's processes by role: ``serve``, ``proxy``, ``dnsmasq-<tenant>``, ``dhclient-<vm>``.

:class:`Supervisor` starts each the way the lab runs it (serve and the one proxy
detached through :mod:`meta169.lab.processes`, dnsmasq and dhclient through
:mod:`meta169.plumbing`), records it in the lab's :class:`~meta169.lab.state.Ledger`
right after it starts, waits until it is ready, and stops it by a PID it has checked.
It also owns how the proxy reaches serve: serve's Unix socket, or loopback TCP with
HMAC secrets (what the ``secret-mismatch`` fault switches to). Each role's marker, an
argument naming a file in the state directory that only that process carries, is
what every PID check and the sweep for strays look for.

Knows nothing of the namespaces' wiring, the registry's contents or faults.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Literal

from meta169.errors import LabError, Meta169Error
from meta169.lab import plan as lp
from meta169.lab import processes, qemu
from meta169.lab.plan import LabPlan, TcpUpstream, TenantPlan, VMPlan
from meta169.lab.state import LabState, Ledger, ProcessRecord
from meta169.plumbing import dhclient, dnsmasq
from meta169.plumbing.command import kill_checked

_SERVE_READY = re.compile(r"meta169 serve: listening on")
_PROXY_READY = re.compile(r"meta169 proxy: (\d+) listeners up")
_DHCLIENT_TIMEOUT = 15  # seconds for one lease (dhclient's own timeout statement)
# Guests first (no renewals racing the servers' exit), then the servers, then DHCP.
_STOP_ORDER = {"qemu": 0, "dhclient": 0, "proxy": 1, "serve": 2, "dnsmasq": 3}


def marker(plan: LabPlan, role: str) -> str:
    """The argument only ``role``'s process carries (LabError for a role the lab has not)."""
    paths = plan.paths
    if role == "serve":
        return f"unix:{paths.serve_socket}=proxy"
    if role == "proxy":
        return str(paths.listeners)
    kind, _, key = role.partition("-")
    if kind == "dnsmasq":
        return f"--conf-file={lp.dnsmasq_config(plan, plan.tenant(key)).paths.conf}"
    if kind == "dhclient":
        return str(paths.dhclient(key).lease)
    if kind == "qemu":
        return qemu.marker(plan, key)
    raise LabError(f"unknown lab process role {role!r}")


def tcp_upstream(plan: LabPlan, state: LabState) -> TcpUpstream | None:
    """serve's loopback TCP listener and the secret files, when ``state`` runs the lab on TCP."""
    if state.tcp_port is None:
        return None
    paths = plan.paths
    return TcpUpstream(state.tcp_port, paths.secret("serve"), paths.secret("proxy"))


def is_alive(plan: LabPlan, record: ProcessRecord) -> bool:
    """Whether ``record``'s PID is still the lab's process of that role."""
    return processes.is_ours(record.pid, marker(plan, record.role))


class Supervisor:
    """Starts, records and stops one lab's processes; keeps the handles of those it started.

    A handle (the ``Popen``) lets it notice a child's exit while waiting for it to be
    ready, and reap it once stopped. The constructor does no IO.
    """

    def __init__(self, plan: LabPlan, ledger: Ledger) -> None:
        self.plan = plan
        self.ledger = ledger
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def tcp(self) -> TcpUpstream | None:
        return tcp_upstream(self.plan, self.ledger.state)

    def running(self, role: str) -> bool:
        record = self.ledger.state.process(role)
        return record is not None and is_alive(self.plan, record)

    # -- serve and the proxy ------------------------------------------------------------------

    def start_servers(self) -> None:
        """Start serve and the proxy; wait until serve listens and every proxy listener is up."""
        # Both at once: each spends most of its start-up importing Python modules,
        # and the proxy opens its listeners without needing serve to be up yet.
        server, proxy = self._launch_server(), self._launch_proxy()
        self._await_server(*server)
        self._await_proxy(*proxy)

    def start_server(self) -> None:
        """Start ``meta169 serve`` on the lab's Unix socket; wait until it listens."""
        self._await_server(*self._launch_server())

    def start_proxy(self) -> None:
        """Write the listener file and start the lab's one proxy; wait until every listener is up."""
        self._await_proxy(*self._launch_proxy())

    def ensure(self, role: Literal["serve", "proxy"]) -> None:
        """Start serve or the proxy unless it runs (idempotent)."""
        if self.running(role):
            return
        if role == "serve":
            self.start_server()
        else:
            self.start_proxy()

    def restart_servers(self) -> None:
        self.stop("proxy")
        self.stop("serve")
        self.start_servers()

    def use_tcp_upstream(self, port: int, *, serve_secret: bytes, proxy_secret: bytes) -> None:
        """Restart serve with a second proxy listener on 127.0.0.1:``port`` (HMAC with
        ``serve_secret``) and the proxy against it, signing with ``proxy_secret``."""
        paths = self.plan.paths
        _write_secret(paths.secret("serve"), serve_secret)
        _write_secret(paths.secret("proxy"), proxy_secret)
        self.ledger.update(replace(self.ledger.state, tcp_port=port))
        self.restart_servers()

    def use_unix_upstream(self) -> None:
        """The lab's normal wiring: the proxy talks to serve on its Unix socket; secrets removed."""
        self.ledger.update(replace(self.ledger.state, tcp_port=None))
        self.restart_servers()
        for role in ("serve", "proxy"):
            self.plan.paths.secret(role).unlink(missing_ok=True)

    def _launch_server(self) -> tuple[processes.Background, int]:
        offset = _size(self.plan.paths.log("serve"))
        return self._start_background("serve", lp.serve_argv(self.plan, self.tcp())), offset

    def _await_server(self, bg: processes.Background, offset: int) -> None:
        processes.wait_for_line(bg, _SERVE_READY, timeout=self.plan.config.ready_timeout, offset=offset)

    def _launch_proxy(self) -> tuple[processes.Background, int]:
        paths = self.plan.paths
        _write_text(paths.listeners, json.dumps(lp.listeners_document(self.plan), indent=2) + "\n")
        offset = _size(paths.log("proxy"))
        return self._start_background("proxy", lp.proxy_argv(self.plan, self.tcp())), offset

    def _await_proxy(self, bg: processes.Background, offset: int) -> None:
        match = processes.wait_for_line(bg, _PROXY_READY, timeout=self.plan.config.ready_timeout, offset=offset)
        wanted = len(lp.proxy_listeners(self.plan))
        if int(match.group(1)) != wanted:
            log = processes.tail(self.plan.paths.log("proxy"))
            raise LabError(f"proxy opened {match.group(1)} of {wanted} listeners; its log:\n{log}")

    def _start_background(self, role: str, argv: list[str]) -> processes.Background:
        paths = self.plan.paths
        bg = processes.start(
            role, argv, log=paths.log(role), pid_file=paths.pid_file(role), marker=marker(self.plan, role)
        )
        self._record(role, bg.pid, None, bg.process)
        return bg

    # -- DHCP -------------------------------------------------------------------------------------

    def start_dnsmasq(self, tenant: TenantPlan) -> None:
        """dnsmasq on ``tenant``'s DHCP port, inside its DHCP namespace."""
        cfg = lp.dnsmasq_config(self.plan, tenant)
        handle = dnsmasq.start(cfg, tenant.dhcp_ns, binary=self.plan.config.dnsmasq_binary)
        self._record(f"dnsmasq-{tenant.key}", handle.pid, tenant.dhcp_ns, handle.process)

    def start_dhclients(self) -> None:
        """dhclient in every VM, all at once; returns when each has its lease (LabError
        naming every VM that got none, after recording the others)."""

        def start_one(vm: VMPlan) -> dhclient.DhclientHandle:
            return dhclient.start(
                vm.netns,
                vm.iface,
                self.plan.paths.vm_dir(vm.name),
                timeout=_DHCLIENT_TIMEOUT,
                binary=self.plan.config.dhclient_binary,
            )

        # Concurrently: each waits for its own DISCOVER/OFFER round trip. A QEMU
        # guest runs its own DHCP client.
        vms = [vm for vm in self.plan.vms if vm.kind == "netns"]
        if not vms:
            return
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

    # -- QEMU guests -------------------------------------------------------------------------------

    def start_guests(self) -> None:
        """Start every QEMU guest (each from its own overlay); they boot concurrently."""
        for vm in self.plan.qemu_vms:
            role = f"qemu-{vm.name}"
            bg = qemu.start(self.plan, vm, log=self.plan.paths.log(role))
            self._record(role, bg.pid, vm.netns, bg.process)

    def await_guests(self) -> None:
        """Until every QEMU guest's agent answers and its network is as planned."""
        for vm in self.plan.qemu_vms:
            qemu.wait_booted(self.plan, vm, process=self._children.get(f"qemu-{vm.name}"))

    # -- stopping ---------------------------------------------------------------------------------

    def stop(self, role: str) -> None:
        """Stop ``role``'s process, if one is recorded, and forget it."""
        record = self.ledger.state.process(role)
        if record is None:
            return
        self._stop_record(record)
        self.ledger.update(self.ledger.state.without_process(role))

    def stop_all(self) -> tuple[list[str], list[str]]:
        """Stop every recorded process, guests first: (roles stopped, problems).

        Each is forgotten whether or not stopping it worked; a failure is a problem,
        not an exception, so that the rest still stop.
        """
        stopped: list[str] = []
        problems: list[str] = []
        state = self.ledger.state
        for record in sorted(state.processes, key=lambda p: _STOP_ORDER.get(p.role.partition("-")[0], 9)):
            try:
                self._stop_record(record)
                stopped.append(record.role)
            except (OSError, Meta169Error) as exc:
                problems.append(f"stop {record.role} (PID {record.pid}): {exc}")
            state = state.without_process(record.role)
        self.ledger.update(state)
        return stopped, problems

    def kill_strays(self) -> list[int]:
        """Kill the lab's processes that were never recorded (a crash between start and
        record); their PIDs. A PID is signalled only while it still carries a marker."""
        markers = set(lp.process_markers(self.plan))
        stray = self.strays()
        kill_checked(stray, lambda pid: bool(markers.intersection(processes.cmdline(pid))))
        return stray

    def strays(self) -> list[int]:
        """PIDs of live processes carrying one of the lab's markers (this one excepted)."""
        return processes.find_marked(set(lp.process_markers(self.plan)), exclude={os.getpid()})

    def forget_replaced(self) -> None:
        """After the ledger adopted another process's record: drop (and reap) the
        handles of children that process stopped or replaced."""
        for role, child in list(self._children.items()):
            record = self.ledger.state.process(role)
            if record is None or record.pid != child.pid:
                child.poll()  # reaps it when another process stopped it
                del self._children[role]

    def _record(self, role: str, pid: int, ns: str | None, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None:
            self._children[role] = process
        self.ledger.update(self.ledger.state.with_process(ProcessRecord(role, pid, ns)))

    def _stop_record(self, record: ProcessRecord) -> None:
        child = self._children.pop(record.role, None)
        kind, _, key = record.role.partition("-")
        paths = self.plan.paths
        if kind == "dnsmasq":
            dpaths = lp.dnsmasq_config(self.plan, self.plan.tenant(key)).paths
            dnsmasq.stop(dnsmasq.DnsmasqHandle(record.pid, record.netns or "", dpaths, child))
        elif kind == "dhclient":
            dhclient.stop(dhclient.DhclientHandle(record.pid, record.netns or "", paths.dhclient(key), child))
        else:
            log = paths.log(record.role)
            processes.stop(processes.Background(record.role, record.pid, marker(self.plan, record.role), log, child))
        paths.pid_file(record.role).unlink(missing_ok=True)


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
