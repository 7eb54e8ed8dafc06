"""The boot storm's network: router namespaces, one namespace per guest, veths, rules.

Layout (every object lives in a namespace the benchmark made, ``m169b-<tag>-...``;
nothing is created in the host's namespace):

- router ``<tag>-rNN``: a bridge ``qr-storm`` holding the router's address
  10.0.0.1/22 and the router end (``gNNNN``) of each of its guests' veths, and the
  router-mode rules of ``meta169.plumbing.iptables.router_rules(["qr-storm"])``:
  TCP to 169.254.169.254:80 arriving on the bridge is REDIRECTed to port 9697, where
  the hop under test listens (``meta169 proxy`` or Neutron's haproxy);
- guest ``<tag>-gNNNN``: ``eth0`` (the instance's MAC, its 10.0.x.y/22), ``lo``, and
  the route DHCP option 121 would push, ``169.254.169.254/32 via 10.0.0.1``.

Neighbour entries are made permanent on both sides (the router's for each guest, the
guest's for its gateway). The kernel keeps one neighbour table for all namespaces,
and only non-permanent entries count against its limit (``gc_thresh3``, 1024 by
default, settable only on the host): 1000 guests and their routers resolving each
other by ARP overflow it (``table_fulls`` in /proc/net/stat/arp_cache), and
connects fail with EHOSTUNREACH or wait for SYN retransmissions. In a cloud every
guest and network node has a kernel, and a table, of its own: this is an artifact of
packing them into one, removed without touching the host's settings.

Every router has the same subnet, as tenants with overlapping ranges do; serve tells
the guests apart by the network the hop stamps. Guests are configured by
``python -m bench.storm_net configure`` (a child that ``setns(2)``-es from guest to
guest and speaks rtnetlink: a thousand ``ip -n`` processes would take seconds), so the
benchmark's own process never leaves the host namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BRIDGE = "qr-storm"
SUBNET = "10.0.0.0/22"
PREFIXLEN = 22
GATEWAY = "10.0.0.1"
FIRST_HOST = 10  # guests start at 10.0.0.10
MAX_GUESTS_PER_ROUTER = (1 << (32 - PREFIXLEN)) - FIRST_HOST - 1
METADATA_IP = "169.254.169.254"
PROXY_PORT = 9697
PREFIX = "m169b-"


@dataclass(frozen=True)
class Router:
    index: int
    netns: str
    network: str
    project: str

    @property
    def mac(self) -> str:
        """The bridge's address (set, so that adding ports never changes it)."""
        return f"fa:16:3e:ff:00:{self.index:02x}"


@dataclass(frozen=True)
class Guest:
    index: int
    router: Router
    slot: int  # index among the router's guests
    netns: str
    ip: str
    mac: str
    uuid: str
    kind: str

    @property
    def name(self) -> str:
        return f"storm-{self.index:04d}"

    @property
    def port(self) -> str:
        """The router end of the guest's veth."""
        return f"g{self.slot:04d}"


@dataclass(frozen=True)
class Topology:
    tag: str
    routers: tuple[Router, ...]
    guests: tuple[Guest, ...]

    @property
    def namespaces(self) -> list[str]:
        return [r.netns for r in self.routers] + [g.netns for g in self.guests]

    def inventory(self) -> dict[str, Any]:
        from bench.sequences import instance_document, network_document

        return {
            "networks": [network_document(r.network, r.project, SUBNET, GATEWAY) for r in self.routers],
            "instances": [
                instance_document(g.uuid, g.name, g.router.network, g.ip, g.mac, g.router.project) for g in self.guests
            ],
        }


