"""Router-mode metadata rules for iptables and ip6tables, as data, text and commands.

Owns the rule sets that make a router namespace hand 169.254.169.254:80 to the
proxy [openstack/neutron agent/metadata/driver.py ``metadata_nat_rules``,
``metadata_filter_rules``; agent/l3/router_info.py ``initialize_metadata_iptables``]:

- nat PREROUTING: REDIRECT the metadata address, port 80, arriving on an internal
  interface, to the proxy port (9697);
- mangle PREROUTING: the same match sets mark 0x1/0xffff;
- filter INPUT: accept marked packets, then drop anything else aimed at the
  proxy port, so the proxy is reachable only through the redirect;
- filter FORWARD: marked packets are dropped, never routed onwards (neutron puts
  this in its ``scope`` chain, which FORWARD jumps to).

Every rule lives in a chain of ours (``meta169-PREROUTING`` ...); the built-in chain
gets a single jump to it. ``apply`` and ``remove`` therefore never touch a rule
they did not write. Rendering is pure; ``apply``/``remove`` run ``iptables-restore
--noflush`` inside the namespace (each ``*table ... COMMIT`` block is one atomic
transaction). Knows nothing of the proxy process or of DHCP.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from meta169.errors import CommandFailed, ValidationError
from meta169.plumbing import netns
from meta169.plumbing.command import Runner, run

Table: TypeAlias = Literal["nat", "mangle", "filter"]
Family: TypeAlias = Literal[4, 6]

TABLE_ORDER: tuple[Table, ...] = ("mangle", "nat", "filter")
DEFAULT_PROXY_PORT = 9697
DEFAULT_MARK = 0x1
# neutron_lib.constants.ROUTER_MARK_MASK: the low 16 bits carry the metadata mark.
DEFAULT_MASK = 0xFFFF
DEFAULT_CHAIN_PREFIX = "meta169"
METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
METADATA_V6 = ipaddress.IPv6Address("fe80::a9fe:a9fe")

BUILTIN_CHAINS: Mapping[Table, frozenset[str]] = {
    "nat": frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}),
    "mangle": frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}),
    "filter": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
}

# iptables allows 28 characters in a chain name (XT_EXTENSION_MAXNAMELEN 29 - NUL).
_CHAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,27}$")
# An interface match: a device name, optionally ending in iptables' '+' wildcard.
_IFACE_MATCH_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}\+?$|^\+$")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule appended to one of our chains; ``args`` as iptables-save prints them."""

    table: Table
    chain: str
    args: tuple[str, ...]

    def __post_init__(self) -> None:
        if any(not a or any(c.isspace() for c in a) for a in self.args):
            raise ValidationError(f"rule arguments must be non-empty and without whitespace: {self.args}")

    def save_line(self) -> str:
        """The line iptables-save prints for this rule."""
        return " ".join(("-A", self.chain, *self.args))


