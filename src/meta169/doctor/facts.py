"""The guest's facts: one frozen object parsed from a bundle, the input of every guest check.

Pure. :func:`facts_from_bundle` prefers the richest source of each fact (JSON over
text over /proc) and turns a source it cannot parse into a note instead of an
exception, so one odd file never hides the rest of the diagnosis.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from meta169.doctor import bundle as b
from meta169.doctor.leases import DhcpLease, parse_lease_file, parse_nmcli_dhcp4
from meta169.doctor.links import (
    Link,
    Neighbour,
    parse_ip_addr_json,
    parse_ip_addr_text,
    parse_ip_neigh_json,
    parse_ip_neigh_text,
    parse_proc_net_arp,
)
from meta169.doctor.probes import ProbeResult
from meta169.doctor.routes import (
    Route,
    Rule,
    parse_ip_route_json,
    parse_ip_route_text,
    parse_ip_rule_json,
    parse_ip_rule_text,
    parse_proc_net_route,
    parse_route_print,
)
from meta169.errors import ValidationError

METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything known about the guest. Empty tuples mean "not collected"; see ``sources``."""

    platform: str = "linux"
    routes: tuple[Route, ...] = ()
    routes6: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()
    links: tuple[Link, ...] = ()
    leases: tuple[DhcpLease, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None
    processes: tuple[str, ...] | None = None
    probes: tuple[ProbeResult, ...] = ()
    kernel_route: Route | None = None
    # Which bundle file each fact came from ("routes" -> "ip-route.txt").
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    label: str = ""

    def source(self, fact: str) -> str:
        return self.sources.get(fact, "")

    def probe(self, name: str) -> ProbeResult | None:
        return next((p for p in self.probes if p.name == name), None)

    def link(self, name: str) -> Link | None:
        return next((link for link in self.links if link.name == name), None)


def _first(
    bundle: Mapping[str, str], notes: list[str], options: tuple[tuple[str, Callable[[str], T]], ...]
) -> tuple[T | None, str]:
    for name, parse in options:
        if name not in bundle:
            continue
        try:
            return parse(bundle[name]), name
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            notes.append(f"{name}: cannot parse ({exc}); trying the next source")
    return None, ""


def facts_from_bundle(bundle: Mapping[str, str], *, label: str = "") -> Facts:
    """Parse a bundle (see :mod:`meta169.doctor.bundle`) into :class:`Facts`."""
    notes: list[str] = []
    sources: dict[str, str] = {}
    meta = b.meta(bundle)
    platform = str(meta.get("platform") or ("windows" if b.ROUTE_PRINT in bundle else "linux"))

    routes, src = _first(bundle, notes, (
        (b.IP_ROUTE_JSON, lambda t: parse_ip_route_json(t, 4)),
        (b.IP_ROUTE_TXT, lambda t: parse_ip_route_text(t, 4)),
        (b.PROC_NET_ROUTE, parse_proc_net_route),
        (b.ROUTE_PRINT, parse_route_print),
    ))  # fmt: skip
    if routes is not None:
        sources["routes"] = src
    routes6, src = _first(bundle, notes, (
        (b.IP6_ROUTE_JSON, lambda t: parse_ip_route_json(t, 6)),
        (b.IP6_ROUTE_TXT, lambda t: parse_ip_route_text(t, 6)),
    ))  # fmt: skip
    if routes6 is not None:
        sources["routes6"] = src
    rules, src = _first(bundle, notes, (
        (b.IP_RULE_JSON, lambda t: parse_ip_rule_json(t, 4)),
        (b.IP_RULE_TXT, lambda t: parse_ip_rule_text(t, 4)),
    ))  # fmt: skip
    if rules is not None:
        sources["rules"] = src
    neighbours, src = _first(bundle, notes, (
        (b.IP_NEIGH_JSON, parse_ip_neigh_json),
        (b.IP_NEIGH_TXT, parse_ip_neigh_text),
        (b.PROC_NET_ARP, parse_proc_net_arp),
    ))  # fmt: skip
    if neighbours is not None:
        sources["neighbours"] = src
    links, src = _first(bundle, notes, (
        (b.IP_ADDR_JSON, parse_ip_addr_json),
        (b.IP_ADDR_TXT, parse_ip_addr_text),
    ))  # fmt: skip
    if links is not None:
        sources["links"] = src
    kernel = None
    if b.IP_ROUTE_GET in bundle:
        try:
            got = parse_ip_route_json(bundle[b.IP_ROUTE_GET], 4)
            kernel = got[0] if got else None
        except ValidationError as exc:
            notes.append(f"{b.IP_ROUTE_GET}: cannot parse ({exc})")

    files = b.guest_files(bundle)
    ifnames = {link.index: link.name for link in links or ()}
    found_leases: list[DhcpLease] = []
    for path in sorted(files):
        try:
            found_leases.extend(parse_lease_file(path, files[path], ifnames))
        except (ValidationError, ValueError) as exc:
            notes.append(f"{path}: cannot parse lease ({exc})")
    if b.NMCLI in bundle:
        try:
            found_leases.extend(parse_nmcli_dhcp4(bundle[b.NMCLI]))
        except ValidationError as exc:
            notes.append(f"{b.NMCLI}: cannot parse ({exc})")

    env: dict[str, str] | None = None
    if b.ENV in bundle:
        try:
            loaded = json.loads(bundle[b.ENV])
            env = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else None
        except ValueError as exc:
            notes.append(f"{b.ENV}: cannot parse ({exc})")
    processes = tuple(line.strip() for line in bundle[b.PS].splitlines() if line.strip()) if b.PS in bundle else None
    probes: list[ProbeResult] = []
    if b.PROBES in bundle:
        try:
            probes = [ProbeResult.from_json(item) for item in json.loads(bundle[b.PROBES])]
        except (ValueError, ValidationError, TypeError, AttributeError) as exc:
            notes.append(f"{b.PROBES}: cannot parse ({exc})")
    for name, error in (meta.get("errors") or {}).items():
        notes.append(f"collecting {name} failed: {error}")
    return Facts(
        platform=platform,
        routes=routes or (),
        routes6=routes6 or (),
        rules=rules or (),
        neighbours=neighbours or (),
        links=links or (),
        leases=tuple(found_leases),
        files=files,
        env=env,
        processes=processes,
        probes=tuple(probes),
        kernel_route=kernel,
        sources=sources,
        notes=tuple(notes),
        label=label,
    )