def plan(tag: str, guests: int, routers: int, kinds: Sequence[str]) -> Topology:
    """``guests`` guests spread evenly over ``routers`` routers; guest i runs ``kinds[i % len(kinds)]``."""
    if routers < 1 or guests < routers:
        raise ValueError("need at least one router and one guest per router")
    if -(-guests // routers) > MAX_GUESTS_PER_ROUTER:
        raise ValueError(f"at most {MAX_GUESTS_PER_ROUTER} guests per router (a /{PREFIXLEN})")
    rs = tuple(Router(r, f"{tag}-r{r:02d}", f"storm-net-{r:02d}", f"storm-{r:02d}") for r in range(routers))
    out = []
    slots = [0] * routers
    for i in range(guests):
        r = rs[i % routers]
        j = slots[r.index]
        slots[r.index] += 1
        host = FIRST_HOST + j
        out.append(
            Guest(
                index=i,
                router=r,
                slot=j,
                netns=f"{tag}-g{i:04d}",
                ip=f"10.0.{host >> 8}.{host & 0xFF}",
                mac=f"fa:16:3e:{r.index:02x}:{j >> 8:02x}:{j & 0xFF:02x}",
                uuid=f"5707a000-{r.index:04x}-4000-8000-{j:012x}",
                kind=kinds[i % len(kinds)],
            )
        )
    return Topology(tag, rs, tuple(out))


def router_batch(topo: Topology, router: Router) -> list[str]:
    """``ip -n ROUTER -batch`` lines: bridge, address, one veth per guest (the guest end
    born in the router's namespace and moved straight into the guest's)."""
    lines = [
        "link set lo up",
        f"link add {BRIDGE} address {router.mac} type bridge",
        f"addr add {GATEWAY}/{PREFIXLEN} dev {BRIDGE}",
        f"link set {BRIDGE} up",
    ]
    for g in topo.guests:
        if g.router is router:
            lines.append(f"link add {g.port} type veth peer name eth0 address {g.mac} netns {g.netns}")
            lines.append(f"link set {g.port} master {BRIDGE} up")
            lines.append(f"neigh add {g.ip} lladdr {g.mac} dev {BRIDGE} nud permanent")
    return lines


def configure_guests(python: Path, topo: Topology) -> None:
    """Address, link and route in every guest, from one child process."""
    lines = [json.dumps({"ns": g.netns, "ip": g.ip, "gw": GATEWAY, "gw_mac": g.router.mac}) for g in topo.guests]
    done = subprocess.run(
        [str(python), "-m", "bench.storm_net", "configure"],
        input="\n".join(lines) + "\n",
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.storm_net configure: {done.stderr.strip()[-2000:]}")


# -- the child: setns + rtnetlink ------------------------------------------------------------------

CLONE_NEWNET = 0x40000000  # <sched.h>
NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH = 16, 20, 24, 28  # <linux/rtnetlink.h>
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NDA_DST, NDA_LLADDR = 1, 2  # <linux/neighbour.h>
NUD_PERMANENT = 0x80
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    if not name.startswith(PREFIX) or "/" in name:
        raise SystemExit(f"storm_net: refusing namespace {name!r} (not the benchmark's)")
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _link_up(index: int, seq: int) -> bytes:
    return _message(RTM_NEWLINK, 0, seq, struct.pack("BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP))


def _add_address(index: int, ip: str, prefixlen: int, seq: int) -> bytes:
    addr = socket.inet_aton(ip)
    body = struct.pack("BBBBI", socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += _attr(IFA_LOCAL, addr) + _attr(IFA_ADDRESS, addr)
    return _message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def _add_host_route(dst: str, gateway: str, index: int, seq: int) -> bytes:
    body = struct.pack(
        "BBBBBBBBI", socket.AF_INET, 32, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body += _attr(RTA_DST, socket.inet_aton(dst)) + _attr(RTA_GATEWAY, socket.inet_aton(gateway))
    body += _attr(RTA_OIF, struct.pack("I", index))
    return _message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def _add_neighbour(index: int, ip: str, mac: str, seq: int) -> bytes:
    body = struct.pack("BxxxiHBB", socket.AF_INET, index, NUD_PERMANENT, 0, 0)
    body += _attr(NDA_DST, socket.inet_aton(ip)) + _attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
    return _message(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def _transact(messages: list[bytes]) -> None:
    """Send each message and wait for its ACK, in order (the route needs the address)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as nl:
        nl.bind((0, 0))
        for message in messages:
            nl.send(message)
            seq = struct.unpack_from("I", message, 8)[0]
            while True:
                data = nl.recv(65536)
                length, kind, _, got_seq, _ = struct.unpack_from("IHHII", data)
                if kind == NLMSG_ERROR and got_seq == seq:
                    error = struct.unpack_from("i", data, 16)[0]
                    if error != 0:
                        raise OSError(-error, f"rtnetlink: {os.strerror(-error)}")
                    break
                if length == 0:
                    break


def configure(ip: str, gateway: str, gateway_mac: str) -> None:
    """In the current namespace: lo up, eth0 up with ``ip``/22, the gateway's permanent
    neighbour entry, the /32 to 169.254.169.254."""
    lo, eth0 = socket.if_nametoindex("lo"), socket.if_nametoindex("eth0")
    _transact(
        [
            _link_up(lo, 1),
            _add_address(eth0, ip, PREFIXLEN, 2),
            _link_up(eth0, 3),
            _add_neighbour(eth0, gateway, gateway_mac, 4),
            _add_host_route(METADATA_IP, gateway, eth0, 5),
        ]
    )


def main(argv: list[str]) -> int:
    if argv != ["configure"]:
        print("usage: python -m bench.storm_net configure < JSON lines", file=sys.stderr)
        return 2
    for line in sys.stdin:
        if line.strip():
            spec = json.loads(line)
            enter(spec["ns"])
            configure(spec["ip"], spec["gw"], spec["gw_mac"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
