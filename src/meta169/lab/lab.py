""":class:`Lab`: one lab as a running thing, a facade over the modules that do the work.

It holds the plan, the ledger of the state file, the supervisor of the lab's
processes and the command runner, and every method delegates to one module:
:mod:`~meta169.lab.lifecycle` (up, down), :mod:`~meta169.lab.status`,
:mod:`~meta169.lab.network` (router rules), :mod:`~meta169.lab.supervise` (serve,
proxy), :mod:`~meta169.lab.seed` (registry), :mod:`~meta169.lab.guest` (a VM's
routes and metadata), :mod:`~meta169.lab.faults` (break, heal) and
:mod:`~meta169.lab.doctor_argv`. The seams exist for ``lab break``/``lab heal``,
whose fault actions call them, and for the e2e tests. Knows no detail of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meta169.errors import LabError
from meta169.lab import faults as lf
from meta169.lab import guest, lifecycle, network, qemu, seed
from meta169.lab import plan as lp
from meta169.lab.doctor_argv import guest_doctor_argv, host_doctor_argv, prepare_guest_root
from meta169.lab.guest import SETTLE_TIMEOUT
from meta169.lab.lifecycle import TeardownReport
from meta169.lab.plan import LabConfig, LabPlan, VMPlan
from meta169.lab.state import FaultRecord, LabState, Ledger
from meta169.lab.state import load as load_state
from meta169.lab.status import status as lab_status
from meta169.lab.supervise import Supervisor
from meta169.plumbing import netns
from meta169.plumbing.command import CommandResult, Runner, run

T = TypeVar("T")


class Lab:
    """One lab: its plan, its recorded state and the handles of the processes it started.

    Build one with :meth:`up` or :meth:`load`; the constructor does no IO.
    """

    def __init__(self, plan: LabPlan, lab_state: LabState, *, runner: Runner = run, persist: bool = True) -> None:
        self.plan = plan
        self.runner = runner
        self.ledger = Ledger(lab_state, plan.paths.state, persist=persist)
        self._supervisor = Supervisor(plan, self.ledger)
        self.up_seconds = 0.0

    # -- construction -------------------------------------------------------------------

    @classmethod
    def up(cls, config: LabConfig, *, runner: Runner = run) -> Lab:
        """Build the lab ``config`` describes and return it once every VM has its lease.

        On failure, or on KeyboardInterrupt, tears down what it made and raises
        (LabError naming the failed step; the interrupt as is).
        """
        lab = cls(lp.plan_lab(config), LabState(config), runner=runner)
        lab.up_seconds = lifecycle.up(lab.plan, lab.ledger, lab._supervisor, runner)
        return lab

    @classmethod
    def load(cls, config: LabConfig, *, runner: Runner = run) -> Lab:
        """The lab recorded in ``config``'s state directory (LabError when there is none)."""
        path = lp.LabPaths(config.directory).state
        found = load_state(path)
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
        found = load_state(lp.LabPaths(config.directory).state)
        if found is None:
            lab = cls(lp.plan_lab(config), LabState(config, status="down"), runner=runner, persist=False)
        else:
            lab = cls(lp.plan_lab(found.config), found, runner=runner)
        return lab.down(keep_files=keep_files)

    def down(self, *, keep_files: bool = False) -> TeardownReport:
        """Remove every namespace, veth, rule and process of the lab; then its files.

        LabError when something could not be removed (the state file then stays, so
        ``lab down`` can be run again).
        """
        self._refresh()
        return lifecycle.down(self.plan, self.ledger, self._supervisor, self.runner, keep_files=keep_files)

    # -- what it is -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def state(self) -> LabState:
        return self.ledger.state

    @property
    def vms(self) -> tuple[VMPlan, ...]:
        return self.plan.vms

    def vm(self, name: str) -> VMPlan:
        return self.plan.vm(name)

    def status(self) -> dict[str, Any]:
        """What ``lab status --json`` prints: the VMs, the processes (alive or not), the namespaces."""
        return lab_status(self.plan, self.ledger.state)

    # -- using it -------------------------------------------------------------------------------

    def exec(
        self, vm: str, argv: Sequence[str], *, input: str | None = None, check: bool = False,
        timeout: float | None = None,
    ) -> CommandResult:  # fmt: skip
        """Run ``argv`` inside VM ``vm`` (its namespace, or a QEMU guest through its agent) and wait for it."""
        chosen = self.plan.vm(vm)
        if chosen.kind == "qemu":
            return qemu.exec_in(self.plan, chosen, argv, input=input, check=check, timeout=timeout)
        return netns.exec_in(chosen.netns, argv, input=input, check=check, runner=self.runner)

    def exec_argv(self, vm: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside VM ``vm`` (for callers that run it themselves)."""
        return netns.in_netns(self._netns_vm(vm).netns, argv)

    def call(self, vm: str, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in a thread inside VM ``vm``'s namespace; sockets it opens are the VM's."""
        return netns.call_in_netns(self._netns_vm(vm).netns, fn)

    def metadata(
        self, vm: str, path: str = "/latest/meta-data/instance-id", *, timeout: float = 2.0
    ) -> tuple[int, bytes]:
        """One GET of http://169.254.169.254``path`` from inside ``vm``: (status, body)."""
        chosen = self.plan.vm(vm)
        if chosen.kind == "qemu":
            return qemu.metadata(self.plan, chosen, path)
        return guest.metadata(chosen, path, timeout=timeout)

    def await_metadata(self, vm: str, *, status: int = 200, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until ``vm`` gets ``status`` for its instance-id (and, for 200, its own uuid)."""
        chosen = self.plan.vm(vm)
        if chosen.kind == "qemu":
            qemu.await_metadata(self.plan, chosen, status=status, timeout=max(timeout, qemu.SETTLE_TIMEOUT))
        else:
            guest.await_metadata(chosen, status=status, timeout=timeout)

    def guest_doctor(self, vm: str, *extra: str) -> CommandResult:
        """``meta169 doctor`` inside QEMU guest ``vm``, copied in through its agent."""
        return qemu.doctor(self.plan, self._qemu_vm(vm), *extra)

    def console(self, vm: str) -> bytes:
        """What QEMU guest ``vm`` wrote to its serial console."""
        return qemu.console_text(self.plan, self._qemu_vm(vm))

    def _netns_vm(self, vm: str) -> VMPlan:
        chosen = self.plan.vm(vm)
        if chosen.kind == "qemu":
            raise LabError(f"{vm} is a QEMU guest: commands reach it through its agent (lab exec, Lab.exec)")
        return chosen

    def _qemu_vm(self, vm: str) -> VMPlan:
        chosen = self.plan.vm(vm)
        if chosen.kind != "qemu":
            raise LabError(f"{vm} is a namespace, not a QEMU guest (lab up --qemu {vm})")
        return chosen

    def _inside(self, vm: VMPlan) -> Runner | None:
        return qemu.runner(self.plan, vm) if vm.kind == "qemu" else None

    # -- fault seams (lab break / heal, doctor tests) ----------------------------------------

    def remove_router_rules(self, tenant: str = "a") -> None:
        """Delete the REDIRECT/MARK/DROP rules from ``tenant``'s router (IPv4 and IPv6)."""
        network.remove_router_rules(self.plan, tenant, runner=self.runner)

    def apply_router_rules(self, tenant: str = "a") -> None:
        """(Re)install ``tenant``'s router rules; idempotent."""
        network.apply_router_rules(self.plan, tenant, runner=self.runner)

    def stop_proxy(self) -> None:
        self._supervisor.stop("proxy")

    def start_proxy(self) -> None:
        """Write the listener file and start the lab's one proxy; wait until every listener is up."""
        self._supervisor.start_proxy()

    def ensure_proxy(self) -> None:
        """Start the proxy unless it runs (heal: idempotent)."""
        self._supervisor.ensure("proxy")

    def stop_server(self) -> None:
        self._supervisor.stop("serve")

    def start_server(self) -> None:
        """Start ``meta169 serve`` on the lab's Unix socket; wait until it listens."""
        self._supervisor.start_server()

    def ensure_server(self) -> None:
        """Start serve unless it runs (heal: idempotent)."""
        self._supervisor.ensure("serve")

    def use_tcp_upstream(self, port: int, *, serve_secret: bytes, proxy_secret: bytes) -> None:
        """Restart serve and the proxy talking over loopback TCP with these HMAC secrets."""
        self._supervisor.use_tcp_upstream(port, serve_secret=serve_secret, proxy_secret=proxy_secret)

    def use_unix_upstream(self) -> None:
        """The lab's normal wiring: the proxy talks to serve on its Unix socket; secrets removed."""
        self._supervisor.use_unix_upstream()

    def add_zeroconf_route(self, vm: str, *, drop_host_route: bool = True) -> None:
        """The seed's guest: ``169.254.0.0/16 dev eth0 scope link metric 1002`` (CentOS
        ifup-eth's "Add Zeroconf route"), optionally without the DHCP /32 host route."""
        chosen = self.plan.vm(vm)
        inside = self._inside(chosen)
        guest.add_zeroconf_route(chosen, drop_host_route=drop_host_route, runner=self.runner, inside=inside)

    def restore_routes(self, vm: str) -> None:
        """Undo :meth:`add_zeroconf_route`: the /32 via the DHCP next hop back, the /16 gone."""
        chosen = self.plan.vm(vm)
        guest.restore_routes(chosen, runner=self.runner, inside=self._inside(chosen))

    def remove_host_route(self, vm: str) -> None:
        """A guest whose DHCP client ignored option 121: its 169.254.169.254/32 is gone."""
        chosen = self.plan.vm(vm)
        guest.remove_host_route(chosen, runner=self.runner, inside=self._inside(chosen))

    def unregister(self, vm: str) -> None:
        """Delete VM ``vm``'s instance from the lab's registry (serve then answers it 404)."""
        seed.unregister(self.plan, self.plan.vm(vm))

    def register(self, vm: str) -> None:
        """Put VM ``vm``'s instance back as ``lab up`` made it."""
        seed.register(self.plan, self.plan.vm(vm))

    # -- lab break / lab heal --------------------------------------------------------------------

    @property
    def faults(self) -> tuple[FaultRecord, ...]:
        return self.ledger.state.faults

    def break_fault(self, name: str, vm: str | None = None) -> FaultRecord:
        """``lab break NAME [VM]``: inflict fault ``name`` and record it (:func:`faults.break_fault`)."""
        self._refresh()
        return lf.break_fault(self, name, vm)

    def heal(self, vm: str | None = None, *, everything: bool = False) -> tuple[FaultRecord, ...]:
        """``lab heal [VM] [--all]``: undo recorded faults, last first (:func:`faults.heal`)."""
        self._refresh()
        return lf.heal(self, vm, everything=everything)

    # -- doctor command lines --------------------------------------------------------------------

    def doctor_argv(self, vm: str, *extra: str, files_root: Path | None = None) -> list[str]:
        """``meta169 doctor`` inside VM ``vm``, with its lease and an empty ``--files-root``."""
        return guest_doctor_argv(self.plan, vm, *extra, files_root=files_root)

    def host_doctor_argv(self, vm: str | None = None, *extra: str) -> list[str]:
        """``meta169 doctor --host`` for this lab only; with ``vm``, that VM as the caller."""
        return host_doctor_argv(self.plan, self._supervisor.tcp(), vm, *extra)

    def prepare_guest_root(self) -> Path:
        """Create the empty directory :meth:`doctor_argv` points ``--files-root`` at."""
        return prepare_guest_root(self.plan)

    def _refresh(self) -> None:
        # Adopt what another process (``meta169 lab break``/``heal``) recorded since.
        if self.ledger.reload():
            self._supervisor.forget_replaced()
