"""Router-mode rules in real namespaces: exact chains, idempotence, clean removal, and traffic.

Everything happens in namespaces these tests create; none is linked to the host.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Literal

import pytest

from meta169.plumbing import iptables
from meta169.plumbing import netns as nsmod
from meta169.plumbing.command import run
from tests.e2e.conftest import RoutedGuest

pytestmark = pytest.mark.e2e

FOREIGN = {
    "nat": "-A PREROUTING -s 192.0.2.7/32 -j ACCEPT",
    "mangle": "-A PREROUTING -s 192.0.2.7/32 -j ACCEPT",
    "filter": "-A INPUT -s 192.0.2.7/32 -j ACCEPT",
}
FOREIGN_V6 = {t: r.replace("192.0.2.7/32", "2001:db8::7/128") for t, r in FOREIGN.items()}


def _tables(ns: str, family: Literal[4, 6]) -> dict[str, iptables.SavedTable]:
    return iptables.parse_save(iptables.save(ns, family))


def _add_foreign(ns: str, family: Literal[4, 6]) -> None:
    tool = "iptables" if family == 4 else "ip6tables"
    for table, rule in (FOREIGN if family == 4 else FOREIGN_V6).items():
        run(nsmod.in_netns(ns, [tool, "-t", table, *rule.split()]))


@pytest.mark.parametrize("family", [4, 6])
def test_iptables_apply_installs_exactly_our_chains_and_jumps(netns: Callable[[], str], family: Literal[4, 6]) -> None:
    ns = netns()
    _add_foreign(ns, family)
    before = _tables(ns, family)
    rules = iptables.router_rules(["m169qr-a", "m169qr-b"], family=family)
    iptables.apply(ns, rules)
    after = _tables(ns, family)
    expected = iptables.expected_lines(rules)
    foreign = FOREIGN if family == 4 else FOREIGN_V6
    for table in ("nat", "mangle", "filter"):
        ours = {c for t, c in rules.chains if t == table}
        assert set(after[table].chains) - set(before[table].chains) == ours
        assert set(after[table].rules) - set(before[table].rules) == set(expected[table])
        assert foreign[table] in after[table].rules
        # Exactly the lines the doctor expects, in iptables-save's order...
        assert tuple(r for r in after[table].rules if r not in before[table].rules) == expected[table]
        # ...and each jump first in its built-in chain, ahead of the foreign rule.
        for jump in (j for j in rules.jumps if j.table == table):
            in_builtin = [r for r in after[table].rules if r.split()[1] == jump.builtin]
            assert in_builtin[0] == jump.save_line()


@pytest.mark.parametrize("family", [4, 6])
def test_iptables_apply_twice_is_idempotent(netns: Callable[[], str], family: Literal[4, 6]) -> None:
    ns = netns()
    rules = iptables.router_rules(["m169qr-a"], family=family)
    iptables.apply(ns, rules)
    once = _tables(ns, family)
    iptables.apply(ns, rules)
    assert _tables(ns, family) == once


def test_iptables_apply_replaces_rules_for_changed_interfaces(netns: Callable[[], str]) -> None:
    ns = netns()
    iptables.apply(ns, iptables.router_rules(["m169qr-a"]))
    iptables.apply(ns, iptables.router_rules(["m169qr-b"]))
    nat = _tables(ns, 4)["nat"].rules
    assert not any("m169qr-a" in r for r in nat)
    assert sum("m169qr-b" in r for r in nat) == 1
    assert nat.count("-A PREROUTING -j meta169-PREROUTING") == 1


@pytest.mark.parametrize("family", [4, 6])
def test_iptables_remove_restores_tables_and_keeps_foreign_rules(
    netns: Callable[[], str], family: Literal[4, 6]
) -> None:
    ns = netns()
    _add_foreign(ns, family)
    before = _tables(ns, family)
    iptables.apply(ns, iptables.router_rules(["m169qr-a"], family=family))
    assert _tables(ns, family) != before
    iptables.remove(ns, family)
    assert _tables(ns, family) == before
    iptables.remove(ns, family)  # nothing left to remove: a no-op
    assert _tables(ns, family) == before


# --- traffic through a router namespace -------------------------------------------


def _accept_once(server: socket.socket, seen: dict[str, object]) -> threading.Thread:
    def serve() -> None:
        conn, peer = server.accept()
        with conn:
            seen["peer"] = peer[0]
            conn.sendall(b"proxy")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _connect(ns: str, host: str, port: int, timeout: float = 3.0) -> bytes | None:
    """Connect from inside ``ns``; the greeting, or None when the SYN is dropped."""

    def go() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((host, port))
            except TimeoutError:
                return None
            return sock.recv(16)

    return nsmod.call_in_netns(ns, go)


def test_iptables_router_rules_redirect_metadata_to_proxy_port_only(routed_guest: RoutedGuest) -> None:
    router, vm = routed_guest.router, routed_guest.vm

    proxy = nsmod.open_socket_in_netns(
        router, socket.AF_INET, socket.SOCK_STREAM, ipaddress.ip_address("0.0.0.0"), iptables.DEFAULT_PROXY_PORT
    )
    seen: dict[str, object] = {}
    with proxy:
        thread = _accept_once(proxy, seen)
        assert _connect(vm, "169.254.169.254", 80) == b"proxy"
        thread.join(5)
        assert seen["peer"] == "10.0.0.5"  # the caller's own address reaches the proxy
        # The proxy port itself is closed to guests: only the redirect leads there.
        assert _connect(vm, "10.0.0.1", iptables.DEFAULT_PROXY_PORT, timeout=1.0) is None
        iptables.remove(router)
        thread = _accept_once(proxy, seen)
        assert _connect(vm, "10.0.0.1", iptables.DEFAULT_PROXY_PORT) == b"proxy"
        thread.join(5)


def test_iptables_marked_metadata_packets_are_never_forwarded(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]]
) -> None:
    # vm -- router -- upstream, where upstream owns 169.254.169.254 (a real cloud's
    # metadata service, say). Without the REDIRECT, our mark must stop the router
    # from forwarding the guest's request there.
    router, vm, upstream = netns(), netns(), netns()
    router_in, vm_if = veth(router, vm)
    router_out, up_if = veth(router, upstream)
    nsmod.add_address(router, router_in, ipaddress.ip_interface("10.0.0.1/24"))
    nsmod.add_address(vm, vm_if, ipaddress.ip_interface("10.0.0.5/24"))
    nsmod.add_address(router, router_out, ipaddress.ip_interface("192.0.2.1/24"))
    nsmod.add_address(upstream, up_if, ipaddress.ip_interface("192.0.2.2/24"))
    nsmod.add_metadata_address(upstream, up_if)
    nsmod.add_route(vm, "default", via=ipaddress.ip_address("10.0.0.1"))
    nsmod.add_route(upstream, ipaddress.ip_network("10.0.0.0/24"), via=ipaddress.ip_address("192.0.2.1"))
    nsmod.add_route(router, ipaddress.ip_network("169.254.169.254/32"), via=ipaddress.ip_address("192.0.2.2"))
    run(nsmod.in_netns(router, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))

    server = nsmod.open_socket_in_netns(
        upstream, socket.AF_INET, socket.SOCK_STREAM, ipaddress.ip_address("169.254.169.254"), 80
    )
    seen: dict[str, object] = {}
    with server:
        thread = _accept_once(server, seen)
        # Control: with no rules the router forwards the request upstream.
        assert _connect(vm, "169.254.169.254", 80) == b"proxy"
        thread.join(5)
        iptables.apply(router, iptables.router_rules([router_in]))
        # Simulate a lost REDIRECT: only the mark and the FORWARD drop are left.
        run(nsmod.in_netns(router, ["iptables", "-t", "nat", "-F", "meta169-PREROUTING"]))
        assert _connect(vm, "169.254.169.254", 80, timeout=1.0) is None
