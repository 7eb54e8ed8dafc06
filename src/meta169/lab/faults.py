"""``lab break`` and ``lab heal``: the common faults of the metadata path, as a table.

Each :class:`Fault` row says what it breaks (one VM, a tenant's router or the whole
lab, and in which tenant modes it breaks anything), what it changes (so that two
faults never fight over one thing and heal knows what to put back), which finding
the guest doctor (inside an affected VM) and the host doctor report first, and how
to inflict and heal it through :class:`~meta169.lab.lab.Lab`'s seams.

The rows are the ways the metadata path commonly breaks in the field; ``zeroconf``
is the seed's own: a CentOS guest with ifup-eth's on-link 169.254.0.0/16 and
without the DHCP /32 (the README's "Lab faults" has the table with each doctor's
finding).

Choosing a fault's target, finding conflicts, and choosing what a heal undoes are
pure functions of the plan and the recorded faults. The IO shell at the bottom is
the actions, which only call Lab's seams, and :func:`break_fault` and :func:`heal`,
which record a fault in the lab's ledger before inflicting it and drop the record
before healing it. Knows nothing of the CLI.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from meta169.errors import ConfigError, LabError, ValidationError
from meta169.lab.names import DEFAULT_NAME
from meta169.lab.plan import LabPlan, Mode, VMPlan
from meta169.lab.state import FaultRecord, Ledger


class Lab(Protocol):
    """The seams a fault acts through; :class:`meta169.lab.lab.Lab` provides them.

    A protocol, not an import of that class: the lab imports this table, not the
    other way round.
    """

    plan: LabPlan
    ledger: Ledger

    @property
    def name(self) -> str: ...
    @property
    def faults(self) -> tuple[FaultRecord, ...]: ...
    def await_metadata(self, vm: str, *, status: int = 200, timeout: float = ...) -> None: ...
    def add_zeroconf_route(self, vm: str, *, drop_host_route: bool = True) -> None: ...
    def remove_host_route(self, vm: str) -> None: ...
    def restore_routes(self, vm: str) -> None: ...
    def remove_router_rules(self, tenant: str = "a") -> None: ...
    def apply_router_rules(self, tenant: str = "a") -> None: ...
    def stop_proxy(self) -> None: ...
    def ensure_proxy(self) -> None: ...
    def stop_server(self) -> None: ...
    def ensure_server(self) -> None: ...
    def use_tcp_upstream(self, port: int, *, serve_secret: bytes, proxy_secret: bytes) -> None: ...
    def use_unix_upstream(self) -> None: ...
    def unregister(self, vm: str) -> None: ...
    def register(self, vm: str) -> None: ...


Scope: TypeAlias = Literal["vm", "router", "lab"]
# What a fault changes; qualified by its target ("routes:a1", "rules:a", "proxy").
Resource: TypeAlias = Literal["routes", "registry", "rules", "proxy", "serve"]

SCOPES: tuple[Scope, ...] = ("vm", "router", "lab")
MODES: tuple[Mode, ...] = ("router", "isolated")
Action: TypeAlias = Callable[[Lab, FaultRecord], None]


@dataclass(frozen=True, slots=True)
class Fault:
    """One row of :data:`FAULTS`.

    ``guest_finding``/``host_finding``: the id the guest doctor (run inside an
    affected VM) and the host doctor (given that VM as the caller) report first;
    None when that doctor cannot see the fault (a guest's route table is invisible
    to the host).
    """

    name: str
    scope: Scope
    modes: tuple[Mode, ...]
    summary: str
    touches: tuple[Resource, ...]
    guest_finding: str | None
    host_finding: str | None
    inflict: Action = field(repr=False, compare=False)
    heal: Action = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValidationError(f"fault {self.name}: unknown scope {self.scope!r}")
        if not self.modes or not set(self.modes) <= set(MODES):
            raise ValidationError(f"fault {self.name}: modes must be some of {', '.join(MODES)}")
        if not self.touches:
            raise ValidationError(f"fault {self.name}: it must change something")
        if self.guest_finding is None and self.host_finding is None:
            raise ValidationError(f"fault {self.name}: at least one doctor must see it")


# --- pure: targets, conflicts, what heal undoes -------------------------------------------------


def fault(name: str) -> Fault:
    """The row named ``name`` (ConfigError listing the known faults)."""
    for row in FAULTS:
        if row.name == name:
            return row
    raise ConfigError(f"unknown fault {name!r}; the lab knows: {', '.join(f.name for f in FAULTS)}")


def _known(record: FaultRecord) -> Fault | None:
    try:
        return fault(record.fault)
    except ConfigError:
        return None


def _vms_in(plan: LabPlan, modes: Sequence[Mode]) -> str:
    return ", ".join(v.name for v in plan.vms if v.mode in modes) or "none in this lab"


def target_of(plan: LabPlan, row: Fault, vm: str | None) -> str:
    """What ``lab break ROW VM`` breaks: the VM's name, its tenant's key, or "" (the lab).

    ConfigError when the fault needs a VM and none was given, or the VM's tenant mode
    is one where the fault breaks nothing (the seed's /16 is harmless where the DHCP
    port owns 169.254.169.254).
    """
    if vm is None:
        if row.scope == "vm":
            raise ConfigError(f"fault {row.name} breaks one VM: name it ({_vms_in(plan, row.modes)})")
        if row.scope == "router":
            routed = [t.key for t in plan.tenants if t.router_ns is not None]
            if len(routed) != 1:
                raise ConfigError(f"fault {row.name}: name a VM behind the router to break")
            return routed[0]
        return ""
    chosen = plan.vm(vm)
    if chosen.mode not in row.modes:
        raise ConfigError(
            f"fault {row.name} breaks only {' or '.join(row.modes)} VMs ({_vms_in(plan, row.modes)}); "
            f"in {chosen.mode} VM {vm} it breaks nothing"
        )
    if row.scope == "vm":
        return chosen.name
    if row.scope == "router":
        return chosen.tenant
    return ""


def claims(row: Fault, target: str) -> frozenset[str]:
    """What ``row`` changes when aimed at ``target``: "routes:a1", "rules:a", "proxy"."""
    return frozenset(f"{r}:{target}" if target else r for r in row.touches)


def conflict(active: Sequence[FaultRecord], row: Fault, target: str) -> FaultRecord | None:
    """The active fault that already changes something ``row`` would change (itself included)."""
    mine = claims(row, target)
    for record in active:
        other = _known(record)
        if record.key == (row.name, target) or (other is not None and mine & claims(other, record.target)):
            return record
    return None


def describe(record: FaultRecord) -> str:
    """``zeroconf on a1``, ``no-redirect on router a``, ``proxy-down``."""
    row = _known(record)
    if row is None or row.scope == "lab" or not record.target:
        return record.fault
    return f"{record.fault} on {'router ' if row.scope == 'router' else ''}{record.target}"


def heal_command(record: FaultRecord) -> str:
    """The command that heals ``record``: ``meta169 lab heal a1`` for a VM's fault, else without VM."""
    row = _known(record)
    return "meta169 lab heal" + (f" {record.target}" if row is not None and row.scope == "vm" else "")


