"""Real dnsmasq serving real dhclient across a veth, both in namespaces the test made.

The network is examples/inventory.yaml's: net-a 10.0.0.0/24, gateway 10.0.0.1, DNS
10.0.0.2, DHCP port 10.0.0.3, instance web-1 fa:16:3e:00:00:05 -> 10.0.0.5.
dhclient runs with our script, config, lease and pid files only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from meta169.model import HostRoute, Network, Subnet
from meta169.plumbing import dhclient, dnsmasq
from meta169.plumbing import netns as nsmod
from meta169.plumbing.command import run
from meta169.plumbing.dhcp_options import ClasslessRoute

pytestmark = pytest.mark.e2e

IP = ipaddress.ip_address
NET = ipaddress.ip_network
MAC = "fa:16:3e:00:00:05"
MAC_2 = "fa:16:3e:00:00:06"
NET_A = Network(
    id="net-a",
    mtu=1450,
    subnets=(Subnet(cidr=NET("10.0.0.0/24"), gateway=IP("10.0.0.1"), dns=(IP("10.0.0.2"),)),),
)


def croute(destination: str, router: str) -> ClasslessRoute:
    return ClasslessRoute(ipaddress.IPv4Network(destination), ipaddress.IPv4Address(router))


WEB_1 = dnsmasq.DhcpHost(MAC, IP("10.0.0.5"), "web-1")
WEB_2 = dnsmasq.DhcpHost(MAC_2, IP("10.0.0.6"), "web-2")


@pytest.fixture(autouse=True)
def _tools(require_tools: Callable[..., None]) -> None:
    require_tools("dnsmasq", "dhclient")


def _segment(netns: Callable[[], str], veth: Callable[..., tuple[str, str]]) -> tuple[str, str, str, str]:
    dhcp_ns, vm_ns = netns(), netns()
    dhcp_if, vm_if = veth(dhcp_ns, vm_ns, mac_b=MAC)
    nsmod.add_address(dhcp_ns, dhcp_if, ipaddress.ip_interface("10.0.0.3/24"))
    return dhcp_ns, dhcp_if, vm_ns, vm_if


def _route_get(ns: str, dest: str) -> dict[str, object]:
    out = run(nsmod.ip_argv(ns, "-j", "route", "get", dest)).stdout
    route: dict[str, object] = json.loads(out)[0]
    return route


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it can no longer do anything)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_dhcp_isolated_lease_routes_metadata_via_dhcp_port(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]], state_dir: Path
) -> None:
    dhcp_ns, dhcp_if, vm_ns, vm_if = _segment(netns, veth)
    nsmod.add_metadata_address(dhcp_ns, dhcp_if)
    cfg = dnsmasq.DnsmasqConfig(
        network=NET_A,
        interface=dhcp_if,
        state_dir=state_dir / "dnsmasq",
        hosts=(WEB_1,),
        isolated=True,
        dhcp_ips=(IP("10.0.0.3"),),
        log_dhcp=True,
    )
    server = dnsmasq.start(cfg, dhcp_ns)
    try:
        client = dhclient.start(vm_ns, vm_if, state_dir / "dhclient")
        try:
            assert ipaddress.ip_interface("10.0.0.5/24") in nsmod.addresses(vm_ns, vm_if)
            route = _route_get(vm_ns, "169.254.169.254")
            assert route["gateway"] == "10.0.0.3"
            assert route["dev"] == vm_if
            assert _route_get(vm_ns, "198.51.100.1")["gateway"] == "10.0.0.1"

            expected = (
                croute("169.254.169.254/32", "10.0.0.3"),
                croute("0.0.0.0/0", "10.0.0.1"),
            )
            lease = dhclient.parse_leases(client.paths.lease.read_text())[-1]
            assert lease.fixed_address == "10.0.0.5"
            assert lease.interface == vm_if
            assert lease.classless_routes == expected
            assert lease.ms_classless_routes == expected  # option 249 carries the same bytes
            assert lease.options["host-name"] == "web-1"
            assert lease.options["interface-mtu"] == "1450"
            assert lease.options["domain-name-servers"] == "10.0.0.2"
            # The gateway stays option 3 for clients without RFC 3442 (neutron does the same).
            assert lease.options["routers"] == "10.0.0.1"

            # The whole isolated path: the guest reaches a listener on the DHCP port.
            listener = nsmod.open_socket_in_netns(
                dhcp_ns, socket.AF_INET, socket.SOCK_STREAM, IP("169.254.169.254"), 80
            )
            with listener:
                peers: list[str] = []

                def accept() -> None:
                    conn, peer = listener.accept()
                    conn.close()
                    peers.append(peer[0])

                thread = threading.Thread(target=accept, daemon=True)
                thread.start()

                def connect() -> None:
                    socket.create_connection(("169.254.169.254", 80), timeout=5).close()

                nsmod.call_in_netns(vm_ns, connect)
                thread.join(5)
            assert peers == ["10.0.0.5"]
        finally:
            dhclient.stop(client)
        assert not _alive(client.pid)
    finally:
        dnsmasq.stop(server)
    assert not _alive(server.pid)
    leases = (state_dir / "dnsmasq" / "leases").read_text()
    assert f" {MAC} 10.0.0.5 web-1 " in leases


def test_dhcp_routed_lease_routes_metadata_via_gateway_despite_zeroconf_route(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]], state_dir: Path
) -> None:
    dhcp_ns, dhcp_if, vm_ns, vm_if = _segment(netns, veth)
    host_routes = (
        HostRoute(NET("192.0.2.0/24"), IP("10.0.0.9")),
        HostRoute(NET("198.51.100.128/25"), IP("10.0.0.10")),
        HostRoute(NET("203.0.113.0/24"), IP("0.0.0.0")),  # on link
    )
    net = dataclasses.replace(NET_A, subnets=(dataclasses.replace(NET_A.subnets[0], host_routes=host_routes),))
    cfg = dnsmasq.DnsmasqConfig(network=net, interface=dhcp_if, state_dir=state_dir / "dnsmasq", hosts=(WEB_1,))
    server = dnsmasq.start(cfg, dhcp_ns)
    try:
        client = dhclient.start(vm_ns, vm_if, state_dir / "dhclient")
        try:
            # The seed's CentOS route: 169.254.0.0/16 on-link, metric 1002.
            run(nsmod.ip_argv(vm_ns, "route", "add", "169.254.0.0/16", "dev", vm_if, "metric", "1002"))
            assert _route_get(vm_ns, "169.254.169.254")["gateway"] == "10.0.0.1"  # the /32 wins
            # Our dhclient-script installed every option 121 route, whatever its width.
            assert _route_get(vm_ns, "192.0.2.77")["gateway"] == "10.0.0.9"
            assert _route_get(vm_ns, "198.51.100.200")["gateway"] == "10.0.0.10"
            assert _route_get(vm_ns, "198.51.100.1")["gateway"] == "10.0.0.1"
            on_link = _route_get(vm_ns, "203.0.113.5")
            assert "gateway" not in on_link
            assert on_link["dev"] == vm_if
            lease = dhclient.parse_leases(client.paths.lease.read_text())[-1]
            assert lease.classless_routes == (
                croute("169.254.169.254/32", "10.0.0.1"),
                croute("192.0.2.0/24", "10.0.0.9"),
                croute("198.51.100.128/25", "10.0.0.10"),
                croute("203.0.113.0/24", "0.0.0.0"),
                croute("0.0.0.0/0", "10.0.0.1"),
            )
        finally:
            dhclient.stop(client)
    finally:
        dnsmasq.stop(server)


def test_dnsmasq_reload_adds_host_and_keeps_existing_leases(
    netns: Callable[[], str], veth: Callable[..., tuple[str, str]], state_dir: Path
) -> None:
    dhcp_ns, dhcp_if, vm_ns, vm_if = _segment(netns, veth)
    cfg = dnsmasq.DnsmasqConfig(network=NET_A, interface=dhcp_if, state_dir=state_dir / "dnsmasq", hosts=(WEB_1,))
    server = dnsmasq.start(cfg, dhcp_ns)
    try:
        first = dhclient.start(vm_ns, vm_if, state_dir / "first")
        dhclient.stop(first)
        # Same wire, new guest: another MAC, known only after the reload.
        run(nsmod.ip_argv(vm_ns, "addr", "flush", "dev", vm_if))
        nsmod.set_mac(vm_ns, vm_if, MAC_2)
        dnsmasq.reload(server, dataclasses.replace(cfg, hosts=(WEB_1, WEB_2)))
        second = dhclient.start(vm_ns, vm_if, state_dir / "second")
        try:
            assert ipaddress.ip_interface("10.0.0.6/24") in nsmod.addresses(vm_ns, vm_if)
            assert dnsmasq.running(server)  # same process, PID unchanged
            leases = (state_dir / "dnsmasq" / "leases").read_text()
            assert f" {MAC} 10.0.0.5 web-1 " in leases  # the first lease survived SIGHUP
            assert f" {MAC_2} 10.0.0.6 web-2 " in leases
        finally:
            dhclient.stop(second)
    finally:
        dnsmasq.stop(server)


def test_dnsmasq_rendered_config_passes_dnsmasq_syntax_check(state_dir: Path) -> None:
    variants = [
        dnsmasq.DnsmasqConfig(network=NET_A, interface="tap-a", state_dir=state_dir / "r", hosts=(WEB_1,)),
        dnsmasq.DnsmasqConfig(
            network=NET_A,
            interface="tap-a",
            state_dir=state_dir / "i",
            hosts=(WEB_1,),
            isolated=True,
            dhcp_ips=(IP("10.0.0.3"),),
            inline_hosts=True,
            domain="example.org",
        ),
    ]
    for cfg in variants:
        paths = dnsmasq.write_files(cfg)
        out = subprocess.run(
            ["dnsmasq", "--test", f"--conf-file={paths.conf}"], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr
        assert "syntax check OK" in out.stderr


def test_dnsmasq_stop_leaves_foreign_pid_alone(state_dir: Path) -> None:
    # A PID that is not our dnsmasq (here: this test process) is never signalled.
    cfg = dnsmasq.DnsmasqConfig(network=NET_A, interface="tap-a", state_dir=state_dir)
    handle = dnsmasq.DnsmasqHandle(pid=os.getpid(), netns="m169t-none", paths=cfg.paths)
    assert not dnsmasq.running(handle)
    dnsmasq.stop(handle)  # would kill pytest if it signalled blindly
