"""Network namespaces: names, ``ip`` argv, veths, addresses, and sockets opened inside.

Owns every crossing into a namespace. Commands are argv lists for ``ip``; the one
in-process crossing is :func:`call_in_netns`, which runs a callable in a fresh,
short-lived thread that has ``setns(2)``-ed into the namespace, so the caller's
thread (an asyncio loop, say) never changes namespace. A socket created there
stays in that namespace for its whole life [STYLE principle 9; pyroute2's
``create_socket(netns=...)``]. Knows nothing of iptables, DHCP or the proxy.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

from meta169.errors import PlumbingError, ValidationError
from meta169.plumbing.command import CommandResult, Runner, run

T = TypeVar("T")
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 16  # including the NUL: names are at most 15 characters [linux/if.h]

# The metadata address as configured on an isolated network's DHCP port
# [openstack/neutron agent/linux/dhcp.py DeviceManager.setup: METADATA_CIDR and
# METADATA_V6_CIDR]. neutron-lib's METADATA_V6_CIDR is fe80::a9fe:a9fe/64; neutron
# itself overrides it with /128 ("Neutron-lib defines this with a /64 but it
# should be /128", neutron/common/_constants.py): a /64 would add a second
# fe80::/64 prefix route to the interface.
METADATA_V4_INTERFACE = ipaddress.IPv4Interface("169.254.169.254/32")
METADATA_V6_INTERFACE = ipaddress.IPv6Interface("fe80::a9fe:a9fe/128")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

_CLONE_NEWNET = 0x40000000  # <sched.h>
_IP_FREEBIND = 15  # <linux/in.h>
_IP_TRANSPARENT = 19
_IPV6_TRANSPARENT = 75  # <linux/in6.h>
_IPV6_FREEBIND = 78


def check_name(name: str) -> str:
    """Validate a namespace name (a file name under /run/netns); return it."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValidationError(f"namespace name {name!r} must be 1-64 of [A-Za-z0-9_.-], not starting with . or -")
    return name


def check_ifname(name: str) -> str:
    """Validate an interface name against IFNAMSIZ; return it."""
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name):
        raise ValidationError(f"interface name {name!r} must be 1-15 of [A-Za-z0-9_.-]")
    return name