def affects(plan: LabPlan, record: FaultRecord, vm: VMPlan) -> bool:
    """Whether ``record`` breaks ``vm``'s path to 169.254.169.254."""
    row = _known(record)
    if row is None or vm.mode not in row.modes:
        return False
    if row.scope == "vm":
        return record.target == vm.name
    if row.scope == "router":
        return record.target == vm.tenant
    return True


def affected(plan: LabPlan, record: FaultRecord) -> tuple[VMPlan, ...]:
    return tuple(vm for vm in plan.vms if affects(plan, record, vm))


def to_heal(
    plan: LabPlan, active: Sequence[FaultRecord], vm: str | None, *, everything: bool = False
) -> tuple[FaultRecord, ...]:
    """What ``lab heal [VM] [--all]`` undoes, last broken first.

    With a VM: every fault on that VM's path (its own, its router's, the lab's).
    Without: the faults not bound to one VM (router and lab-wide). ``everything``: all.
    """
    if everything:
        chosen = list(active)
    elif vm is not None:
        target = plan.vm(vm)
        chosen = [r for r in active if affects(plan, r, target) or r.target == vm]
    else:
        chosen = [r for r in active if (row := _known(r)) is None or row.scope != "vm"]
    return tuple(reversed(chosen))


def still_broken(plan: LabPlan, active: Sequence[FaultRecord], vms: Sequence[VMPlan]) -> tuple[VMPlan, ...]:
    """Those of ``vms`` that some fault in ``active`` still breaks."""
    return tuple(vm for vm in vms if any(affects(plan, r, vm) for r in active))


