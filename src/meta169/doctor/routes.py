"""Route tables and policy rules as data, from every format a support bundle may hold,
and the route the kernel picks for 169.254.169.254.

Pure. Formats: ``ip -j route`` and ``ip route`` text (iproute2, also BusyBox and
the old CentOS 6 spacing), ``/proc/net/route`` (hex, little-endian on the
machines we meet; RTF_* flags from <linux/route.h>), Windows ``route print``;
``ip -j rule`` and ``ip rule`` text.

Selection (:func:`select_route`) follows the kernel's FIB lookup for a locally
generated packet with no source bound yet [linux net/ipv4/fib_rules.c,
fib_trie.c]: rules by priority (default: local 0, main 32766, default 32767);
within a table the longest matching prefix wins, then the lowest metric.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from meta169.errors import ValidationError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")

# Route types that deliver nothing [rtnetlink(7) RTN_*].
REJECT_TYPES = frozenset(("unreachable", "prohibit", "blackhole", "throw"))
_TYPES = frozenset(("unicast", "local", "broadcast", "multicast", "anycast", "nat", *REJECT_TYPES))
_FLAG_WORDS = frozenset(("linkdown", "onlink", "dead", "pervasive", "offload", "trap", "rt_offload", "notify"))
# "ip route" keywords followed by one value we do not need.
_SKIP_ONE = frozenset(("mtu", "advmss", "rtt", "rttvar", "window", "cwnd", "initcwnd", "initrwnd", "realms",
                       "expires", "pref", "hoplimit", "weight", "features", "quickack", "congctl", "fastopen_no_cookie",
                       "ssthresh", "reordering", "rto_min", "tos", "dsfield", "nhid", "from", "encap", "ttl-propagate",
                       "error", "uid"))  # fmt: skip

# /proc/net/route flags [linux/route.h]
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
RTF_REJECT = 0x0200


@dataclass(frozen=True, slots=True)
class Route:
    """One route. ``text`` is the line as the source printed it (the evidence)."""

    destination: IPNetwork
    dev: str = ""
    gateway: IPAddress | None = None
    metric: int = 0
    table: str = "main"
    type: str = "unicast"
    scope: str = ""
    protocol: str = ""
    prefsrc: IPAddress | None = None
    flags: tuple[str, ...] = ()
    text: str = ""

    def __post_init__(self) -> None:
        if self.gateway is not None and self.gateway.version != self.destination.version:
            raise ValidationError(f"route {self.destination} via {self.gateway} mixes IP versions")
        if self.metric < 0:
            raise ValidationError(f"route {self.destination}: negative metric")

    @property
    def version(self) -> int:
        return self.destination.version

    @property
    def on_link(self) -> bool:
        """Delivered directly on ``dev`` (the guest ARPs for the destination itself)."""
        return self.type == "unicast" and self.gateway is None

    @property
    def is_default(self) -> bool:
        return self.destination.prefixlen == 0

    def render(self) -> str:
        """The route in ``ip route`` syntax, for routes that came from JSON or /proc."""
        parts: list[str] = []
        if self.type != "unicast":
            parts.append(self.type)
        parts.append("default" if self.is_default and self.type == "unicast" else _prefix(self.destination))
        if self.gateway is not None:
            parts += ["via", str(self.gateway)]
        if self.dev:
            parts += ["dev", self.dev]
        if self.table != "main":
            parts += ["table", self.table]
        if self.protocol:
            parts += ["proto", self.protocol]
        if self.scope and self.scope != "global":
            parts += ["scope", self.scope]
        if self.prefsrc is not None:
            parts += ["src", str(self.prefsrc)]
        if self.metric:
            parts += ["metric", str(self.metric)]
        parts += list(self.flags)
        return " ".join(parts)

    @property
    def evidence(self) -> str:
        """The source line, with the ``ip route`` rendering when the source is not that."""
        rendered = self.render()
        if not self.text:
            return rendered
        if _squash(self.text) == _squash(rendered):
            return self.text.strip()
        return f"{self.text.strip()}  (= {rendered})"


def _prefix(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _squash(text: str) -> str:
    return " ".join(text.split())


def _net(text: str, family: int | None) -> IPNetwork:
    if text == "default":
        return ipaddress.IPv6Network("::/0") if family == 6 else ipaddress.IPv4Network("0.0.0.0/0")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValidationError(f"{text!r} is not a route destination") from exc


def _ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError as exc:
        raise ValidationError(f"{text!r} is not an IP address") from exc


# --- ip -j route -----------------------------------------------------------------------


def _json_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text or "[]")
    except ValueError as exc:
        raise ValidationError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ValidationError(f"{what}: expected a JSON list of objects")
    return data


def parse_ip_route_json(text: str, family: int | None = None) -> tuple[Route, ...]:
    """Routes from ``ip -j route show [table all]``; ``family`` resolves ``default``."""
    out: list[Route] = []
    for item in _json_list(text, "ip -j route"):
        dst = str(item.get("dst", ""))
        if not dst:
            continue
        gateway_text = item.get("gateway")
        dev = str(item.get("dev", ""))
        nexthops = item.get("nexthops")
        if gateway_text is None and isinstance(nexthops, list) and nexthops:
            # Multipath: the kernel hashes flows over the next hops; the first stands for all.
            gateway_text = nexthops[0].get("gateway")
            dev = dev or str(nexthops[0].get("dev", ""))
        gateway = _ip(str(gateway_text)) if gateway_text else None
        fam = family or (gateway.version if gateway is not None else None)
        flags = tuple(str(f) for f in item.get("flags", ()) if str(f) in _FLAG_WORDS)
        out.append(
            Route(
                destination=_net(dst, fam),
                dev=dev,
                gateway=gateway,
                metric=int(item.get("metric", 0) or 0),
                table=str(item.get("table", "main")),
                type=str(item.get("type", "unicast")),
                scope=str(item.get("scope", "")),
                protocol=str(item.get("protocol", "")),
                prefsrc=_ip(str(item["prefsrc"])) if item.get("prefsrc") else None,
                flags=flags,
            )
        )
    return tuple(out)


# --- ip route (text) -------------------------------------------------------------------


def parse_ip_route_line(line: str, family: int | None = None) -> Route | None:
    """One line of ``ip route`` output; None for a continuation or blank line."""
    tokens = line.split()
    if not tokens or tokens[0] == "nexthop" or line[:1] in (" ", "\t"):
        return None
    rtype = "unicast"
    if tokens[0] in _TYPES:
        rtype = tokens.pop(0)
    if not tokens:
        raise ValidationError(f"ip route line without a destination: {line!r}")
    dst_text = tokens.pop(0)
    gateway: IPAddress | None = None
    dev = table = scope = protocol = ""
    metric = 0
    prefsrc: IPAddress | None = None
    flags: list[str] = []
    i = 0
    while i < len(tokens):
        word = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if word == "via":
            # "via inet6 fe80::1" names the family explicitly.
            if value in ("inet", "inet6") and i + 2 < len(tokens):
                i += 1
                value = tokens[i + 1]
            gateway = _ip(value)
            i += 2
        elif word == "dev":
            dev, i = value, i + 2
        elif word == "table":
            table, i = value, i + 2
        elif word == "scope":
            scope, i = value, i + 2
        elif word == "proto":
            protocol, i = value, i + 2
        elif word == "src":
            prefsrc, i = _ip(value), i + 2
        elif word in ("metric", "priority", "preference"):
            metric, i = int(value), i + 2
        elif word in _FLAG_WORDS:
            flags.append(word)
            i += 1
        elif word in _SKIP_ONE:
            i += 2
        else:
            i += 1  # unknown attribute: ignore rather than refuse a whole bundle
    fam = family or (gateway.version if gateway is not None else None)
    return Route(
        destination=_net(dst_text, fam),
        dev=dev,
        gateway=gateway,
        metric=metric,
        table=table or "main",
        type=rtype,
        scope=scope,
        protocol=protocol,
        prefsrc=prefsrc,
        flags=tuple(flags),
        text=line.rstrip(),
    )


def parse_ip_route_text(text: str, family: int | None = None) -> tuple[Route, ...]:
    """Routes from ``ip route show [table all]`` text.

    A multipath route's ``nexthop via ... dev ...`` continuation lines give the
    route its first next hop.
    """
    out: list[Route] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("nexthop") and out:
            hop = parse_ip_route_line("0.0.0.0/0 " + stripped.removeprefix("nexthop"), family)
            last = out[-1]
            usable = hop is not None and hop.gateway is not None and hop.gateway.version == last.version
            if usable and hop is not None and last.gateway is None:
                out[-1] = Route(
                    last.destination, hop.dev or last.dev, hop.gateway, last.metric, last.table, last.type,
                    last.scope, last.protocol, last.prefsrc, last.flags, last.text + " " + stripped,
                )  # fmt: skip
            continue
        route = parse_ip_route_line(raw, family)
        if route is not None:
            out.append(route)
    return tuple(out)


# --- /proc/net/route ----------------------------------------------------------------------


def _hex_ipv4(text: str) -> ipaddress.IPv4Address:
    # The kernel prints the __be32 as a host-order integer: little-endian hosts
    # (x86, arm64) show 169.254.0.0 as 0000FEA9.
    value = int(text, 16)
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))


def parse_proc_net_route(text: str) -> tuple[Route, ...]:
    """IPv4 main-table routes from ``/proc/net/route``."""
    out: list[Route] = []
    lines = text.splitlines()
    for raw in lines[1:] if lines and lines[0].split()[:1] == ["Iface"] else lines:
        cols = raw.split()
        if len(cols) < 8:
            continue
        try:
            iface, dest, gw, flags = cols[0], _hex_ipv4(cols[1]), _hex_ipv4(cols[2]), int(cols[3], 16)
            metric, mask = int(cols[6]), _hex_ipv4(cols[7])
            network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        except ValueError as exc:
            raise ValidationError(f"/proc/net/route: cannot parse {raw.strip()!r}: {exc}") from exc
        if not flags & RTF_UP:
            continue
        out.append(
            Route(
                destination=network,
                dev=iface,
                gateway=gw if flags & RTF_GATEWAY else None,
                metric=metric,
                type="unreachable" if flags & RTF_REJECT else "unicast",
                text="\t".join(cols),
            )
        )
    return tuple(out)


# --- Windows route print --------------------------------------------------------------------

_WIN_V4_RE = re.compile(r"^\s*(\d+\.\d+\.\d+\.\d+)\s+(\d+\.\d+\.\d+\.\d+)\s+(\S+)\s+(\d+\.\d+\.\d+\.\d+)\s+(\d+)\s*$")


def parse_route_print(text: str) -> tuple[Route, ...]:
    """IPv4 active routes from Windows ``route print``; ``dev`` is the interface address.

    The Metric column is already the route metric plus the interface metric, the
    sum Windows compares.
    """
    out: list[Route] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("IPv4 Route Table"):
            section = "v4"
        elif line.startswith("IPv6 Route Table"):
            section = "v6"
        elif line.startswith("Persistent Routes"):
            section = "persistent"
        if section != "v4":
            continue
        match = _WIN_V4_RE.match(raw)
        if match is None:
            continue
        dest, mask, gateway, iface, metric = match.groups()
        out.append(
            Route(
                destination=ipaddress.IPv4Network(f"{dest}/{mask}", strict=False),
                dev=iface,
                gateway=None if gateway.lower() == "on-link" else ipaddress.IPv4Address(gateway),
                metric=int(metric),
                text=line,
            )
        )
    return tuple(out)


# --- policy rules -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy routing rule (``ip rule``)."""

    priority: int
    table: str = ""
    action: str = "lookup"
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    iif: str = ""
    oif: str = ""
    fwmark: int | None = None
    fwmask: int = 0xFFFFFFFF
    invert: bool = False
    suppress_prefixlength: int | None = None
    unsupported: tuple[str, ...] = ()
    text: str = ""

    def matches(self, destination: IPAddress) -> bool:
        """Whether a locally generated, unmarked packet to ``destination`` matches.

        Such a packet has no source address yet (the route chooses it), arrives on
        ``lo`` as far as rules are concerned, and carries mark 0. A selector we do
        not model (uidrange, ports, ...) makes the rule not match.
        """
        if self.unsupported or self.oif or self.iif not in ("", "lo"):
            return False
        selected = (
            (self.src is None or self.src.prefixlen == 0)
            and (self.dst is None or (destination.version == self.dst.version and destination in self.dst))
            and (self.fwmark is None or (0 & self.fwmask) == self.fwmark)
        )
        return selected != self.invert

    @property
    def evidence(self) -> str:
        return self.text.strip() or f"{self.priority}: {self.action} {self.table}".strip()


