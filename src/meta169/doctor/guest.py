"""Guest-side diagnosis: the check table over a guest's facts, and the path it draws.

Pure. :func:`view` derives once what most checks need (the route the kernel picks
for 169.254.169.254, the metadata NIC, the current DHCP lease per interface);
:data:`CHECKS` is the table, one row per stable finding id; :func:`analyse` runs
it and draws the path guest -> route -> gateway or DHCP port -> REDIRECT ->
proxy -> server -> registry with the hop that breaks.

CentOS 6's zeroconf route (tests/unit/corpus/centos6-zeroconf),
``169.254.0.0/16 dev eth0 scope link metric 1002``, beats the default route by
longest prefix, so 169.254.169.254 is sent on-link and the guest ARPs for it;
behind a router nobody answers. The same on-link route works in an isolated
network, where the DHCP port itself holds 169.254.169.254, which is why the
zeroconf finding is an error only without evidence of an on-link answer.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from meta169.doctor import knobs
from meta169.doctor.facts import METADATA_V4, Facts
from meta169.doctor.leases import DhcpLease
from meta169.doctor.links import Link, Neighbour
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
from meta169.doctor.probes import ProbeResult
from meta169.doctor.routes import LINK_LOCAL_V4, Route, RouteChoice, select_route

METADATA_HOST_ROUTE = ipaddress.IPv4Network("169.254.169.254/32")
HOST_DOCTOR = "meta169 doctor --host"


@dataclass(frozen=True, slots=True)
class GuestView:
    """Facts plus what the checks derive from them once."""

    facts: Facts
    choice: RouteChoice | None  # None: no IPv4 route table in the facts
    primary: str | None  # the NIC metadata should leave by
    default: Route | None
    leases: tuple[DhcpLease, ...]  # the current lease of each interface
    ipv6_only: bool

    @property
    def route(self) -> Route | None:
        if self.choice is None or self.choice.verdict != "route":
            return None
        return self.choice.route

    def src(self, fact: str) -> str:
        name = self.facts.source(fact)
        return f"{name}: " if name else ""

    def has_host_route(self) -> bool:
        return any(r.destination == METADATA_HOST_ROUTE and r.table == "main" for r in self.facts.routes)

    def metadata_neighbours(self) -> tuple[Neighbour, ...]:
        return tuple(n for n in self.facts.neighbours if n.address == METADATA_V4)

    def gateway(self) -> ipaddress.IPv4Address | None:
        """The router metadata should go through: the pushed /32's, else the default route's."""
        for lease in self.leases:
            route = lease.metadata_route
            if route is not None and lease.interface in ("", self.primary) and route.router != ipaddress.IPv4Address(0):
                return route.router
        if self.default is not None and isinstance(self.default.gateway, ipaddress.IPv4Address):
            return self.default.gateway
        return None


def _usable_v4(link: Link) -> bool:
    return not link.is_loopback and any(not a.ip.is_link_local for a in link.ipv4)


def _current_leases(facts: Facts) -> tuple[DhcpLease, ...]:
    """Per interface, the lease whose address the interface holds now (else the newest one)."""
    by_iface: dict[str, list[DhcpLease]] = {}
    for lease in facts.leases:
        by_iface.setdefault(lease.interface, []).append(lease)
    out = []
    for iface, found in by_iface.items():
        link = facts.link(iface)
        held = {a.ip for a in link.ipv4} if link is not None else set()
        current = [lease for lease in found if lease.address in held] if held else []
        ranked = current or found
        # A lease that records its routes says more than one that does not (NM's ADDRESS= only).
        best = max(enumerate(ranked), key=lambda p: (p[1].records_routes, p[0]))[1]
        out.append(best)
    return tuple(out)


def view(facts: Facts) -> GuestView:
    """Derive the routing picture from ``facts``."""
    routes = facts.routes
    choice = select_route(routes, METADATA_V4, facts.rules) if routes else None
    defaults = [r for r in routes if r.is_default and r.table == "main" and r.type == "unicast"]
    default = min(defaults, key=lambda r: r.metric) if defaults else None
    leases = _current_leases(facts)
    primary: str | None = default.dev if default is not None and default.dev else None
    if primary is None:
        primary = next((lease.interface for lease in leases if lease.has_metadata_host_route and lease.interface), None)
    if primary is None:
        primary = next((link.name for link in facts.links if _usable_v4(link)), None)
    ipv6_only = (
        bool(facts.links)
        and not any(_usable_v4(link) for link in facts.links)
        and any(not link.is_loopback and link.ipv6 for link in facts.links)
    )
    return GuestView(facts, choice, primary, default, leases, ipv6_only)


# --- shared evidence and fixes -----------------------------------------------------------------


def _onlink_link_local(v: GuestView) -> Route | None:
    """The chosen route when it is an on-link link-local prefix wider than /32 (zeroconf-like)."""
    route = v.route
    if route is None or not route.on_link or route.destination.prefixlen == 32:
        return None
    if not isinstance(route.destination, ipaddress.IPv4Network) or not route.destination.subnet_of(LINK_LOCAL_V4):
        return None
    return route


def _answered_on_link(v: GuestView, dev: str) -> bool:
    tcp = v.facts.probe("tcp")
    if tcp is not None and tcp.outcome == "ok":
        return True
    return any(n.answered and n.dev == dev for n in v.metadata_neighbours())


def _route_del(v: GuestView, route: Route) -> Remedy:
    dest = route.destination
    if v.facts.platform == "windows":
        win: tuple[str, ...] = ("route", "delete", str(dest.network_address), "mask", str(dest.netmask), route.dev)
        return Remedy("now", " ".join(win), win)
    argv = ("ip", "route", "del", str(dest), "dev", route.dev)
    return Remedy("now", " ".join(argv) + "   (lost at the next network restart)", argv)


def _host_route_add(v: GuestView, gateway: ipaddress.IPv4Address, dev: str) -> Remedy:
    if v.facts.platform == "windows":
        win: tuple[str, ...] = ("route", "add", "169.254.169.254", "mask", "255.255.255.255", str(gateway))
        return Remedy("now", " ".join(win), win)
    argv = ("ip", "route", "add", "169.254.169.254/32", "via", str(gateway), "dev", dev)
    return Remedy("now", " ".join(argv), argv)


def _dhcp_push(v: GuestView) -> Remedy:
    hop = v.gateway()
    via = str(hop) if hop is not None else "<gateway or DHCP port>"
    default = v.default.gateway if v.default is not None else None
    value = f"169.254.169.254/32,{via}" + (f",0.0.0.0/0,{default}" if default is not None else "")
    return Remedy(
        "cloud",
        f"push 169.254.169.254/32 via {via} by DHCP option 121 (and 249): it wins over any /16 by longest prefix "
        f"(dnsmasq: dhcp-option=option:classless-static-route,{value}; neutron dhcp_agent.ini: force_metadata = "
        "True, or enable_isolated_metadata = True for networks without a router)",
    )


def _persistent_link_local_fixes(v: GuestView, dev: str) -> list[Remedy]:
    """What re-adds a link-local route on ``dev`` after a restart, and how to stop it."""
    fixes: list[Remedy] = []
    zc = knobs.rhel_zeroconf(v.facts.files, dev)
    if zc is not None and zc.adds_route:
        fixes.append(Remedy("persist", f"NOZEROCONF=yes in {knobs.SYSCONFIG_NETWORK} (ifup-eth then skips its "
                                       "\"Add Zeroconf route\"), then restart the network"))  # fmt: skip
    for conn in _nm_enabling(v):
        if conn.interface in ("", dev):
            fixes.append(Remedy("persist", f"nmcli connection modify '{conn.id}' ipv4.link-local disabled",
                                ("nmcli", "connection", "modify", conn.id, "ipv4.link-local", "disabled")))  # fmt: skip
    link = v.facts.link(dev)
    nd = knobs.networkd_for(v.facts.files, dev, link.mac if link is not None else "")
    if nd is not None and (nd.ipv4ll or nd.ipv4ll_route):
        text = f"LinkLocalAddressing=ipv6 and no IPv4LLRoute=yes in [Network] of {nd.path}"
        fixes.append(Remedy("persist", text))
    if _avahi_evidence(v):
        fixes.append(Remedy("persist", "remove avahi-autoipd (apt-get remove avahi-autoipd) or its ifupdown hook "
                                       f"{knobs.AVAHI_HOOK}"))  # fmt: skip
    if not fixes and v.facts.platform != "windows":
        text = (
            f"on RHEL-family images: NOZEROCONF=yes in {knobs.SYSCONFIG_NETWORK}; otherwise disable IPv4 "
            "link-local in the network manager that adds the route"
        )
        fixes.append(Remedy("persist", text))
    return fixes


def _route_evidence(v: GuestView, route: Route) -> list[str]:
    ev = [f"{v.src('routes')}{route.evidence}"]
    choice = v.choice
    if not v.has_host_route():
        ev.append("no 169.254.169.254/32 host route that would win by longest prefix")
    runner = choice.runner_up if choice is not None else None
    if runner is not None:
        ev.append(f"it wins over '{runner.render()}' (/{route.destination.prefixlen} is longer than "
                  f"/{runner.destination.prefixlen})")  # fmt: skip
    link = v.facts.link(route.dev)
    if link is not None and link.index and route.metric == 1000 + link.index:
        ev.append(f"metric {route.metric} = 1000 + ifindex {link.index} of {route.dev}: the signature of "
                  "network-scripts' ifup-eth \"Add Zeroconf route\"")  # fmt: skip
    zc = knobs.rhel_zeroconf(v.facts.files, route.dev)
    if zc is not None and zc.adds_route:
        ev += [f"{knobs.IFUP_ETH} {line}" for line in zc.script_lines]
        ev.append(f"NOZEROCONF is set neither in {knobs.SYSCONFIG_NETWORK} nor in ifcfg-{route.dev}")
    if link is not None:
        for addr in link.ipv4:
            if addr.ip in LINK_LOCAL_V4 and addr.ip != METADATA_V4:
                ev.append(f"{route.dev} holds the link-local address {addr}: its prefix route is this /16")
    kernel = v.facts.kernel_route
    if kernel is not None:
        ev.append(f"ip route get 169.254.169.254: {kernel.render()}")
    for n in v.metadata_neighbours():
        if n.dev == route.dev:
            ev.append(f"{v.src('neighbours')}{n.evidence}")
    return ev


# --- route hop -----------------------------------------------------------------------------------


def _zeroconf_common(v: GuestView, route: Route, wrong_nic: bool) -> Hit:
    gateway = v.gateway()
    answered = _answered_on_link(v, route.dev)
    via = f"to the gateway {gateway}" if gateway is not None else "to a router"
    if wrong_nic:
        summary = (f"169.254.169.254 leaves by {route.dev} on the link-local route {route.destination}, "
                   f"not by {v.primary} where the metadata service is reached")  # fmt: skip
    else:
        summary = (f"the link-local route {route.destination} dev {route.dev} sends 169.254.169.254 on-link "
                   f"instead of {via}: the guest ARPs for 169.254.169.254")  # fmt: skip
    summary += (": it answers on this link (isolated network), so this works, but only there" if answered
                else " and nobody answers")  # fmt: skip
    fixes = [_route_del(v, route)]
    fixes += _persistent_link_local_fixes(v, route.dev)
    if gateway is not None and v.primary:
        fixes.append(_host_route_add(v, gateway, v.primary))
    fixes.append(_dhcp_push(v))
    return Hit(summary, tuple(_route_evidence(v, route)), tuple(fixes), "warning" if answered else None)


def check_zeroconf_route(v: GuestView) -> Iterator[Hit]:
    route = _onlink_link_local(v)
    if route is not None and (v.primary is None or route.dev == v.primary):
        yield _zeroconf_common(v, route, wrong_nic=False)


def check_link_local_wrong_nic(v: GuestView) -> Iterator[Hit]:
    route = _onlink_link_local(v)
    if route is not None and v.primary is not None and route.dev != v.primary:
        yield _zeroconf_common(v, route, wrong_nic=True)


def check_no_metadata_route(v: GuestView) -> Iterator[Hit]:
    choice = v.choice
    if choice is None or v.ipv6_only or choice.verdict == "route":
        return
    ev: list[str] = []
    if choice.verdict == "none":
        ev.append("no route in the tables the rules select covers 169.254.169.254 "
                  "(no /32, no link-local /16, no default route)")  # fmt: skip
        main = [r for r in v.facts.routes if r.table == "main"]
        ev += [f"{v.src('routes')}{r.evidence}" for r in main[:8]]
    else:
        rule = choice.rule.evidence if choice.rule is not None else ""
        what = choice.route.evidence if choice.route is not None else rule
        ev.append(f"169.254.169.254 hits a {choice.verdict} {'route' if choice.route else 'rule'}: {what}")
    fixes: list[Remedy] = []
    for lease in v.leases:
        pushed = lease.metadata_route
        if pushed is not None and lease.interface:
            ev.append(f"{lease.describe()} pushes {pushed}, but the route is not installed")
            fixes.append(_host_route_add(v, pushed.router, lease.interface))
    if not fixes:
        for lease in v.leases:
            if lease.server is not None and lease.interface:
                fixes.append(Remedy("now", f"if the DHCP server {lease.server} holds the metadata address (isolated "
                                           f"network): ip route add 169.254.169.254/32 via {lease.server} dev "
                                           f"{lease.interface}",
                                    ("ip", "route", "add", "169.254.169.254/32", "via", str(lease.server), "dev",
                                     lease.interface)))  # fmt: skip
    fixes.append(_dhcp_push(v))
    yield Hit("no route covers 169.254.169.254: every connection to it fails at once (network unreachable)",
              tuple(ev), tuple(fixes))  # fmt: skip


def check_ipv6_only(v: GuestView) -> Iterator[Hit]:
    if not v.ipv6_only:
        return
    ev = [f"{v.src('links')}{link.name}: {', '.join(str(a) for a in link.addresses) or 'no address'}"
          for link in v.facts.links if not link.is_loopback]  # fmt: skip
    ev.append("no IPv4 address on any interface: 169.254.169.254 cannot be reached")
    v6_ok = [p for p in v.facts.probes if p.name == "ipv6" and p.outcome == "ok"]
    ev += [p.evidence for p in v.facts.probes if p.name == "ipv6"]
    v6_links = [ln.name for ln in v.facts.links if ln.ipv6 and not ln.is_loopback]
    dev = v6_ok[0].interface if v6_ok else (v6_links[0] if v6_links else "eth0")
    url = f"http://[fe80::a9fe:a9fe%{dev}]/"
    client = (
        f"point the metadata client at {url} (cloud-init: datasource: OpenStack: "
        f"metadata_urls: ['http://[fe80::a9fe:a9fe%25{dev}]'])"
    )
    fixes = (
        Remedy("check", f"meta169 query --url '{url}' /openstack", ("meta169", "query", "--url", url, "/openstack")),
        Remedy("persist", client),
    )
    yield Hit("the guest is IPv6-only: it must use the IPv6 metadata address fe80::a9fe:a9fe on its link",
              tuple(ev), fixes, "info" if v6_ok else None)  # fmt: skip


def _client_ignores_routes(v: GuestView, lease: DhcpLease) -> list[str]:
    out = []
    link = v.facts.link(lease.interface)
    nd = knobs.networkd_for(v.facts.files, lease.interface, link.mac if link is not None else "")
    if nd is not None and not nd.use_routes:
        out.append(f"{nd.path}: [DHCPv4] UseRoutes=no: networkd ignores the lease's routes")
    for conn in knobs.nm_connections(v.facts.files):
        if conn.ignore_auto_routes and conn.interface in ("", lease.interface):
            out.append(f"{conn.path}: [ipv4] ignore-auto-routes=true: NetworkManager ignores the lease's routes")
    return out


def _client_fix(v: GuestView, lease: DhcpLease) -> Remedy:
    if lease.client == "networkd":
        return Remedy("persist", "remove UseRoutes=no from [DHCPv4] of the interface's .network file")
    if lease.client == "networkmanager":
        return Remedy("persist", f"nmcli connection modify <connection of {lease.interface}> "
                                 "ipv4.ignore-auto-routes no")  # fmt: skip
    if lease.client == "udhcpc":
        return Remedy("persist", "use a udhcpc script that installs $staticroutes (BusyBox's simple.script does)")
    return Remedy("persist", "let dhclient-script install option 121 routes (Debian: "
                             "/etc/dhcp/dhclient-exit-hooks.d/rfc3442-classless-routes)")  # fmt: skip


def check_dhcp_route_not_applied(v: GuestView) -> Iterator[Hit]:
    if not v.facts.routes or v.has_host_route():
        return
    for lease in v.leases:
        pushed = lease.metadata_route
        if pushed is None or pushed.destination != METADATA_HOST_ROUTE:
            continue
        route = v.route
        # Metadata still flows: by another route through the same router, or on-link to an answering port.
        served = route is not None and (
            route.gateway == pushed.router or (route.on_link and _answered_on_link(v, route.dev))
        )
        ev = [lease.describe(), *lease.evidence, "no 169.254.169.254/32 route in the route table"]
        if route is not None:
            ev.append(f"169.254.169.254 goes by {route.render()} instead")
        ev += _client_ignores_routes(v, lease)
        fixes = [_host_route_add(v, pushed.router, lease.interface or v.primary or "eth0"), _client_fix(v, lease)]
        summary = (f"DHCP pushed {pushed} but the client did not install it"
                   + (": metadata still goes the same way by another route, unprotected against a link-local /16"
                      if served else ""))  # fmt: skip
        yield Hit(summary, tuple(ev), tuple(fixes), "warning" if served else None)


def check_neighbour_failed(v: GuestView) -> Iterator[Hit]:
    route = v.route
    for n in v.metadata_neighbours():
        if not n.unanswered:
            continue
        current = route is not None and route.on_link and route.dev == n.dev
        summary = (f"the guest is ARPing for 169.254.169.254 on {n.dev} and nobody answers"
                   + ("" if current else " (an entry left from an earlier on-link route?)"))  # fmt: skip
        yield Hit(summary, (f"{v.src('neighbours')}{n.evidence}",),
                  (Remedy("check", "ip route get 169.254.169.254", ("ip", "route", "get", "169.254.169.254")),),
                  None if current else "warning")  # fmt: skip


def check_no_default_route(v: GuestView) -> Iterator[Hit]:
    if not v.facts.routes or v.default is not None or v.ipv6_only:
        return
    if not any(_usable_v4(link) for link in v.facts.links) and v.facts.links:
        return
    ev = ["no default route in table main"]
    for lease in v.leases:
        if lease.classless and lease.default_route is None and lease.routers:
            ev.append(f"{lease.describe()}: option 121 lacks 0.0.0.0/0 while option 3 offers "
                      f"{', '.join(map(str, lease.routers))}; RFC 3442 clients ignore option 3 when option 121 "
                      "is present")  # fmt: skip
    yield Hit("the guest has no default route: metadata needs a /32 of its own", tuple(ev),
              (_dhcp_push(v),))  # fmt: skip


def _dhclient_request_lacks_121(v: GuestView) -> str:
    for path in ("/etc/dhcp/dhclient.conf", "/etc/dhclient.conf"):
        text = v.facts.files.get(path)
        if text is None:
            continue
        body = re.sub(r"#.*", "", text)
        for match in re.finditer(r"(?<![\w-])request\s+([^;]*);", body):
            if "rfc3442-classless-static-routes" not in match.group(1):
                return f"{path}: 'request {' '.join(match.group(1).split())};' does not ask for option 121"
    return ""


def check_dhcp_no_option_121(v: GuestView) -> Iterator[Hit]:
    if v.has_host_route():
        return
    for lease in v.leases:
        if not lease.records_routes or lease.has_metadata_host_route:
            continue
        if v.primary is not None and lease.interface and lease.interface != v.primary:
            continue
        ev = [lease.describe()]
        if lease.routes:
            ev += list(lease.evidence)
            ev.append("its classless routes have no 169.254.169.254/32")
        else:
            ev.append("no option 121 (classless static routes) and no option 249 in the lease")
            ev += [e for e in lease.evidence if "router" in e.lower()]
        fixes = [_dhcp_push(v)]
        missing = _dhclient_request_lacks_121(v) if lease.client == "dhclient" else ""
        if missing:
            ev.append(missing)
            fixes.insert(0, Remedy("persist", "add rfc3442-classless-static-routes to the request line of "
                                              "dhclient.conf (and declare: option rfc3442-classless-static-routes "
                                              "code 121 = array of unsigned integer 8;)"))  # fmt: skip
        yield Hit("DHCP gave no 169.254.169.254/32 host route: nothing protects the metadata route from a "
                  "link-local /16", tuple(ev), tuple(fixes))  # fmt: skip


def check_gateway_unreachable(v: GuestView) -> Iterator[Hit]:
    route = v.route
    if route is None or route.gateway is None:
        return
    for n in v.facts.neighbours:
        if n.address == route.gateway and n.unanswered and (not route.dev or n.dev == route.dev):
            yield Hit(
                f"the next hop {route.gateway} does not answer ARP on {n.dev}",
                (f"{v.src('routes')}{route.evidence}", f"{v.src('neighbours')}{n.evidence}"),
                (Remedy("host", f"check the router or DHCP port owning {route.gateway}: {HOST_DOCTOR}"),),
            )


# --- guest settings ---------------------------------------------------------------------------------


def check_nozeroconf_unset(v: GuestView) -> Iterator[Hit]:
    if knobs.IFUP_ETH not in v.facts.files:
        return
    candidates = {v.primary} if v.primary else set()
    candidates |= {p.rsplit("ifcfg-", 1)[1] for p in v.facts.files if p.startswith(knobs.IFCFG_DIR + "ifcfg-")}
    affected = []
    lines: tuple[str, ...] = ()
    for dev in sorted(d for d in candidates if d and d != "lo"):
        zc = knobs.rhel_zeroconf(v.facts.files, dev)
        if zc is not None and zc.adds_route:
            affected.append(dev)
            lines = zc.script_lines
    if not affected:
        return
    ev = [f"{knobs.IFUP_ETH} {line}" for line in lines]
    network = v.facts.files.get(knobs.SYSCONFIG_NETWORK)
    ev.append(f"{knobs.SYSCONFIG_NETWORK}: " + ("no NOZEROCONF line" if network is not None else "missing"))
    ev.append(f"interfaces that get the route at their next ifup: {', '.join(affected)}")
    yield Hit("network-scripts will add the zeroconf route 169.254.0.0/16 at every ifup (NOZEROCONF is unset)",
              tuple(ev), (Remedy("persist", f"NOZEROCONF=yes in {knobs.SYSCONFIG_NETWORK}"),))  # fmt: skip


def _nm_enabling(v: GuestView) -> list[knobs.NMConnection]:
    default = knobs.nm_global_link_local(v.facts.files)
    names = {link.name for link in v.facts.links}
    out = []
    for conn in knobs.nm_connections(v.facts.files):
        if conn.interface and names and conn.interface not in names:
            continue  # a profile for an interface this guest does not have
        value = conn.link_local
        if value == "default" and default is not None:
            value = default[0]
        if value == "enabled" or conn.method == "link-local":
            out.append(conn)
    return out


def check_nm_link_local(v: GuestView) -> Iterator[Hit]:
    default = knobs.nm_global_link_local(v.facts.files)
    for conn in _nm_enabling(v):
        ev = [f"{conn.path}: {line}" for line in conn.lines]
        if conn.link_local == "default" and default is not None:
            ev.append(f"the default comes from {default[1]}")
        yield Hit(f"NetworkManager connection '{conn.id}' enables IPv4 link-local addressing, which brings a "
                  "169.254.x.y address and the 169.254.0.0/16 route", tuple(ev),
                  (Remedy("persist", f"nmcli connection modify '{conn.id}' ipv4.link-local disabled",
                          ("nmcli", "connection", "modify", conn.id, "ipv4.link-local", "disabled")),))  # fmt: skip


def check_networkd_ipv4ll(v: GuestView) -> Iterator[Hit]:
    applied = {}
    for link in v.facts.links:
        if not link.is_loopback:
            nd = knobs.networkd_for(v.facts.files, link.name, link.mac)
            if nd is not None:
                applied[nd.path] = nd
    for nd in applied.values():
        if nd.ipv4ll or nd.ipv4ll_route:
            yield Hit(f"systemd-networkd ({nd.path}) enables IPv4 link-local addressing or its /16 route",
                      tuple(f"{nd.path}: {line}" for line in nd.lines),
                      (Remedy("persist", f"LinkLocalAddressing=ipv6 (networkd's default) and no IPv4LLRoute=yes "
                                         f"in [Network] of {nd.path}"),))  # fmt: skip


def _avahi_evidence(v: GuestView) -> list[str]:
    ev = []
    hook = v.facts.files.get(knobs.AVAHI_HOOK)
    if hook is not None:
        lines = knobs.numbered(hook, re.compile(r"169\.254|avahi-autoipd"))
        ev += [f"{knobs.AVAHI_HOOK} {line}" for line in lines[:4]] or [f"{knobs.AVAHI_HOOK} is installed"]
    if v.facts.processes is not None and "avahi-autoipd" in v.facts.processes:
        ev.append("process avahi-autoipd is running")
    return ev


def check_avahi_autoipd(v: GuestView) -> Iterator[Hit]:
    ev = _avahi_evidence(v)
    if ev:
        yield Hit("avahi-autoipd is installed: it adds 169.254.0.0/16 and a 169.254.x.y address when DHCP is slow",
                  tuple(ev), (Remedy("persist", "apt-get remove avahi-autoipd (or remove its hook "
                                                f"{knobs.AVAHI_HOOK})"),))  # fmt: skip


def check_ipv4ll_address(v: GuestView) -> Iterator[Hit]:
    for link in v.facts.links:
        ll = [a for a in link.ipv4 if a.ip in LINK_LOCAL_V4 and a.ip != METADATA_V4]
        if ll and not link.is_loopback:
            yield Hit(f"{link.name} holds a link-local IPv4 address ({', '.join(map(str, ll))}): something runs "
                      "IPv4LL (avahi-autoipd, NetworkManager, networkd, Windows APIPA after a DHCP failure)",
                      (f"{v.src('links')}{link.name}: {', '.join(str(a) for a in link.ipv4)}",),
                      (Remedy("now", f"ip addr del {ll[0]} dev {link.name}",
                              ("ip", "addr", "del", str(ll[0]), "dev", link.name)),))  # fmt: skip


def _proxy_sources(v: GuestView) -> list[knobs.ProxyExposure]:
    out = []
    if v.facts.env is not None:
        found = knobs.proxy_exposure(v.facts.env, "the environment of the doctor")
        if found is not None:
            out.append(found)
    text = v.facts.files.get(knobs.ENVIRONMENT_FILE)
    if text is not None:
        env = {k: val for k, (val, _) in knobs.shell_vars(text).items()}
        found = knobs.proxy_exposure(env, knobs.ENVIRONMENT_FILE)
        if found is not None:
            out.append(found)
    for path in knobs.SYSTEMD_CONF:
        if path in v.facts.files:
            where = f"{path} DefaultEnvironment= (every service, cloud-init included)"
            found = knobs.proxy_exposure(knobs.systemd_default_environment(v.facts.files[path]), where)
            if found is not None:
                out.append(found)
    return out


def check_proxy_env(v: GuestView) -> Iterator[Hit]:
    for exp in _proxy_sources(v):
        if exp.covered:
            continue
        ev = [f"{exp.source}: {var}" for var in exp.variables]
        ev.append(f"{exp.source}: no_proxy={exp.no_proxy}" if exp.no_proxy else f"{exp.source}: no no_proxy")
        wanted = ",".join(p for p in (exp.no_proxy, "169.254.169.254") if p)
        yield Hit("an HTTP proxy is set and no_proxy does not cover 169.254.169.254: clients that honour it "
                  "(cloud-init through Python requests, curl for http_proxy) send metadata requests to the proxy, "
                  "which cannot answer for this guest", tuple(ev),
                  (Remedy("persist", f"no_proxy={wanted} and NO_PROXY={wanted} in {exp.source}"),))  # fmt: skip


def check_proxy_env_cidr(v: GuestView) -> Iterator[Hit]:
    for exp in _proxy_sources(v):
        if exp.covered and exp.cidr_only:
            yield Hit("no_proxy covers 169.254.169.254 only by a CIDR entry, which wget and curl before 7.86 ignore",
                      (f"{exp.source}: no_proxy={exp.no_proxy}",),
                      (Remedy("persist", "add 169.254.169.254 itself to no_proxy"),))  # fmt: skip


# --- live probes ---------------------------------------------------------------------------------------


def _probes(v: GuestView, *names: str) -> list[ProbeResult]:
    return [p for p in v.facts.probes if p.name in names]


def check_metadata_no_answer(v: GuestView) -> Iterator[Hit]:
    tcp = v.facts.probe("tcp")
    if tcp is None or tcp.outcome not in ("timeout", "unreachable"):
        return
    route = v.route
    ev = [tcp.evidence]
    if route is not None:
        ev.append(f"{v.src('routes')}{route.evidence}")
    if tcp.outcome == "unreachable":
        summary = (
            "connecting to 169.254.169.254:80 failed with 'no route to host': ARP for the next hop got no "
            "answer, or the router answered with ICMP unreachable because it does not REDIRECT 169.254.169.254"
        )
    else:
        summary = (
            "connecting to 169.254.169.254:80 timed out: the next hop drops it; a router without the "
            "REDIRECT rule, or an isolated network whose DHCP port lacks 169.254.169.254"
        )
    yield Hit(summary, tuple(ev), (Remedy("host", f"{HOST_DOCTOR} on the network node: REDIRECT rules, isolated "
                                                  "address, proxy"),))  # fmt: skip


def check_metadata_refused(v: GuestView) -> Iterator[Hit]:
    tcp = v.facts.probe("tcp")
    if tcp is not None and tcp.outcome == "refused":
        yield Hit("169.254.169.254:80 refused the connection: the packet arrived but nothing listens there; "
                  "the proxy is down or listens on another port than the REDIRECT's", (tcp.evidence,),
                  (Remedy("host", f"{HOST_DOCTOR}: is the proxy listening (9697 in the router namespace, "
                                  "169.254.169.254:80 in the DHCP namespace)?"),))  # fmt: skip


def check_metadata_server_error(v: GuestView) -> Iterator[Hit]:
    bad = [p for p in _probes(v, "openstack", "ec2") if p.status is not None and p.status >= 500]
    if not bad:
        return
    meaning = {502: "the proxy cannot reach meta169 serve", 503: "the registry is unavailable or the proxy is busy",
               504: "meta169 serve did not answer the proxy in time"}  # fmt: skip
    text = "; ".join(sorted({f"{p.status}: {meaning.get(p.status or 0, 'server error')}" for p in bad}))
    yield Hit(f"the metadata service answers with server errors ({text})", tuple(p.evidence for p in bad),
              (Remedy("host", f"{HOST_DOCTOR} (serve reachable, shared secret, registry)"),))  # fmt: skip


def _guest_ips(v: GuestView) -> str:
    return ", ".join(f"{a.ip} on {link.name}" for link in v.facts.links if _usable_v4(link) for a in link.ipv4
                     if not a.ip.is_link_local)  # fmt: skip


def check_metadata_not_found(v: GuestView) -> Iterator[Hit]:
    probes = _probes(v, "openstack", "ec2")
    if probes and all(p.status == 404 for p in probes):
        ev = [p.evidence for p in probes]
        ips = _guest_ips(v)
        if ips:
            ev.append(f"this guest's addresses: {ips}")
        yield Hit(
            "the metadata service answers but does not know this instance (404 on every tree): the registry "
            "has no instance with this guest's address on its network, or several",
            tuple(ev),
            (Remedy("host", f"{HOST_DOCTOR} --network <id> --ip <guest address>; meta169 instance list"),),
        )


def check_metadata_forbidden(v: GuestView) -> Iterator[Hit]:
    probes = [p for p in _probes(v, "openstack", "ec2") if p.status == 403]
    if probes and any("signature" in p.detail for p in probes):
        # serve's 403 for a proxy request whose HMAC it rejects (meta169 api): the guest
        # is fine, the proxy-to-serve hop is not (found by the lab's secret-mismatch fault).
        yield Hit("the metadata service refuses the proxy's signature (403): the metadata proxy and serve do "
                  "not share one secret (or their clocks differ); nothing in this guest can fix it",
                  tuple(p.evidence for p in probes),
                  (Remedy("host", "meta169 doctor --host on the network node: the proxy's --secret-file and "
                                  "serve's --proxy-secret-file must hold the same secret"),))  # fmt: skip
    elif probes:
        yield Hit("the metadata service refuses this guest (403): its metadata endpoint is disabled "
                  "(http_endpoint=disabled) or a proxy in between added identity headers",
                  tuple(p.evidence for p in probes),
                  (Remedy("cloud", "meta169 instance show <uuid>: metadata_options.http_endpoint"),))  # fmt: skip


def check_imdsv2_required(v: GuestView) -> Iterator[Hit]:
    ec2, put = v.facts.probe("ec2"), v.facts.probe("imdsv2")
    if ec2 is not None and ec2.status == 401 and put is not None and put.outcome == "ok":
        yield Hit("the service requires IMDSv2 tokens: a client that does not PUT /latest/api/token first gets "
                  "401 (cloud-init's OpenStack datasource sends no token)", (ec2.evidence, put.evidence),
                  (Remedy("cloud", "set metadata_options.http_tokens: optional for this instance, or use a "
                                   "token-aware client"),))  # fmt: skip


def check_imdsv2_rejected(v: GuestView) -> Iterator[Hit]:
    put = v.facts.probe("imdsv2")
    if put is not None and put.status == 400:
        yield Hit("the IMDSv2 token PUT is answered 400, which SDKs treat as fatal (botocore: BadIMDSRequestError)",
                  (put.evidence,), (Remedy("check", "a proxy in the guest adding X-Forwarded-For? a TTL header "
                                                    "outside 1..21600?"),))  # fmt: skip


def check_imdsv2_unavailable(v: GuestView) -> Iterator[Hit]:
    put, ec2 = v.facts.probe("imdsv2"), v.facts.probe("ec2")
    if put is not None and put.status in (403, 404, 405) and ec2 is not None and ec2.outcome == "ok":
        yield Hit("the service offers no IMDSv2 tokens; clients fall back to plain GETs as botocore does",
                  (put.evidence,))  # fmt: skip


def check_ipv6_metadata(v: GuestView) -> Iterator[Hit]:
    ok = [p for p in v.facts.probes if p.name == "ipv6" and p.reached]
    tcp = v.facts.probe("tcp")
    if ok and tcp is not None and tcp.outcome != "ok" and not v.ipv6_only:
        url = f"http://[fe80::a9fe:a9fe%{ok[0].interface}]/"
        yield Hit(f"IPv4 metadata fails but the IPv6 metadata address answers on {ok[0].interface}",
                  tuple(p.evidence for p in ok),
                  (Remedy("check", f"meta169 query --url '{url}' /openstack", ("meta169", "query", "--url", url,
                                                                               "/openstack")),))  # fmt: skip


_ROUTE_CAUSES = ("zeroconf-route", "link-local-wrong-nic", "no-metadata-route")

CHECKS: tuple[Check[GuestView], ...] = check_table([
    Check("zeroconf-route", "route", "error", "link-local route captures 169.254.169.254", check_zeroconf_route),
    Check("link-local-wrong-nic", "route", "error", "link-local route on the wrong NIC", check_link_local_wrong_nic),
    Check("no-metadata-route", "route", "error", "no route to 169.254.169.254", check_no_metadata_route),
    Check("ipv6-only", "route", "warning", "IPv6-only guest", check_ipv6_only),
    Check("dhcp-route-not-applied", "route", "error", "DHCP host route not installed", check_dhcp_route_not_applied),
    Check("neighbour-failed", "route", "error", "ARP for 169.254.169.254 unanswered", check_neighbour_failed,
          folds_into=_ROUTE_CAUSES),
    Check("no-default-route", "route", "warning", "no default route", check_no_default_route),
    Check("dhcp-no-option-121", "route", "warning", "DHCP lease without the metadata host route",
          check_dhcp_no_option_121),
    Check("nozeroconf-unset", "route", "warning", "NOZEROCONF unset", check_nozeroconf_unset),
    Check("nm-link-local", "route", "warning", "NetworkManager IPv4 link-local enabled", check_nm_link_local),
    Check("networkd-ipv4ll", "route", "warning", "systemd-networkd IPv4 link-local enabled", check_networkd_ipv4ll),
    Check("avahi-autoipd", "route", "warning", "avahi-autoipd installed", check_avahi_autoipd),
    Check("ipv4ll-address", "route", "warning", "link-local IPv4 address", check_ipv4ll_address),
    Check("ipv6-metadata", "route", "info", "IPv6 metadata answers", check_ipv6_metadata),
    Check("gateway-unreachable", "next-hop", "error", "next hop does not answer ARP", check_gateway_unreachable),
    Check("metadata-no-answer", "redirect", "error", "no answer from 169.254.169.254:80", check_metadata_no_answer,
          folds_into=(*_ROUTE_CAUSES, "neighbour-failed", "gateway-unreachable", "dhcp-route-not-applied")),
    Check("metadata-refused", "proxy", "error", "169.254.169.254:80 refused", check_metadata_refused),
    Check("metadata-server-error", "server", "error", "metadata server errors", check_metadata_server_error),
    Check("metadata-forbidden", "server", "error", "metadata refused (403)", check_metadata_forbidden),
    Check("metadata-not-found", "registry", "error", "instance unknown to the metadata service",
          check_metadata_not_found),
    Check("proxy-env", "guest", "error", "HTTP proxy without no_proxy for 169.254.169.254", check_proxy_env),
    Check("proxy-env-cidr", "guest", "info", "no_proxy covers 169.254.169.254 only by CIDR", check_proxy_env_cidr),
    Check("imdsv2-required", "guest", "warning", "IMDSv2 tokens required", check_imdsv2_required),
    Check("imdsv2-rejected", "guest", "warning", "IMDSv2 token request rejected", check_imdsv2_rejected),
    Check("imdsv2-unavailable", "guest", "info", "no IMDSv2", check_imdsv2_unavailable),
])  # fmt: skip


# --- the path -----------------------------------------------------------------------------------------------


def _next_hop_label(v: GuestView) -> tuple[str, bool]:
    """("gateway 10.0.0.1" | "DHCP port 10.0.0.2" | "gateway", isolated)."""
    route = v.route
    gateway = route.gateway if route is not None else None
    if gateway is None:
        return "gateway", False
    servers = {lease.server for lease in v.leases if lease.server is not None}
    if gateway in servers:
        return f"DHCP port {gateway}", True
    return f"gateway {gateway}", False


def _probe_states(v: GuestView) -> dict[HopId, tuple[HopState, str]]:
    """What the probes prove about the hops behind the guest."""
    out: dict[HopId, tuple[HopState, str]] = {}
    tcp = v.facts.probe("tcp")
    if tcp is None:
        return out
    if tcp.outcome == "ok":
        for hop in ("next-hop", "redirect", "proxy"):
            out[hop] = ("ok", "169.254.169.254:80 accepted the connection")
    http = [p for p in _probes(v, "openstack", "ec2") if p.status is not None]
    if http:
        if all(p.status is not None and p.status < 500 for p in http):
            out["server"] = ("ok", "answered " + ", ".join(f"{p.name} {p.status}" for p in http))
        if any(p.outcome == "ok" for p in http):
            out["registry"] = ("ok", "knows this instance")
    return out


def guest_path(v: GuestView, findings: Sequence[Finding]) -> tuple[HopStatus, ...]:
    """The hops with their states; hops past a broken one are "not reached"."""
    facts = v.facts
    label, isolated = _next_hop_label(v)
    proved = _probe_states(v)
    route = v.route
    details: dict[HopId, tuple[str, str, HopState]] = {}
    ips = _guest_ips(v)
    if facts.env is None:
        details["guest"] = ("guest", ips or "proxy variables not collected", "unknown")
    else:
        details["guest"] = ("guest", (ips + "; " if ips else "") + "no HTTP proxy in the way", "ok")
    if v.choice is None:
        details["route"] = ("route", "no IPv4 route table collected", "unknown")
    elif route is not None:
        details["route"] = ("route", route.evidence, "ok")
    else:
        details["route"] = ("route", f"no usable route ({v.choice.verdict})", "broken")
    on_link = route is not None and route.on_link
    if on_link:
        details["next-hop"] = ("gateway", "bypassed: the route sends 169.254.169.254 on-link", "n/a")
    elif route is not None and route.gateway is not None:
        answered = [n for n in facts.neighbours if n.address == route.gateway and n.answered]
        if answered:
            details["next-hop"] = (label, f"ARP answered ({answered[0].lladdr or answered[0].state})", "ok")
        else:
            details["next-hop"] = (label, "not probed", "unknown")
    else:
        details["next-hop"] = (label, "not reached", "unknown")
    if isolated:
        details["redirect"] = ("REDIRECT", "none in isolated mode: the DHCP port owns 169.254.169.254", "n/a")
    else:
        details["redirect"] = ("REDIRECT", f"not visible from the guest ({HOST_DOCTOR})", "unknown")
    details["proxy"] = ("proxy", "not probed" if facts.probe("tcp") is None else "not reached", "unknown")
    details["server"] = ("server", details["proxy"][1], "unknown")
    details["registry"] = ("registry", details["proxy"][1], "unknown")
    out: list[HopStatus] = []
    broken_seen = False
    for hop in HOPS:
        lab, detail, state = details[hop]
        if hop in proved and state in ("unknown",):
            state, detail = proved[hop]
        from_findings = hop_state_from_findings(findings, hop)
        if from_findings is not None and state != "n/a":
            state = from_findings
            first = next(f for f in findings if f.hop == hop)
            detail = first.summary if hop != "route" or route is None else route.evidence
        elif from_findings == "broken":
            state = "broken"
        if broken_seen and state == "unknown":
            detail = "not reached"
        broken_seen = broken_seen or state == "broken"
        out.append(HopStatus(hop, lab, state, detail))
    return tuple(out)


def analyse(facts: Facts, *, source: str = "") -> Report:
    """Run :data:`CHECKS` over ``facts`` and draw the path."""
    v = view(facts)
    findings = evaluate(CHECKS, v)
    return Report("guest", source or facts.label or "live", guest_path(v, findings), findings, facts.notes)
