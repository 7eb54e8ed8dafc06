"""Host-side diagnosis: router and DHCP namespaces, the proxy, ``serve`` and the registry.

Pure. :class:`HostFacts` is what :mod:`meta169.doctor.host_collect` gathers (or a
test feeds from captured command output); :data:`CHECKS` is the table; :func:`analyse`
runs it and draws the path from the operator's side.

What "right" means comes from the code that builds the path, not from a second
copy of it: the router rules are :func:`meta169.plumbing.iptables.router_rules`
compared line by line through :func:`~meta169.plumbing.iptables.expected_lines`;
the proxy's listeners are its own listener file or flags; the secret check is a
request signed by :func:`meta169.http.stamp.sign`, which ``serve`` answers 403
"proxy signature mismatch" when the secrets differ.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from meta169.doctor.links import Link
from meta169.doctor.model import (
    HOPS,
    Check,
    Finding,
    Hit,
    HopId,
    HopState,
    HopStatus,
    Remedy,
    Report,
    check_table,
    evaluate,
    hop_state_from_findings,
)
from meta169.errors import ValidationError
from meta169.plumbing import iptables

# router: REDIRECT to the proxy on 9697; dhcp: dnsmasq, and the metadata address when the
# network is isolated; metadata: only the metadata address and its proxy (OVN's ovnmeta-).
Role: TypeAlias = Literal["router", "dhcp", "metadata"]
ROLES: tuple[Role, ...] = ("router", "dhcp", "metadata")
# How Neutron names them: qrouter-<router id>, qdhcp-<network id>, ovnmeta-<network id>
# [neutron agent/l3/namespaces.py, agent/linux/dhcp.py, agent/ovn/metadata/agent.py].
NEUTRON_PREFIXES: dict[str, Role] = {"qrouter-": "router", "qdhcp-": "dhcp", "ovnmeta-": "metadata"}
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
METADATA_V6 = ipaddress.IPv6Address("fe80::a9fe:a9fe")
WILDCARDS = frozenset((ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv6Address("::")))


@dataclass(frozen=True, slots=True)
class ExpectedListener:
    """A socket the proxy should hold in a namespace (from its listener file or flags)."""

    address: IPAddress
    port: int
    binding: str  # "router router-a" / "network net-b"

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port} ({self.binding})"


@dataclass(frozen=True, slots=True)
class ListenSocket:
    address: IPAddress
    port: int

    def serves(self, wanted: ExpectedListener) -> bool:
        if self.port != wanted.port:
            return False
        if self.address == wanted.address:
            return True
        return self.address in WILDCARDS and self.address.version == wanted.address.version


@dataclass(frozen=True, slots=True)
class Dnsmasq:
    """A dnsmasq process found in a namespace, with its config file's text."""

    pid: int
    conf_path: str
    conf: str | None


@dataclass(frozen=True, slots=True)
class NamespaceFacts:
    """What was seen inside one namespace; None means "could not be collected"."""

    name: str
    role: Role
    exists: bool = True
    iptables_save: str | None = None
    ip6tables_save: str | None = None
    links: tuple[Link, ...] | None = None
    listening: tuple[ListenSocket, ...] | None = None
    dnsmasq: tuple[Dnsmasq, ...] | None = None
    expected: tuple[ExpectedListener, ...] = ()
    errors: tuple[str, ...] = ()
    found_by: str = ""  # where discovery learnt of it ("" when named on the command line)
    proxy_pids: tuple[int, ...] = ()  # running meta169 proxies whose listeners name it

    def has_address(self, address: IPAddress) -> bool:
        return any(a.ip == address for link in self.links or () for a in link.addresses)


@dataclass(frozen=True, slots=True)
class ServerAnswer:
    """serve's answer to a request stamped (and, over TCP, signed) as the proxy would."""

    upstream: str
    caller: str
    signed: bool
    status: int | None = None
    body: str = ""
    error: str = ""  # a transport failure: nothing answered
    secret_file: str = ""

    @property
    def evidence(self) -> str:
        how = "signed with the proxy's secret" if self.signed else "stamped"
        if self.error:
            return f"GET /openstack to {self.upstream} ({how}, caller {self.caller}): {self.error}"
        body = " | ".join(self.body.splitlines())
        body = body if len(body) <= 60 else body[:57] + "..."
        return f"GET /openstack to {self.upstream} ({how}, caller {self.caller}): HTTP {self.status} '{body}'"