DEFAULT_RULES = (
    Rule(0, "local", text="0:\tfrom all lookup local"),
    Rule(32766, "main", text="32766:\tfrom all lookup main"),
    Rule(32767, "default", text="32767:\tfrom all lookup default"),
)
_RULE_ACTIONS = frozenset(("unreachable", "prohibit", "blackhole", "nop", "goto"))


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def parse_ip_rule_json(text: str, family: int = 4) -> tuple[Rule, ...]:
    """Rules from ``ip -j rule``."""
    known = {
        "priority", "src", "srclen", "dst", "dstlen", "table", "action", "iif", "oif", "fwmark", "fwmask",
        "not", "suppress_prefixlen", "suppress_ifgroup", "l3mdev", "protocol", "flags", "target", "tos",
    }  # fmt: skip
    out: list[Rule] = []
    for item in _json_list(text, "ip -j rule"):
        src = dst = None
        if item.get("src") not in (None, "all"):
            src = _net(f"{item['src']}/{item.get('srclen', 32 if family == 4 else 128)}", family)
        if item.get("dst") not in (None, "all"):
            dst = _net(f"{item['dst']}/{item.get('dstlen', 32 if family == 4 else 128)}", family)
        fwmark = None
        fwmask = 0xFFFFFFFF
        if "fwmark" in item:
            fwmark, fwmask = _mark(str(item["fwmark"]))
            if "fwmask" in item:
                fwmask = int(str(item["fwmask"]), 0)
        action = str(item.get("action", "lookup"))
        table = str(item.get("table", ""))
        if action in ("to_tbl", "lookup") or table:
            action = "lookup"
        unsupported = tuple(sorted(set(item) - known))
        out.append(
            Rule(
                priority=int(item.get("priority", 0)),
                table=table,
                action=action,
                src=src,
                dst=dst,
                iif=str(item.get("iif", "")),
                oif=str(item.get("oif", "")),
                fwmark=fwmark,
                fwmask=fwmask,
                invert="not" in item,
                suppress_prefixlength=int(item["suppress_prefixlen"]) if "suppress_prefixlen" in item else None,
                unsupported=unsupported,
                text=json.dumps(item, separators=(",", ":")),
            )
        )
    return tuple(sorted(out, key=lambda r: r.priority))