# --- the IO shell: lab break, lab heal, and each fault's actions (Lab seams only) -----------------


def break_fault(lab: Lab, name: str, vm: str | None = None) -> FaultRecord:
    """``lab break NAME [VM]``: inflict fault ``name`` and record it.

    ConfigError for an unknown fault or a VM it cannot break; LabError when
    something it would change is already broken, or when inflicting fails (what
    it had changed is then healed again).
    """
    ledger = lab.ledger
    if ledger.state.status != "up":
        raise LabError(f"lab {lab.name} is {ledger.state.status}, not up: nothing to break")
    row = fault(name)
    target = target_of(lab.plan, row, vm)
    busy = conflict(ledger.state.faults, row, target)
    if busy is not None:
        again = "is already active" if busy.key == (row.name, target) else "already changes what it would change"
        hint = heal_command(busy) + ("" if lab.name == DEFAULT_NAME else f" --name {lab.name}")
        raise LabError(f"fault {describe(busy)} {again}; heal it first: {hint}")
    record = FaultRecord(row.name, target, vm, time.time())
    # Recorded first: a break killed halfway is still known to heal.
    ledger.update(ledger.state.with_fault(record))
    try:
        row.inflict(lab, record)
    except BaseException as exc:
        ledger.update(ledger.state.without_fault(record))
        problem = ""
        try:
            row.heal(lab, record)
        except Exception as undo:  # the original failure must still be reported
            problem = f"; undoing it failed too: {undo}"
        if not isinstance(exc, Exception):
            raise
        raise LabError(f"lab break {name}: {exc}{problem}") from exc
    return record


def heal(lab: Lab, vm: str | None = None, *, everything: bool = False) -> tuple[FaultRecord, ...]:
    """``lab heal [VM] [--all]``: undo recorded faults (see :func:`to_heal`), last first.

    Then waits until every VM they broke, and no other fault still breaks, gets
    its own instance id again (LabError when one does not). A no-op returning ()
    when nothing is broken.
    """
    ledger = lab.ledger
    chosen = to_heal(lab.plan, ledger.state.faults, vm, everything=everything)
    for record in chosen:
        ledger.update(ledger.state.without_fault(record))
        try:
            fault(record.fault).heal(lab, record)
        except BaseException:
            ledger.update(ledger.state.with_fault(record))  # still broken: heal can be retried
            raise
    touched = {v.name: v for r in chosen for v in affected(lab.plan, r)}
    broken = set(v.name for v in still_broken(lab.plan, ledger.state.faults, list(touched.values())))
    for name in touched:
        if name not in broken:
            lab.await_metadata(name)
    return chosen


def _zeroconf(lab: Lab, record: FaultRecord) -> None:
    lab.add_zeroconf_route(record.target, drop_host_route=True)


def _drop_host_route(lab: Lab, record: FaultRecord) -> None:
    lab.remove_host_route(record.target)


def _restore_routes(lab: Lab, record: FaultRecord) -> None:
    lab.restore_routes(record.target)


def _remove_rules(lab: Lab, record: FaultRecord) -> None:
    lab.remove_router_rules(record.target)


