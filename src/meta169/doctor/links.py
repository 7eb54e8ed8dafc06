"""Interfaces with their addresses, and neighbour (ARP/NDP) entries, as data.

Pure. Formats: ``ip -j addr`` and ``ip addr`` text; ``ip -j neigh``, ``ip neigh``
text and ``/proc/net/arp`` (flags from <linux/if_arp.h>: ATF_COM 0x2 complete,
ATF_PERM 0x4 permanent; 0x0 is an unanswered request).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from meta169.errors import ValidationError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# Neighbour states that mean "asked, nobody answered" [ip-neighbour(8)].
UNANSWERED = frozenset(("FAILED", "INCOMPLETE"))
ANSWERED = frozenset(("REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"))


@dataclass(frozen=True, slots=True)
class Link:
    """One interface: name, index, whether it is up, its addresses."""

    name: str
    index: int = 0
    up: bool = True
    mac: str = ""
    addresses: tuple[IPInterface, ...] = ()

    @property
    def ipv4(self) -> tuple[ipaddress.IPv4Interface, ...]:
        return tuple(a for a in self.addresses if isinstance(a, ipaddress.IPv4Interface))

    @property
    def ipv6(self) -> tuple[ipaddress.IPv6Interface, ...]:
        return tuple(a for a in self.addresses if isinstance(a, ipaddress.IPv6Interface))

    @property
    def is_loopback(self) -> bool:
        return self.name == "lo" or any(a.ip.is_loopback for a in self.addresses)


def _json_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text or "[]")
    except ValueError as exc:
        raise ValidationError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValidationError(f"{what}: expected a JSON list")
    return [x for x in data if isinstance(x, dict)]


def parse_ip_addr_json(text: str) -> tuple[Link, ...]:
    """Interfaces from ``ip -j addr``."""
    out = []
    for item in _json_list(text, "ip -j addr"):
        addrs: list[IPInterface] = []
        for info in item.get("addr_info", ()):
            if info.get("family") in ("inet", "inet6") and "local" in info:
                addrs.append(ipaddress.ip_interface(f"{info['local']}/{info.get('prefixlen', 32)}"))
        flags = [str(f) for f in item.get("flags", ())]
        out.append(
            Link(
                name=str(item.get("ifname", "")),
                index=int(item.get("ifindex", 0)),
                up="UP" in flags or item.get("operstate") == "UP",
                mac=str(item.get("address", "")),
                addresses=tuple(addrs),
            )
        )
    return tuple(out)


_LINK_RE = re.compile(r"^(\d+):\s+([^:@\s]+)(?:@\S+)?:\s+<([^>]*)>")
_ADDR_RE = re.compile(r"^\s+(inet6?)\s+(\S+)")
_ETHER_RE = re.compile(r"^\s+link/\S+\s+([0-9a-f:]{17})")


def parse_ip_addr_text(text: str) -> tuple[Link, ...]:
    """Interfaces from ``ip addr`` text (iproute2 and BusyBox)."""
    out: list[Link] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            out.append(Link(**current))

    for raw in text.splitlines():
        match = _LINK_RE.match(raw)
        if match:
            close()
            flags = match.group(3).split(",")
            current = {"name": match.group(2), "index": int(match.group(1)), "up": "UP" in flags,
                       "mac": "", "addresses": ()}  # fmt: skip
            continue
        if current is None:
            continue
        ether = _ETHER_RE.match(raw)
        if ether:
            current["mac"] = ether.group(1)
            continue
        addr = _ADDR_RE.match(raw)
        if addr:
            value = addr.group(2)
            if "/" not in value:
                value += "/32" if addr.group(1) == "inet" else "/128"
            current["addresses"] = (*current["addresses"], ipaddress.ip_interface(value))
    close()
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One ARP/NDP entry; ``text`` is the source line (the evidence)."""

    address: IPAddress
    dev: str
    state: str
    lladdr: str = ""
    text: str = ""

    @property
    def unanswered(self) -> bool:
        return self.state in UNANSWERED

    @property
    def answered(self) -> bool:
        return self.state in ANSWERED and (bool(self.lladdr) or self.state in ("PERMANENT", "NOARP"))

    @property
    def evidence(self) -> str:
        if self.text:
            return self.text.strip()
        lladdr = f" lladdr {self.lladdr}" if self.lladdr else ""
        return f"{self.address} dev {self.dev}{lladdr} {self.state}"


def parse_ip_neigh_json(text: str) -> tuple[Neighbour, ...]:
    """Entries from ``ip -j neigh``."""
    out = []
    for item in _json_list(text, "ip -j neigh"):
        states = [str(s) for s in item.get("state", ())]
        out.append(
            Neighbour(
                address=ipaddress.ip_address(str(item["dst"])),
                dev=str(item.get("dev", "")),
                state=states[0] if states else "NONE",
                lladdr=str(item.get("lladdr", "")),
            )
        )
    return tuple(out)


def parse_ip_neigh_text(text: str) -> tuple[Neighbour, ...]:
    """Entries from ``ip neigh`` text: ``169.254.169.254 dev eth0  FAILED``."""
    out = []
    for raw in text.splitlines():
        tokens = raw.split()
        if len(tokens) < 2:
            continue
        try:
            address = ipaddress.ip_address(tokens[0])
        except ValueError:
            continue
        dev = tokens[tokens.index("dev") + 1] if "dev" in tokens[:-1] else ""
        lladdr = tokens[tokens.index("lladdr") + 1] if "lladdr" in tokens[:-1] else ""
        state = tokens[-1] if tokens[-1].isupper() else "NONE"
        out.append(Neighbour(address, dev, state, lladdr, raw.rstrip()))
    return tuple(out)


def parse_proc_net_arp(text: str) -> tuple[Neighbour, ...]:
    """Entries from ``/proc/net/arp``; flags 0x0 means the request got no answer."""
    out = []
    for raw in text.splitlines()[1:]:
        cols = raw.split()
        if len(cols) < 6:
            continue
        try:
            address = ipaddress.ip_address(cols[0])
            flags = int(cols[2], 16)
        except ValueError:
            continue
        complete = bool(flags & 0x2)
        state = "PERMANENT" if flags & 0x4 else ("REACHABLE" if complete else "INCOMPLETE")
        lladdr = cols[3] if complete else ""
        out.append(Neighbour(address, cols[5], state, lladdr, " ".join(cols)))
    return tuple(out)