def parse_ip_rule_text(text: str, family: int = 4) -> tuple[Rule, ...]:
    """Rules from ``ip rule`` text: ``32766:\\tfrom all lookup main``."""
    out: list[Rule] = []
    for raw in text.splitlines():
        if ":" not in raw or not raw.split(":", 1)[0].strip().isdigit():
            continue
        prio_text, _, rest = raw.partition(":")
        tokens = rest.split()
        invert = False
        if tokens[:1] == ["not"]:
            invert, tokens = True, tokens[1:]
        kwargs: dict[str, Any] = {}
        unsupported: list[str] = []
        action, table = "lookup", ""
        i = 0
        while i < len(tokens):
            word, value = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
            if word == "from":
                kwargs["src"] = None if value == "all" else _net(value, family)
                i += 2
            elif word == "to":
                kwargs["dst"] = None if value == "all" else _net(value, family)
                i += 2
            elif word in ("lookup", "table"):
                table, i = value, i + 2
            elif word in ("iif", "oif"):
                kwargs[word] = value
                i += 2
            elif word == "fwmark":
                kwargs["fwmark"], kwargs["fwmask"] = _mark(value)
                i += 2
            elif word in ("suppress_prefixlength", "suppress_prefixlen"):
                kwargs["suppress_prefixlength"] = int(value)
                i += 2
            elif word in _RULE_ACTIONS:
                action, i = word, i + 1
            elif word in ("[detached]", "[l3mdev-table]", "l3mdev"):
                i += 1
            elif word in ("proto", "suppress_ifgroup", "realms", "tos", "dsfield", "goto"):
                i += 2
            else:
                unsupported.append(word)
                i += 2
        out.append(
            Rule(
                priority=int(prio_text.strip()),
                table=table,
                action=action,
                invert=invert,
                unsupported=tuple(unsupported),
                text=raw.strip(),
                **kwargs,
            )
        )
    return tuple(sorted(out, key=lambda r: r.priority))