RegistryOutcome: TypeAlias = Literal["one", "unknown", "ambiguous", "error"]


@dataclass(frozen=True, slots=True)
class RegistryAnswer:
    caller: str
    outcome: RegistryOutcome
    detail: str = ""
    uuids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProxyProcess:
    pid: int
    argv: tuple[str, ...]
    upstreams: tuple[str, ...] = ()  # every --upstream, in order
    secret_file: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamPool:
    """One proxy's ``--upstream`` list: it fails over between them (:mod:`meta169.proxy.upstream`).

    ``found_by`` says which proxies use this list (a running one, the config file, a
    lab, the command line). An upstream in no pool (a serve's proxy listener) stands alone.
    """

    upstreams: tuple[str, ...]
    found_by: str = ""

    def __post_init__(self) -> None:
        if not self.upstreams or len(set(self.upstreams)) != len(self.upstreams):
            raise ValidationError(f"an upstream pool needs distinct upstreams, not {self.upstreams!r}")


@dataclass(frozen=True, slots=True)
class HostFacts:
    namespaces: tuple[NamespaceFacts, ...] = ()
    proxies: tuple[ProxyProcess, ...] | None = None  # None: processes not scanned
    servers: tuple[ServerAnswer, ...] = ()  # one per upstream checked
    registry: RegistryAnswer | None = None
    pools: tuple[UpstreamPool, ...] = ()  # which upstreams a proxy fails over between
    notes: tuple[str, ...] = ()
    discovered: tuple[str, ...] = ()  # what was checked, and where it was found
    searched: tuple[str, ...] = ()  # where discovery looked and found nothing ("no lab up under ...")

    @property
    def server(self) -> ServerAnswer | None:
        return self.servers[0] if self.servers else None


# --- parsers ------------------------------------------------------------------------------------


def _hex_addr(text: str) -> IPAddress:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    if len(raw) == 16:
        # Four host-order 32-bit words [linux net/ipv6/tcp_ipv6.c get_tcp6_sock].
        return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    raise ValidationError(f"{text!r} is not a /proc/net/tcp address")


def parse_proc_net_tcp(text: str) -> tuple[ListenSocket, ...]:
    """LISTEN sockets (state 0A) from ``/proc/net/tcp`` and/or ``/proc/net/tcp6`` text."""
    out = []
    for raw in text.splitlines():
        cols = raw.split()
        if len(cols) < 4 or not cols[0].endswith(":") or cols[3] != "0A":
            continue
        addr, _, port = cols[1].partition(":")
        out.append(ListenSocket(_hex_addr(addr), int(port, 16)))
    return tuple(out)


_ROUTE_OPTION_RE = re.compile(r"(?:option:classless-static-route|(?<=[=,])121|(?<=[=,])249),(.*)$")


def dnsmasq_metadata_routes(conf: str) -> tuple[tuple[str, str], ...]:
    """(line, next hop) for each option 121 or 249 line of a dnsmasq config pushing 169.254.169.254/32."""
    out = []
    for raw in conf.splitlines():
        line = raw.strip()
        if not line.startswith(("dhcp-option=", "dhcp-option-force=")):
            continue
        match = _ROUTE_OPTION_RE.search(line)
        if match is None:
            continue
        parts = [p.strip() for p in match.group(1).split(",")]
        for dest, hop in zip(parts[::2], parts[1::2], strict=False):
            if dest == "169.254.169.254/32":
                out.append((line, hop))
    return tuple(out)


def dnsmasq_interface(conf: str) -> str:
    match = re.search(r"^interface=(\S+)", conf, re.MULTILINE)
    return match.group(1) if match else ""


# --- router rules -----------------------------------------------------------------------------------