def in_netns(ns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` inside namespace ``ns`` (``ip netns exec``)."""
    return ["ip", "netns", "exec", check_name(ns), *argv]


def ip_argv(ns: str, *args: str) -> list[str]:
    """argv for ``ip -n ns ...`` (iproute2 switches namespace itself, no exec)."""
    return ["ip", "-n", check_name(ns), *args]


# --- namespaces -------------------------------------------------------------------


def exists(name: str) -> bool:
    return (NETNS_DIR / check_name(name)).exists()


def add(name: str, *, lo_up: bool = True, runner: Runner = run) -> None:
    """Create namespace ``name`` (error if it exists) and bring its loopback up."""
    runner(["ip", "netns", "add", check_name(name)])
    if lo_up:
        runner(ip_argv(name, "link", "set", "dev", "lo", "up"))


def delete(name: str, *, runner: Runner = run) -> None:
    """Delete namespace ``name``; its veth ends disappear with it."""
    runner(["ip", "netns", "delete", check_name(name)])


def pids(name: str, *, runner: Runner = run) -> tuple[int, ...]:
    """PIDs of processes whose network namespace is ``name``."""
    out = runner(["ip", "netns", "pids", check_name(name)]).stdout
    return tuple(int(p) for p in out.split())


def exec_in(
    ns: str, argv: Sequence[str], *, input: str | None = None, check: bool = True, runner: Runner = run
) -> CommandResult:
    """Run ``argv`` inside namespace ``ns`` and wait for it."""
    return runner(in_netns(ns, argv), input=input, check=check)


# --- links, addresses, routes -------------------------------------------------------


def create_veth(
    name_a: str,
    ns_a: str,
    name_b: str,
    ns_b: str,
    *,
    mac_a: str | None = None,
    mac_b: str | None = None,
    runner: Runner = run,
) -> None:
    """Create a veth pair with one end in each namespace (never in the caller's) and bring both up.

    The pair is created by ``ip -n ns_a``, so end A is born in ``ns_a`` and end B
    is moved straight to ``ns_b``: neither end ever exists in the host namespace.
    """
    check_ifname(name_a)
    check_ifname(name_b)
    argv = ip_argv(ns_a, "link", "add", name_a)
    if mac_a:
        argv += ["address", _check_mac(mac_a)]
    argv += ["type", "veth", "peer", "name", name_b]
    if mac_b:
        argv += ["address", _check_mac(mac_b)]
    argv += ["netns", check_name(ns_b)]
    runner(argv)
    link_up(ns_a, name_a, runner=runner)
    link_up(ns_b, name_b, runner=runner)


def _check_mac(mac: str) -> str:
    value = mac.strip().lower()
    if not _MAC_RE.fullmatch(value):
        raise ValidationError(f"MAC address {mac!r} is not six colon-separated hex octets")
    return value


def link_up(ns: str, iface: str, *, runner: Runner = run) -> None:
    runner(ip_argv(ns, "link", "set", "dev", check_ifname(iface), "up"))


def set_mac(ns: str, iface: str, mac: str, *, runner: Runner = run) -> None:
    runner(ip_argv(ns, "link", "set", "dev", check_ifname(iface), "address", _check_mac(mac)))


def addresses(ns: str, iface: str, *, runner: Runner = run) -> tuple[IPInterface, ...]:
    """Addresses configured on ``iface`` in ``ns`` (from ``ip -j addr``)."""
    out = runner(ip_argv(ns, "-j", "addr", "show", "dev", check_ifname(iface))).stdout
    return parse_ip_addr_json(out)


def parse_ip_addr_json(text: str) -> tuple[IPInterface, ...]:
    """Addresses from ``ip -j addr show`` output."""
    try:
        links: Any = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise PlumbingError(f"ip -j addr printed something that is not JSON: {exc}") from exc
    found: list[IPInterface] = []
    for link in links:
        for info in link.get("addr_info", ()):
            if info.get("family") in ("inet", "inet6") and "local" in info:
                found.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
    return tuple(found)


def wait_for_dad(ns: str, iface: str, *, timeout: float = 5.0, runner: Runner = run) -> None:
    """Wait until no IPv6 address on ``iface`` is tentative (duplicate address detection over).

    A tentative address can be neither a source nor, without freebind, bound to;
    a freshly created link's own fe80:: address is tentative for about a second.
    neutron waits the same way before binding [agent/metadata/driver.py
    ``wait_until_address_ready``]. ``PlumbingError`` when DAD failed or timed out.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = runner(ip_argv(ns, "-j", "-6", "addr", "show", "dev", check_ifname(iface))).stdout
        flags = _inet6_flags(out)
        if any(f.get("dadfailed") for f in flags):
            raise PlumbingError(f"duplicate address detection failed on {iface} in {ns}")
        if not any(f.get("tentative") for f in flags):
            return
        if time.monotonic() > deadline:
            raise PlumbingError(f"addresses on {iface} in {ns} still tentative after {timeout:g}s")
        time.sleep(0.05)


def _inet6_flags(text: str) -> list[dict[str, Any]]:
    try:
        links: Any = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise PlumbingError(f"ip -j addr printed something that is not JSON: {exc}") from exc
    return [info for link in links for info in link.get("addr_info", ()) if info.get("family") == "inet6"]


def add_address(ns: str, iface: str, address: IPInterface, *, nodad: bool = False, runner: Runner = run) -> None:
    argv = ip_argv(ns, "addr", "add", str(address), "dev", check_ifname(iface))
    if nodad and address.version == 6:
        argv.append("nodad")
    runner(argv)


def delete_address(ns: str, iface: str, address: IPInterface, *, runner: Runner = run) -> None:
    runner(ip_argv(ns, "addr", "del", str(address), "dev", check_ifname(iface)))


def add_route(
    ns: str,
    destination: IPNetwork | Literal["default"],
    *,
    via: IPAddress | None = None,
    dev: str | None = None,
    runner: Runner = run,
) -> None:
    """``ip route replace`` (idempotent) of ``destination`` via a gateway and/or device."""
    if via is None and dev is None:
        raise ValidationError("a route needs a gateway, a device or both")
    family = (
        "-6"
        if (via is not None and via.version == 6) or (destination != "default" and destination.version == 6)
        else "-4"
    )
    argv = ip_argv(ns, family, "route", "replace", str(destination))
    if via is not None:
        argv += ["via", str(via)]
    if dev is not None:
        argv += ["dev", check_ifname(dev)]
    runner(argv)


def _metadata_interface(family: Literal[4, 6]) -> IPInterface:
    if family not in (4, 6):
        raise ValidationError(f"IP family must be 4 or 6, not {family!r}")
    return METADATA_V4_INTERFACE if family == 4 else METADATA_V6_INTERFACE


def add_metadata_address(
    ns: str, iface: str, *, family: Literal[4, 6] = 4, nodad: bool = False, runner: Runner = run
) -> bool:
    """Isolated mode: put the metadata address on the DHCP port ``iface``; idempotent.

    Returns True when it was added, False when it was already there. With IPv6 the
    address is tentative until DAD ends (about a second) unless ``nodad``; a proxy
    can still bind it at once with ``freebind``.
    """
    wanted = _metadata_interface(family)
    if wanted in addresses(ns, iface, runner=runner):
        return False
    add_address(ns, iface, wanted, nodad=nodad, runner=runner)
    return True


def remove_metadata_address(ns: str, iface: str, *, family: Literal[4, 6] = 4, runner: Runner = run) -> bool:
    """Undo :func:`add_metadata_address`; returns False when it was not there."""
    wanted = _metadata_interface(family)
    if wanted not in addresses(ns, iface, runner=runner):
        return False
    delete_address(ns, iface, wanted, runner=runner)
    return True


# --- crossing in-process -------------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    # os.setns arrived in Python 3.12; we support 3.11.
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` inside namespace ``ns`` and return its result (or raise its error).

    ``fn`` runs in a new thread that enters ``ns`` with setns(2) and switches back
    before it ends; the calling thread's namespace never changes. Sockets ``fn``
    creates belong to ``ns`` for good; do blocking network calls that must happen
    from inside (connect, name-to-index lookups) in ``fn`` too.
    """
    path = NETNS_DIR / check_name(ns)
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            failure.append(PlumbingError(f"cannot open this thread's network namespace: {exc}"))
            return
        try:
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                failure.append(PlumbingError(f"no network namespace {ns!r} ({path} is missing)"))
                return
            try:
                _setns(target)
            except OSError as exc:
                failure.append(PlumbingError(f"cannot enter namespace {ns!r}: {exc}"))
                return
            finally:
                os.close(target)
            try:
                outcome.append(fn())
            except BaseException as exc:
                failure.append(exc)
            finally:
                # The thread ends right after, so a failed switch back cannot
                # leak; it is still reported rather than ignored.
                try:
                    _setns(home)
                except OSError as exc:
                    failure.append(PlumbingError(f"cannot leave namespace {ns!r}: {exc}"))
        finally:
            os.close(home)

    thread = threading.Thread(target=body, name=f"netns:{ns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def open_socket_in_netns(
    netns_name: str,
    family: socket.AddressFamily,
    sock_type: socket.SocketKind,
    bind_addr: IPAddress,
    port: int,
    *,
    freebind: bool = False,
    transparent: bool = False,
    reuse_addr: bool = True,
    reuse_port: bool = False,
    v6only: bool | None = None,
    interface: str | None = None,
    backlog: int = 128,
) -> socket.socket:
    """A socket bound (and, for TCP, listening) on ``bind_addr:port`` inside ``netns_name``.

    ``freebind`` allows binding an address not (yet) configured, such as a tentative
    IPv6 one; ``transparent`` sets IP_TRANSPARENT (needs CAP_NET_ADMIN).
    ``interface`` gives the scope of an IPv6 link-local address (fe80::a9fe:a9fe),
    resolved inside the namespace. ``reuse_port`` lets other sockets of this user
    that set it too bind the same address, the kernel spreading the connections over
    them (SO_REUSEPORT, socket(7)). The returned socket is blocking; asyncio's
    ``create_server(sock=...)`` takes it as is.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValidationError(f"family must be AF_INET or AF_INET6, not {family!r}")
    if (family == socket.AF_INET) != (bind_addr.version == 4):
        raise ValidationError(f"address {bind_addr} does not match family {family.name}")
    if sock_type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise ValidationError(f"socket type must be SOCK_STREAM or SOCK_DGRAM, not {sock_type!r}")
    if not 0 <= port <= 65535:
        raise ValidationError(f"port {port} outside 0..65535")
    if isinstance(bind_addr, ipaddress.IPv6Address) and bind_addr.is_link_local and interface is None:
        raise ValidationError(f"link-local address {bind_addr} needs an interface for its scope")
    if interface is not None:
        check_ifname(interface)

    def make() -> socket.socket:
        sock = socket.socket(family, sock_type)
        try:
            v6 = family == socket.AF_INET6
            if reuse_addr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
            if freebind:
                sock.setsockopt(level, _IPV6_FREEBIND if v6 else _IP_FREEBIND, 1)
            if transparent:
                sock.setsockopt(level, _IPV6_TRANSPARENT if v6 else _IP_TRANSPARENT, 1)
            if v6 and v6only is not None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            address: tuple[Any, ...] = (str(bind_addr), port)
            if v6:
                scope = socket.if_nametoindex(interface) if interface is not None else 0
                address = (str(bind_addr), port, 0, scope)
            sock.bind(address)
            if sock_type == socket.SOCK_STREAM:
                sock.listen(backlog)
        except OSError as exc:
            sock.close()
            where = f"{bind_addr}:{port}" + (f"%{interface}" if interface else "")
            raise PlumbingError(f"cannot bind {where} in namespace {netns_name!r}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    return call_in_netns(netns_name, make)