# --- selection ----------------------------------------------------------------------------------

Verdict: TypeAlias = Literal["route", "unreachable", "prohibit", "blackhole", "none"]
_REJECT_VERDICTS: dict[str, Verdict] = {"unreachable": "unreachable", "prohibit": "prohibit", "blackhole": "blackhole"}


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The route the kernel would use for ``destination``, and how it got there."""

    destination: IPAddress
    verdict: Verdict
    route: Route | None = None
    rule: Rule | None = None
    candidates: tuple[Route, ...] = ()
    skipped_rules: tuple[Rule, ...] = ()

    @property
    def runner_up(self) -> Route | None:
        """The best candidate that is not the chosen route (what would win without it)."""
        for candidate in self.candidates:
            if candidate is not self.route:
                return candidate
        return None


def matching(routes: Iterable[Route], destination: IPAddress, table: str = "main") -> tuple[Route, ...]:
    """Routes of ``table`` containing ``destination``, best first (longest prefix, lowest metric)."""
    found = [
        r
        for r in routes
        if r.table == table
        and r.version == destination.version
        and destination in r.destination
        and r.type not in ("broadcast", "multicast")
    ]
    return tuple(sorted(found, key=lambda r: (-r.destination.prefixlen, r.metric)))


def select_route(routes: Sequence[Route], destination: IPAddress, rules: Sequence[Rule] = ()) -> RouteChoice:
    """What the kernel does with a packet to ``destination`` (see the module docstring)."""
    active = tuple(sorted(rules, key=lambda r: r.priority)) if rules else DEFAULT_RULES
    skipped: list[Rule] = []
    main_candidates: tuple[Route, ...] = ()
    for rule in active:
        if rule.unsupported:
            skipped.append(rule)
            continue
        if not rule.matches(destination):
            continue
        if rule.action in _REJECT_VERDICTS:
            return RouteChoice(destination, _REJECT_VERDICTS[rule.action], None, rule, main_candidates, tuple(skipped))
        if rule.action != "lookup" or not rule.table:
            continue
        candidates = matching(routes, destination, rule.table)
        if rule.table == "main":
            main_candidates = candidates
        if rule.suppress_prefixlength is not None:
            candidates = tuple(c for c in candidates if c.destination.prefixlen > rule.suppress_prefixlength)
        if not candidates:
            continue
        best = candidates[0]
        if best.type == "throw":
            continue
        if best.type in _REJECT_VERDICTS:
            return RouteChoice(destination, _REJECT_VERDICTS[best.type], best, rule, candidates, tuple(skipped))
        return RouteChoice(destination, "route", best, rule, candidates, tuple(skipped))
    return RouteChoice(destination, "none", None, None, main_candidates, tuple(skipped))