_REDIRECT_RE = re.compile(
    r"-d (?:169\.254\.169\.254/32|fe80::a9fe:a9fe/128) .*--dport 80 .*-j REDIRECT --to-ports (\d+)"
)


@dataclass(frozen=True, slots=True)
class RuleAudit:
    """How a namespace's iptables-save compares with the rule set it should carry."""

    family: int
    redirect_lines: tuple[str, ...]  # any REDIRECT of the metadata address, ours or neutron's
    ours_present: bool  # our chains exist
    missing: tuple[tuple[str, str], ...]  # (table, line) expected but absent
    ruleset: iptables.RuleSet | None
    proxy_port: int
    chains_present: frozenset[tuple[str, str]] = frozenset()


def _internal_interfaces(ns: NamespaceFacts, saved: dict[str, iptables.SavedTable]) -> list[str]:
    """The router's guest-facing legs: from our rules if any, else neutron's qr-, else every leg."""
    found: list[str] = []
    for table in saved.values():
        for line in table.rules:
            match = re.search(r"-d (?:169\.254\.169\.254/32|fe80::a9fe:a9fe/128) -i (\S+)", line)
            if match and match.group(1) not in found:
                found.append(match.group(1))
    if found:
        return found
    names = [link.name for link in ns.links or () if not link.is_loopback]
    qr = [n for n in names if n.startswith("qr-")]
    return qr or [n for n in names if not n.startswith("qg-")]


def audit_rules(ns: NamespaceFacts, family: int, proxy_port: int) -> RuleAudit | None:
    text = ns.iptables_save if family == 4 else ns.ip6tables_save
    if text is None:
        return None
    saved = iptables.parse_save(text)
    redirects = tuple(line for t in saved.values() for line in t.rules if _REDIRECT_RE.search(line))
    ours = any(c.startswith(iptables.DEFAULT_CHAIN_PREFIX + "-") for t in saved.values() for c in t.chains)
    ports = {int(m.group(1)) for line in redirects if (m := _REDIRECT_RE.search(line))}
    port = next(iter(ports)) if len(ports) == 1 else proxy_port
    ifaces = _internal_interfaces(ns, saved)
    ruleset = iptables.router_rules(ifaces, family=4 if family == 4 else 6, proxy_port=port) if ifaces else None
    missing: list[tuple[str, str]] = []
    if ruleset is not None:
        for table, lines in iptables.expected_lines(ruleset).items():
            present = set(saved[table].rules) if table in saved else set()
            missing += [(table, line) for line in lines if line not in present]
    chains = frozenset((name, chain) for name, table in saved.items() for chain in table.chains)
    return RuleAudit(family, redirects, ours, tuple(missing), ruleset, port, chains)


def repair_commands(ns: str, audit: RuleAudit) -> tuple[Remedy, ...]:
    """Commands adding the missing chains, rules and jumps: rules first, so no jump reaches a half-built chain."""
    if audit.ruleset is None:
        return ()
    tool = "iptables" if audit.family == 4 else "ip6tables"
    missing = set(audit.missing)
    out: list[Remedy] = []

    def cmd(*args: str) -> Remedy:
        argv = ("ip", "netns", "exec", ns, tool, "-w", *args)
        return Remedy("host", " ".join(argv), argv)

    for table, chain in audit.ruleset.chains:
        if (table, chain) not in audit.chains_present:
            out.append(cmd("-t", table, "-N", chain))
        for rule in audit.ruleset.rules_in(table, chain):
            if (table, rule.save_line()) in missing:
                out.append(cmd("-t", table, "-A", chain, *rule.args))
    for jump in audit.ruleset.jumps:
        if (jump.table, jump.save_line()) in missing:
            out.append(cmd("-t", jump.table, "-I", jump.builtin, "1", "-j", jump.target))
    return tuple(out)


# --- checks ---------------------------------------------------------------------------------------------


def _expects_v6(ns: NamespaceFacts) -> bool:
    return any(e.address.version == 6 for e in ns.expected)


def ns_has_v4_redirect(ns: NamespaceFacts) -> bool:
    audit = audit_rules(ns, 4, _router_port(ns))
    return audit is not None and bool(audit.redirect_lines)