def _apply_rules(lab: Lab, record: FaultRecord) -> None:
    lab.apply_router_rules(record.target)


def _stop_proxy(lab: Lab, record: FaultRecord) -> None:
    lab.stop_proxy()


def _ensure_proxy(lab: Lab, record: FaultRecord) -> None:
    lab.ensure_proxy()


def _stop_server(lab: Lab, record: FaultRecord) -> None:
    lab.stop_server()


def _ensure_server(lab: Lab, record: FaultRecord) -> None:
    lab.ensure_server()


def _free_loopback_port() -> int:
    # The kernel picks a free port; serve binds it a moment later (a race another
    # program would have to win, and then serve's start fails loudly).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _mismatch_secrets(lab: Lab, record: FaultRecord) -> None:
    serve_secret = secrets.token_hex(32).encode()
    proxy_secret = secrets.token_hex(32).encode()
    lab.use_tcp_upstream(_free_loopback_port(), serve_secret=serve_secret, proxy_secret=proxy_secret)


def _unix_upstream(lab: Lab, record: FaultRecord) -> None:
    lab.use_unix_upstream()


def _unregister(lab: Lab, record: FaultRecord) -> None:
    lab.unregister(record.target)
    # serve notices registry changes by polling: wait until the guest sees the 404
    # (unless another fault already keeps it from reaching serve at all).
    others = [r for r in lab.faults if r.key != record.key]
    if not still_broken(lab.plan, others, [lab.plan.vm(record.target)]):
        lab.await_metadata(record.target, status=404)


def _register(lab: Lab, record: FaultRecord) -> None:
    lab.register(record.target)


def check_table(rows: Sequence[Fault]) -> tuple[Fault, ...]:
    """Unique names; ValidationError otherwise (the table is code: a bad row is a bug)."""
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValidationError(f"duplicate fault names: {sorted({n for n in names if names.count(n) > 1})}")
    return tuple(rows)


FAULTS: tuple[Fault, ...] = check_table((
    Fault(
        "zeroconf", "vm", ("router",),
        "the seed's guest: 169.254.0.0/16 dev eth0 scope link metric 1002 (CentOS ifup-eth's \"Add Zeroconf "
        "route\") and no 169.254.169.254/32 host route, so the guest ARPs for the address",
        ("routes",), "zeroconf-route", None, _zeroconf, _restore_routes,
    ),
    Fault(
        "no-host-route", "vm", ("isolated",),
        "the DHCP client ignored option 121: no 169.254.169.254/32 via the DHCP port, and an isolated network "
        "has no default route to fall back on",
        ("routes",), "no-metadata-route", None, _drop_host_route, _restore_routes,
    ),
    Fault(
        "no-redirect", "router", ("router",),
        "the router's REDIRECT/MARK/DROP rules for 169.254.169.254 and fe80::a9fe:a9fe are gone",
        ("rules",), "metadata-no-answer", "no-redirect-rule", _remove_rules, _apply_rules,
    ),
    Fault(
        "proxy-down", "lab", MODES, "meta169 proxy is stopped: nothing listens in the router or DHCP namespaces",
        ("proxy",), "metadata-refused", "proxy-not-listening", _stop_proxy, _ensure_proxy,
    ),
    Fault(
        "server-down", "lab", MODES, "meta169 serve is stopped: the proxy answers 502",
        ("serve",), "metadata-server-error", "server-unreachable", _stop_server, _ensure_server,
    ),
    Fault(
        "secret-mismatch", "lab", MODES,
        "the proxy talks to serve over loopback TCP with HMAC, signing with a secret other than serve's "
        "--proxy-secret-file",
        ("proxy", "serve"), "metadata-forbidden", "secret-mismatch", _mismatch_secrets, _unix_upstream,
    ),
    Fault(
        "unknown-instance", "vm", MODES, "the VM's instance is gone from the registry: serve answers it 404",
        ("registry",), "metadata-not-found", "unknown-instance", _unregister, _register,
    ),
))  # fmt: skip
