"""``lab break`` and ``lab heal``: the common faults of the metadata path, as a table.

Each :class:`Fault` row says what it breaks (one VM, a tenant's router or the whole
lab, and in which tenant modes it breaks anything), what it changes (so that two
faults never fight over one thing and heal knows what to put back), which finding
the guest doctor (inside an affected VM) and the host doctor report first, and how
to inflict and heal it through :class:`~meta169.lab.lab.Lab`'s seams.

Choosing a fault's target, finding conflicts, and choosing what a heal undoes are
pure functions of the plan and the recorded faults. The actions at the bottom are
the IO shell; they only call Lab methods. Knows nothing of the CLI.

[issue 4 "Lab faults"; BRIEF section 4 for the faults, section 1 for the seed's]
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

from meta169.errors import ConfigError, ValidationError
from meta169.lab.plan import LabPlan, Mode, VMPlan
from meta169.lab.state import FaultRecord

if TYPE_CHECKING:
    from meta169.lab.lab import Lab

Scope: TypeAlias = Literal["vm", "router", "lab"]
# What a fault changes; qualified by its target ("routes:a1", "rules:a", "proxy").
Resource: TypeAlias = Literal["routes", "registry", "rules", "proxy", "serve"]

SCOPES: tuple[Scope, ...] = ("vm", "router", "lab")
MODES: tuple[Mode, ...] = ("router", "isolated")
Action: TypeAlias = Callable[["Lab", FaultRecord], None]


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


# --- the IO shell: each action calls Lab seams only ---------------------------------------------------


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