def _router_port(ns: NamespaceFacts) -> int:
    ports = [e.port for e in ns.expected if e.address in WILDCARDS or e.address.version == 4]
    return ports[0] if ports else iptables.DEFAULT_PROXY_PORT


def _isolated(ns: NamespaceFacts) -> bool:
    """A namespace that serves metadata itself: an isolated network's DHCP namespace, or OVN's."""
    if ns.role == "metadata":
        return True
    if any(e.address in (METADATA_V4, METADATA_V6) for e in ns.expected):
        return True
    for proc in ns.dnsmasq or ():
        for _, hop in dnsmasq_metadata_routes(proc.conf or ""):
            try:
                if ns.has_address(ipaddress.ip_address(hop)):
                    return True
            except ValueError:
                continue
    return False


def check_netns_missing(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        if not ns.exists:
            yield Hit(f"namespace {ns.name} ({ns.role}) does not exist", (f"ip netns list has no {ns.name}",),
                      (Remedy("host", "recreate the router/network (or the lab: meta169 lab up)"),))  # fmt: skip


def check_no_redirect_rule(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        if not ns.exists or ns.role != "router":
            continue
        audit = audit_rules(ns, 4, _router_port(ns))
        if audit is None or audit.redirect_lines:
            continue
        ev = [f"iptables-save in {ns.name}: no nat rule REDIRECTs 169.254.169.254:80 to the proxy, so guests' "
              "packets to it are routed on instead of answered"]  # fmt: skip
        ev += [f"missing: -t {t} {line}" for t, line in audit.missing]
        fixes = repair_commands(ns.name, audit) or (
            Remedy("host", f"re-apply the router rules in {ns.name} (meta169.plumbing.iptables.apply with "
                           "router_rules([<the router's legs towards guests>]))"),)  # fmt: skip
        v6 = audit_rules(ns, 6, audit.proxy_port) if _expects_v6(ns) else None
        if v6 is not None and not v6.redirect_lines:
            # The proxy also serves fe80::a9fe:a9fe here: repair both families at once.
            ev.append("ip6tables-save: no REDIRECT for fe80::a9fe:a9fe either")
            fixes += repair_commands(ns.name, v6)
        yield Hit(f"router namespace {ns.name} does not REDIRECT 169.254.169.254:80 to the proxy on port "
                  f"{audit.proxy_port}", tuple(ev), fixes)  # fmt: skip


def check_redirect_rules_incomplete(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        if not ns.exists or ns.role != "router":
            continue
        for family in (4, 6):
            audit = audit_rules(ns, family, _router_port(ns))
            if audit is None or not audit.missing:
                continue
            if family == 4 and not audit.redirect_lines:
                continue  # no-redirect-rule reports it
            if family == 6 and not audit.redirect_lines and not (audit.ours_present or _expects_v6(ns)):
                continue  # no IPv6 metadata on this router
            if family == 6 and not audit.redirect_lines and not ns_has_v4_redirect(ns):
                continue  # no-redirect-rule reports both families
            lines = {line for _, line in audit.missing}
            mark_or_accept = any("MARK" in x or "-j ACCEPT" in x for x in lines)
            drop_kept = ns.iptables_save is not None and f"--dport {audit.proxy_port} -j DROP" in (
                ns.iptables_save if family == 4 else ns.ip6tables_save or "")  # fmt: skip
            jump_missing = any(line.startswith("-A PREROUTING") for line in lines)
            breaks = (mark_or_accept and drop_kept) or jump_missing
            if family == 6 and not audit.redirect_lines:
                why, breaks = "the IPv6 metadata address fe80::a9fe:a9fe is not redirected (IPv4 is)", False
            elif mark_or_accept and drop_kept:
                why = "redirected packets are not marked or accepted, and the DROP on the proxy port throws them away"
            elif jump_missing:
                why = "a built-in chain no longer jumps to our chain"
            else:
                why = "the proxy port is reachable without the redirect (no DROP), or marked packets may be forwarded"
            yield Hit(f"{'ip6tables' if family == 6 else 'iptables'} metadata rules in {ns.name} are incomplete: "
                      + why, tuple(f"missing: -t {t} {line}" for t, line in audit.missing),
                      repair_commands(ns.name, audit), None if breaks else "warning")  # fmt: skip


def check_isolated_address_missing(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        if not ns.exists or ns.role == "router" or ns.links is None or not _isolated(ns):
            continue
        if ns.has_address(METADATA_V4):
            continue
        iface = next((dnsmasq_interface(p.conf or "") for p in ns.dnsmasq or () if p.conf), "") or "<dhcp port>"
        argv = ("ip", "-n", ns.name, "addr", "add", "169.254.169.254/32", "dev", iface)
        kind = "isolated DHCP namespace" if ns.role == "dhcp" else "metadata namespace"
        yield Hit(f"{kind} {ns.name} does not hold 169.254.169.254: guests' /32 route points at "
                  "its port, which does not answer for the address",
                  (f"ip -n {ns.name} addr: " + "; ".join(f"{ln.name} {' '.join(str(a) for a in ln.addresses)}"
                                                          for ln in ns.links if not ln.is_loopback),),
                  (Remedy("host", " ".join(argv), argv),))  # fmt: skip


def neutron_id(name: str) -> str:
    """The router or network id in a Neutron namespace name; "" for other names."""
    for prefix in NEUTRON_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return ""


def _wanted(ns: NamespaceFacts) -> tuple[ExpectedListener, ...]:
    if ns.expected:
        return ns.expected
    if ns.role == "router":
        if not ns_has_v4_redirect(ns):
            return ()  # no-redirect-rule reports a router that sends nothing to a proxy
        return (ExpectedListener(ipaddress.IPv4Address("0.0.0.0"), _router_port(ns), "router (by the REDIRECT)"),)
    if _isolated(ns):
        return (ExpectedListener(METADATA_V4, 80, "isolated network"),)
    return ()


def check_proxy_not_listening(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        if not ns.exists or ns.listening is None:
            continue
        missing = [w for w in _wanted(ns) if not any(s.serves(w) for s in ns.listening)]
        if not missing:
            continue
        ports = sorted({f"{s.address}:{s.port}" for s in ns.listening})
        ev = [f"expected in {ns.name}: {w}" for w in missing]
        ev.append(f"listening in {ns.name}: {', '.join(ports) if ports else 'nothing'}")
        if h.proxies is not None:
            ev.append("meta169 proxy processes: " + (", ".join(f"pid {p.pid}" for p in h.proxies) or "none"))
        if ns.found_by:
            ev.append(f"{ns.name} found by: {ns.found_by}")
        yield Hit(f"nothing listens for the proxy in {ns.name}: guests' connections are refused", tuple(ev),
                  _listener_fix(h, ns, missing[0]))  # fmt: skip


def _listener_fix(h: HostFacts, ns: NamespaceFacts, wanted: ExpectedListener) -> tuple[Remedy, ...]:
    if ns.expected and ns.proxy_pids:
        pids = ", ".join(map(str, ns.proxy_pids))
        return (Remedy("host", f"meta169 proxy (pid {pids}) runs and its listeners name {ns.name} but it holds no "
                               "socket there: read its log (a listener it could not open is logged at every "
                               "reconcile: the namespace or address missing, the port taken), fix that, and it "
                               "opens the socket at its next reconcile"),)  # fmt: skip
    if ns.expected:
        # A listener file or flag asks for this socket: the proxy is down or could not open it.
        return (Remedy("host", "start meta169 proxy (meta169 proxy --upstream unix:PATH --listeners FILE) or read "
                               "its log: a listener it could not open is logged at every reconcile"),)  # fmt: skip
    # Nobody asked for it: the namespace is known by its REDIRECT or its metadata address only.
    ident = neutron_id(ns.name) or ("<router id>" if ns.role == "router" else "<network id>")
    kind = "router" if ns.role == "router" else "network"
    host = f"[{wanted.address}]" if wanted.address.version == 6 else str(wanted.address)
    entry = f'{{"netns": "{ns.name}", "address": "{wanted.address}", "port": {wanted.port}, "{kind}": "{ident}"}}'
    running = ", ".join(f"pid {p.pid}" for p in h.proxies or ())
    upstream = next((s.upstream for s in h.servers if not s.error), "unix:/run/meta169/serve.sock")
    out = [Remedy("host", f"give meta169 proxy a listener in {ns.name}: add {entry} to its --listeners file "
                          f"(re-read every second){f'; running: {running}' if running else ''}")]  # fmt: skip
    argv = ("meta169", "proxy", "--upstream", upstream, "--listen", f"{ns.name}/{host}:{wanted.port}={kind}:{ident}")
    out.append(Remedy("host", "or run one for it: " + " ".join(argv)))
    return tuple(out)


def _pools_of(h: HostFacts, upstream: str) -> tuple[UpstreamPool, ...]:
    """The proxies' upstream lists holding ``upstream``; alone when no proxy is known to list it."""
    return tuple(p for p in h.pools if upstream in p.upstreams) or (UpstreamPool((upstream,)),)


def _answering(h: HostFacts) -> frozenset[str]:
    # Any HTTP answer counts: the proxy's health check marks such a node up too.
    return frozenset(s.upstream for s in h.servers if not s.error)


def check_server_unreachable(h: HostFacts) -> Iterator[Hit]:
    answering = _answering(h)
    for s in h.servers:
        if not s.error:
            continue
        dead = [p for p in _pools_of(h, s.upstream) if answering.isdisjoint(p.upstreams)]
        if not dead:
            continue  # every proxy listing it fails over to one that answers: upstream-degraded
        others = list(dict.fromkeys(u for p in dead for u in p.upstreams if u != s.upstream))
        also = f", nor at the proxy's other upstreams ({', '.join(others)})" if others else ""
        yield Hit(f"meta169 serve does not answer at {s.upstream}{also}: the proxy answers guests 502",
                  (s.evidence, *(f"upstreams of the proxy ({p.found_by}): {', '.join(p.upstreams)}" for p in dead
                                 if len(p.upstreams) > 1 and p.found_by)),
                  (Remedy("host", f"start meta169 serve with a proxy listener there (serve --listen "
                                  f"{s.upstream}=proxy ...), or fix the proxy's --upstream"),))  # fmt: skip


def check_upstream_degraded(h: HostFacts) -> Iterator[Hit]:
    """Some of a proxy's upstreams down, one at least answering: guests are served, redundancy is lost."""
    answering = _answering(h)
    down = {s.upstream: s for s in h.servers if s.error}
    for pool in h.pools:
        lost = [u for u in pool.upstreams if u in down]
        up = [u for u in pool.upstreams if u in answering]
        if not lost or not up:
            continue
        whose = f" ({pool.found_by})" if pool.found_by else ""
        yield Hit(f"meta169 serve does not answer at {', '.join(lost)}: the proxy fails over to {', '.join(up)}, "
                  f"so guests are served, but {len(lost)} of its {len(pool.upstreams)} upstreams are lost",
                  (*(down[u].evidence for u in lost), f"upstreams of the proxy{whose}: {', '.join(pool.upstreams)}"),
                  tuple(Remedy("host", f"start meta169 serve with a proxy listener at {u} (serve --listen {u}=proxy "
                                       "...), or remove it from the proxy's --upstream") for u in lost),
                  "warning")  # fmt: skip


def check_secret_mismatch(h: HostFacts) -> Iterator[Hit]:
    for s in h.servers:
        if s.status != 403 or "signature mismatch" not in s.body:
            continue
        where = f" in {s.secret_file}" if s.secret_file else ""
        yield Hit("serve rejects the proxy's HMAC: the proxy's secret differs from serve's --proxy-secret-file",
                  (s.evidence, f"the request was signed with the proxy's secret{where}"),
                  (Remedy("host", "give meta169 proxy --secret-file and meta169 serve --proxy-secret-file the same "
                                  "secret file (mode 0600), then restart both"),))  # fmt: skip


def check_signature_rejected(h: HostFacts) -> Iterator[Hit]:
    for s in h.servers:
        # Unsigned (no secret given), "signature missing" only proves serve is there.
        if not (s.signed and s.status == 403 and "signature" in s.body and "mismatch" not in s.body):
            continue
        hint = " (clocks of proxy and serve differ by more than 30 s?)" if "window" in s.body else ""
        yield Hit(f"serve rejects the proxy's signature: {s.body.strip()}{hint}", (s.evidence,),
                  (Remedy("host", "synchronise the clocks (chrony/ntp) of the proxy and serve hosts"),))  # fmt: skip


def check_upstream_not_proxy(h: HostFacts) -> Iterator[Hit]:
    for s in h.servers:
        if s.status != 403 or "trusted proxy" not in s.body:
            continue
        yield Hit(f"{s.upstream} is a serve listener bound to a network or router, not to the proxy: it refuses "
                  "the proxy's identity headers", (s.evidence,),
                  (Remedy("host", f"serve --listen {s.upstream}=proxy"),))  # fmt: skip


def check_registry_unavailable(h: HostFacts) -> Iterator[Hit]:
    ev = [s.evidence for s in h.servers if s.status == 503]
    if h.registry is not None and h.registry.outcome == "error":
        ev.append(f"registry lookup of {h.registry.caller}: {h.registry.detail}")
    if ev:
        yield Hit("the registry cannot be read: serve answers 503", tuple(ev),
                  (Remedy("host", "check the database behind --registry (file permissions, PostgreSQL)"),))  # fmt: skip


def check_unknown_instance(h: HostFacts) -> Iterator[Hit]:
    r = h.registry
    if r is not None and r.outcome == "unknown":
        yield Hit(f"the registry has no instance for {r.caller}: serve answers that guest 404", (r.detail,),
                  (Remedy("host", "meta169 import <inventory> with the instance's port on that network "
                                  "(meta169 instance list shows what is registered)"),))  # fmt: skip
    elif r is None:
        for s in h.servers:
            if s.status == 404 and not s.caller.startswith("probe"):
                yield Hit(f"serve does not know {s.caller}", (s.evidence,),
                          (Remedy("host", "meta169 instance list; meta169 import <inventory>"),))  # fmt: skip


def check_ambiguous_instance(h: HostFacts) -> Iterator[Hit]:
    r = h.registry
    if r is not None and r.outcome == "ambiguous":
        yield Hit(f"several instances claim {r.caller}: serve refuses to guess and answers 404",
                  (r.detail, *(f"instance {u}" for u in r.uuids)),
                  (Remedy("host", "remove the stale instance: meta169 instance rm <uuid>"),))  # fmt: skip


def check_dnsmasq(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        if not ns.exists or ns.role != "dhcp" or ns.dnsmasq is None or ns.dnsmasq:
            continue
        yield Hit(f"no dnsmasq runs in {ns.name}: guests get no lease and no option 121", (f"ip netns pids {ns.name}: "
                  "no dnsmasq",), (Remedy("host", "restart the network's DHCP server"),))  # fmt: skip


def check_dnsmasq_metadata_route(h: HostFacts) -> Iterator[Hit]:
    for ns in h.namespaces:
        for proc in ns.dnsmasq or ():
            if proc.conf is None or dnsmasq_metadata_routes(proc.conf):
                continue
            options = [line for line in proc.conf.splitlines() if line.startswith("dhcp-option")]
            yield Hit(f"dnsmasq in {ns.name} pushes no 169.254.169.254/32 (option 121): guests rely on their "
                      "default route and lose metadata to any link-local /16",
                      (f"{proc.conf_path} (pid {proc.pid}):", *options[:10]),
                      (Remedy("host", "dhcp-option=tag:<subnet>,option:classless-static-route,169.254.169.254/32,"
                                      "<gateway or DHCP port>,0.0.0.0/0,<gateway> (and the same as option 249), "
                                      "then restart dnsmasq"),), "warning")  # fmt: skip


CHECKS: tuple[Check[HostFacts], ...] = check_table([
    Check("netns-missing", "next-hop", "error", "namespace missing", check_netns_missing),
    Check("dnsmasq-not-running", "route", "error", "dnsmasq not running", check_dnsmasq),
    Check("dnsmasq-no-metadata-route", "route", "warning", "dnsmasq without the metadata host route",
          check_dnsmasq_metadata_route),
    Check("isolated-address-missing", "next-hop", "error", "isolated namespace lacks 169.254.169.254",
          check_isolated_address_missing),
    Check("no-redirect-rule", "redirect", "error", "no REDIRECT for 169.254.169.254:80", check_no_redirect_rule),
    Check("redirect-rules-incomplete", "redirect", "error", "metadata iptables rules incomplete",
          check_redirect_rules_incomplete),
    Check("proxy-not-listening", "proxy", "error", "proxy not listening", check_proxy_not_listening),
    Check("server-unreachable", "server", "error", "serve unreachable", check_server_unreachable),
    Check("upstream-degraded", "server", "warning", "some of the proxy's upstreams unreachable",
          check_upstream_degraded),
    Check("secret-mismatch", "server", "error", "proxy secret rejected by serve", check_secret_mismatch),
    Check("signature-rejected", "server", "error", "proxy signature rejected", check_signature_rejected),
    Check("upstream-not-proxy", "server", "error", "upstream is not a proxy listener", check_upstream_not_proxy),
    Check("registry-unavailable", "registry", "error", "registry unavailable", check_registry_unavailable),
    Check("unknown-instance", "registry", "error", "no instance for the caller", check_unknown_instance),
    Check("ambiguous-instance", "registry", "error", "several instances for the caller", check_ambiguous_instance),
])  # fmt: skip


# --- path ------------------------------------------------------------------------------------------------


def host_path(h: HostFacts, findings: Sequence[Finding]) -> tuple[HopStatus, ...]:
    routers = [ns.name for ns in h.namespaces if ns.role == "router"]
    dhcps = [ns.name for ns in h.namespaces if ns.role == "dhcp"]
    metas = [ns.name for ns in h.namespaces if ns.role == "metadata"]
    base: dict[HopId, tuple[str, str, HopState]] = {
        "guest": ("guest", "run meta169 doctor inside the VM for this hop", "n/a"),
        "route": ("DHCP", f"dnsmasq in {', '.join(dhcps)}" if dhcps else "no DHCP namespace checked",
                  "ok" if dhcps else "unknown"),
        "next-hop": ("gateway", ", ".join(routers + dhcps + metas) or "no namespace checked",
                     "ok" if h.namespaces else "unknown"),
        "redirect": ("REDIRECT", f"rules in {', '.join(routers)}" if routers else "no router namespace checked",
                     "ok" if routers else "unknown"),
        "proxy": ("proxy", "listening" if any(ns.listening for ns in h.namespaces) else "not checked",
                  "ok" if any(ns.listening is not None for ns in h.namespaces) else "unknown"),
        "server": ("server", "; ".join(s.evidence for s in h.servers) or "not checked (give --upstream)",
                   "ok" if h.servers and not any(s.error for s in h.servers) else "unknown"),
        "registry": ("registry", f"{h.registry.caller}: {h.registry.detail}" if h.registry
                     else "not checked (give --network/--router and --ip)",
                     "ok" if h.registry is not None and h.registry.outcome == "one" else "unknown"),
    }  # fmt: skip
    out = []
    for hop in HOPS:
        label, detail, state = base[hop]
        found = hop_state_from_findings(findings, hop)
        if found is not None:
            state = found
            detail = next(f.summary for f in findings if f.hop == hop)
        out.append(HopStatus(hop, label, state, detail))
    return tuple(out)


def analyse(h: HostFacts, *, source: str = "live") -> Report:
    findings = evaluate(CHECKS, h)
    notes = list(h.notes)
    for ns in h.namespaces:
        notes += [f"{ns.name}: {e}" for e in ns.errors]
    notes += h.searched
    return Report("host", source, host_path(h, findings), findings, tuple(notes), h.discovered)