@dataclass(frozen=True, slots=True)
class Jump:
    """The one rule we put in a built-in chain: ``-j <our chain>``, inserted first."""

    table: Table
    builtin: str
    target: str

    def args(self) -> tuple[str, ...]:
        return ("-j", self.target)

    def save_line(self) -> str:
        return f"-A {self.builtin} -j {self.target}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Our chains, their rules and the jumps that reach them, for one IP family."""

    family: Family
    rules: tuple[Rule, ...]
    jumps: tuple[Jump, ...]
    chain_prefix: str = DEFAULT_CHAIN_PREFIX
    _chains: tuple[tuple[Table, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise ValidationError(f"IP family must be 4 or 6, not {self.family!r}")
        chains = [(j.table, j.target) for j in self.jumps]
        for j in self.jumps:
            if j.builtin not in BUILTIN_CHAINS[j.table]:
                raise ValidationError(f"{j.builtin} is not a built-in chain of table {j.table}")
            if not _CHAIN_RE.fullmatch(j.target) or not j.target.startswith(self.chain_prefix + "-"):
                raise ValidationError(f"chain {j.target!r} must be ours: {self.chain_prefix}-...")
        if len(set(chains)) != len(chains):
            raise ValidationError("a chain of ours is jumped to twice")
        for r in self.rules:
            if (r.table, r.chain) not in chains:
                raise ValidationError(f"rule in {r.table}/{r.chain}, which no jump reaches")
        object.__setattr__(self, "_chains", tuple(chains))

    @property
    def chains(self) -> tuple[tuple[Table, str], ...]:
        """(table, chain) for every chain of ours, in jump order."""
        return self._chains

    @property
    def tables(self) -> tuple[Table, ...]:
        present = {t for t, _ in self._chains}
        return tuple(t for t in TABLE_ORDER if t in present)

    def rules_in(self, table: Table, chain: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.table == table and r.chain == chain)


def _check_iface(name: str) -> str:
    if not _IFACE_MATCH_RE.fullmatch(name):
        raise ValidationError(f"interface match {name!r} is not a device name (optionally ending in '+')")
    return name


def router_rules(
    internal_interfaces: Sequence[str],
    *,
    family: Family = 4,
    proxy_port: int = DEFAULT_PROXY_PORT,
    mark: int = DEFAULT_MARK,
    mask: int = DEFAULT_MASK,
    chain_prefix: str = DEFAULT_CHAIN_PREFIX,
) -> RuleSet:
    """The router-mode rule set for ``family`` (IPv4: 169.254.169.254, IPv6: fe80::a9fe:a9fe).

    ``internal_interfaces`` are the router's legs towards guests (iptables '+'
    wildcards allowed, as neutron's ``qr-+``); the upstream leg must not be listed.
    """
    if not internal_interfaces:
        raise ValidationError("router rules need at least one internal interface")
    ifaces = [_check_iface(i) for i in internal_interfaces]
    if len(set(ifaces)) != len(ifaces):
        raise ValidationError(f"internal interfaces listed twice: {ifaces}")
    if not 1 <= proxy_port <= 65535:
        raise ValidationError(f"proxy port {proxy_port} outside 1..65535")
    if not (0 < mark <= 0xFFFFFFFF and 0 < mask <= 0xFFFFFFFF and mark & ~mask == 0):
        raise ValidationError(f"mark {mark:#x} must be non-zero and inside mask {mask:#x}")
    if not re.fullmatch(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,15}$", chain_prefix):
        raise ValidationError(f"chain prefix {chain_prefix!r} must be 1-16 of [A-Za-z0-9_.]")

    dest = f"{METADATA_V4}/32" if family == 4 else f"{METADATA_V6}/128"
    mark_arg = f"{mark:#x}/{mask:#x}"
    pre, inp, fwd = (f"{chain_prefix}-{c}" for c in ("PREROUTING", "INPUT", "FORWARD"))

    def match(iface: str) -> tuple[str, ...]:
        # Same token order as neutron's rule strings, which is also iptables-save's.
        return ("-d", dest, "-i", iface, "-p", "tcp", "-m", "tcp", "--dport", "80")

    rules: list[Rule] = []
    for iface in ifaces:
        rules.append(Rule("mangle", pre, (*match(iface), "-j", "MARK", "--set-xmark", mark_arg)))
    for iface in ifaces:
        rules.append(Rule("nat", pre, (*match(iface), "-j", "REDIRECT", "--to-ports", str(proxy_port))))
    rules += [
        Rule("filter", inp, ("-m", "mark", "--mark", mark_arg, "-j", "ACCEPT")),
        Rule("filter", inp, ("-p", "tcp", "-m", "tcp", "--dport", str(proxy_port), "-j", "DROP")),
        Rule("filter", fwd, ("-m", "mark", "--mark", mark_arg, "-j", "DROP")),
    ]
    jumps = (
        Jump("mangle", "PREROUTING", pre),
        Jump("nat", "PREROUTING", pre),
        Jump("filter", "INPUT", inp),
        Jump("filter", "FORWARD", fwd),
    )
    return RuleSet(family=family, rules=tuple(rules), jumps=jumps, chain_prefix=chain_prefix)


# --- iptables-restore text (pure) ----------------------------------------------


def render_restore(ruleset: RuleSet) -> str:
    """``iptables-restore --noflush`` input that (re)creates and refills our chains.

    Declaring a chain creates it if missing; the explicit ``-F`` empties it if it
    already existed, so applying twice yields the same chains. Jumps are not part
    of this text: see :func:`render_jumps`.
    """
    out: list[str] = []
    for table in ruleset.tables:
        out.append(f"*{table}")
        ours = [c for t, c in ruleset.chains if t == table]
        out += [f":{c} - [0:0]" for c in ours]
        out += [f"-F {c}" for c in ours]
        out += [r.save_line() for c in ours for r in ruleset.rules_in(table, c)]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_jumps(jumps: Iterable[Jump]) -> str:
    """``iptables-restore --noflush`` input that inserts ``jumps`` first in their chains."""
    by_table: dict[Table, list[Jump]] = {}
    for j in jumps:
        by_table.setdefault(j.table, []).append(j)
    out: list[str] = []
    for table in TABLE_ORDER:
        if table in by_table:
            out.append(f"*{table}")
            out += [f"-I {j.builtin} 1 -j {j.target}" for j in by_table[table]]
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


@dataclass(frozen=True, slots=True)
class SavedTable:
    """One table of ``iptables-save`` output: declared chains and rule lines."""

    name: str
    chains: tuple[str, ...]
    rules: tuple[str, ...]


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse ``iptables-save`` output; comments, policies and counters are dropped."""
    tables: dict[str, SavedTable] = {}
    name: str | None = None
    chains: list[str] = []
    rules: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, rules = line[1:], [], []
        elif line == "COMMIT":
            if name is None:
                raise ValidationError("iptables-save output: COMMIT outside a table")
            tables[name] = SavedTable(name, tuple(chains), tuple(rules))
            name = None
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(line)
        else:
            raise ValidationError(f"iptables-save output: unexpected line {line!r}")
    if name is not None:
        raise ValidationError(f"iptables-save output: table {name} has no COMMIT")
    return tables


def render_removal(saved: Mapping[str, SavedTable], chain_prefix: str = DEFAULT_CHAIN_PREFIX) -> str:
    """``iptables-restore --noflush`` input deleting our jumps and chains, found in ``saved``.

    Works from what is there, not from a rule set, so it also cleans up after a
    rule set with other interfaces. Only bare ``-j <ours>`` jumps are deleted.
    """
    out: list[str] = []
    for table in TABLE_ORDER:
        if table not in saved:
            continue
        ours = [c for c in saved[table].chains if c.startswith(chain_prefix + "-")]
        if not ours:
            continue
        out.append(f"*{table}")
        for line in saved[table].rules:
            parts = line.split()
            if len(parts) == 4 and parts[2] == "-j" and parts[3] in ours and parts[1] not in ours:
                out.append(f"-D {parts[1]} -j {parts[3]}")
        out += [f"-F {c}" for c in ours]
        out += [f"-X {c}" for c in ours]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def expected_lines(ruleset: RuleSet) -> dict[Table, tuple[str, ...]]:
    """Per table, the ``iptables-save`` lines our rule set must produce, in its order.

    iptables-save prints built-in chains first, in kernel hook order, then user
    chains sorted by name; the doctor compares these lines with what it finds.
    """
    hook_order = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
    out: dict[Table, tuple[str, ...]] = {}
    for table in ruleset.tables:
        jumps = sorted((j for j in ruleset.jumps if j.table == table), key=lambda j: hook_order.index(j.builtin))
        chains = sorted(c for t, c in ruleset.chains if t == table)
        out[table] = tuple(
            [j.save_line() for j in jumps] + [r.save_line() for c in chains for r in ruleset.rules_in(table, c)]
        )
    return out


# --- commands (IO) ---------------------------------------------------------------


def _tool(family: Family, name: str) -> str:
    return name if family == 4 else name.replace("iptables", "ip6tables")


def _jump_present(ns: str, family: Family, jump: Jump, runner: Runner) -> bool:
    argv = netns.in_netns(ns, [_tool(family, "iptables"), "-w", "-t", jump.table, "-C", jump.builtin, *jump.args()])
    result = runner(argv, check=False)
    if result.returncode == 0:
        return True
    if result.returncode == 1:
        # "Bad rule (does a matching rule exist in that chain?)": missing.
        return False
    raise CommandFailed(argv, result.returncode, result.stderr)


def apply(ns: str, ruleset: RuleSet, *, runner: Runner = run) -> None:
    """Install ``ruleset`` in namespace ``ns``; idempotent, foreign rules untouched.

    First our chains are refilled (one atomic restore per table), then any missing
    jump is inserted, so a jump never points at a half-built chain.
    """
    netns.check_name(ns)
    restore = netns.in_netns(ns, [_tool(ruleset.family, "iptables-restore"), "-w", "--noflush"])
    runner(restore, input=render_restore(ruleset))
    missing = [j for j in ruleset.jumps if not _jump_present(ns, ruleset.family, j, runner)]
    if missing:
        runner(restore, input=render_jumps(missing))


def save(ns: str, family: Family = 4, *, runner: Runner = run) -> str:
    """``iptables-save`` (or ``ip6tables-save``) output of namespace ``ns``."""
    netns.check_name(ns)
    return runner(netns.in_netns(ns, [_tool(family, "iptables-save")])).stdout


def remove(ns: str, family: Family = 4, *, chain_prefix: str = DEFAULT_CHAIN_PREFIX, runner: Runner = run) -> None:
    """Delete our jumps and chains from namespace ``ns``; a no-op when none exist."""
    text = render_removal(parse_save(save(ns, family, runner=runner)), chain_prefix)
    if text:
        restore = netns.in_netns(ns, [_tool(family, "iptables-restore"), "-w", "--noflush"])
        runner(restore, input=text)
