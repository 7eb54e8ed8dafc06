"""dnsmasq configuration for one network: exact lines for examples/inventory.yaml's network."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from meta169.errors import ValidationError
from meta169.model import HostRoute, Instance, Network, Port, Subnet
from meta169.plumbing import dnsmasq

IP = ipaddress.ip_address
NETW = ipaddress.ip_network
STATE = Path("/var/lib/meta169/dhcp/net-a")
SUBNET_A = Subnet(cidr=NETW("10.0.0.0/24"), gateway=IP("10.0.0.1"), dns=(IP("10.0.0.2"),))
NET_A = Network(id="net-a", subnets=(SUBNET_A,))
WEB_1 = dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("10.0.0.5"), "web-1")

HEADER = [
    "# meta169: DHCP for network net-a (generated; edits are overwritten)",
    "interface=tap-net-a",
    "except-interface=lo",
    "bind-interfaces",
    "no-resolv",
    "no-hosts",
    "port=0",
    "pid-file=/var/lib/meta169/dhcp/net-a/dnsmasq.pid",
    "dhcp-leasefile=/var/lib/meta169/dhcp/net-a/leases",
    "log-facility=/var/lib/meta169/dhcp/net-a/dnsmasq.log",
]


def config(**overrides: object) -> dnsmasq.DnsmasqConfig:
    base = dnsmasq.DnsmasqConfig(network=NET_A, interface="tap-net-a", state_dir=STATE, hosts=(WEB_1,))
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def test_dnsmasq_render_config_routed_example_exact() -> None:
    assert dnsmasq.render_config(config()).splitlines() == [
        *HEADER,
        "dhcp-hostsfile=/var/lib/meta169/dhcp/net-a/hosts",
        "dhcp-range=set:subnet0,10.0.0.0,static,255.255.255.0,86400s",
        "dhcp-option=tag:subnet0,option:router,10.0.0.1",
        "dhcp-option=tag:subnet0,option:dns-server,10.0.0.2",
        "dhcp-option=tag:subnet0,option:classless-static-route,169.254.169.254/32,10.0.0.1,0.0.0.0/0,10.0.0.1",
        "dhcp-option=tag:subnet0,249,169.254.169.254/32,10.0.0.1,0.0.0.0/0,10.0.0.1",
        "dhcp-option-force=tag:subnet0,option:mtu,1500",
    ]


def test_dnsmasq_render_config_isolated_example_exact() -> None:
    cfg = config(isolated=True, dhcp_ips=(IP("10.0.0.3"),), inline_hosts=True)
    assert dnsmasq.render_config(cfg).splitlines() == [
        *HEADER,
        "dhcp-host=fa:16:3e:00:00:05,10.0.0.5,web-1",
        "dhcp-range=set:subnet0,10.0.0.0,static,255.255.255.0,86400s",
        # The gateway stays option 3, as neutron sends it, for clients without RFC 3442.
        "dhcp-option=tag:subnet0,option:router,10.0.0.1",
        "dhcp-option=tag:subnet0,option:dns-server,10.0.0.2",
        "dhcp-option=tag:subnet0,option:classless-static-route,169.254.169.254/32,10.0.0.3,0.0.0.0/0,10.0.0.1",
        "dhcp-option=tag:subnet0,249,169.254.169.254/32,10.0.0.3,0.0.0.0/0,10.0.0.1",
        "dhcp-option-force=tag:subnet0,option:mtu,1500",
    ]


def test_dnsmasq_render_config_isolated_without_gateway_suppresses_router() -> None:
    net = Network(id="net-a", mtu=1450, subnets=(Subnet(cidr=NETW("10.0.0.0/24"), dns=(IP("10.0.0.2"),)),))
    lines = dnsmasq.render_config(config(network=net, isolated=True, dhcp_ips=(IP("10.0.0.3"),))).splitlines()
    # A valueless option stops dnsmasq from announcing itself as the router.
    assert "dhcp-option=tag:subnet0,option:router" in lines
    assert "dhcp-option=tag:subnet0,option:classless-static-route,169.254.169.254/32,10.0.0.3" in lines
    assert "dhcp-option=tag:subnet0,249,169.254.169.254/32,10.0.0.3" in lines
    assert "dhcp-option-force=tag:subnet0,option:mtu,1450" in lines


def test_dnsmasq_render_config_optional_settings() -> None:
    cfg = config(domain="example.org", enable_dns=True, log_dhcp=True, lease_seconds=None, user="dnsmasq")
    lines = dnsmasq.render_config(cfg).splitlines()
    assert "port=0" not in lines
    assert "user=dnsmasq" in lines
    assert "log-dhcp" in lines
    assert "dhcp-range=set:subnet0,10.0.0.0,static,255.255.255.0,infinite" in lines
    assert "dhcp-option=tag:subnet0,option:domain-name,example.org" in lines
    assert "dhcp-option=tag:subnet0,option:domain-search,example.org" in lines


def test_dnsmasq_render_config_routed_without_gateway_has_no_routes() -> None:
    net = Network(id="net-a", subnets=(Subnet(cidr=NETW("10.0.0.0/24")),))
    lines = dnsmasq.render_config(config(network=net, hosts=())).splitlines()
    assert "dhcp-option=tag:subnet0,option:router" in lines
    assert not any("classless" in line or ",249," in line for line in lines)


def test_dnsmasq_render_config_host_routes_in_order() -> None:
    subnet = dataclasses.replace(SUBNET_A, host_routes=(HostRoute(NETW("192.0.2.0/24"), IP("10.0.0.9")),))
    lines = dnsmasq.render_config(config(network=Network(id="net-a", subnets=(subnet,)))).splitlines()
    assert (
        "dhcp-option=tag:subnet0,option:classless-static-route,"
        "169.254.169.254/32,10.0.0.1,192.0.2.0/24,10.0.0.9,0.0.0.0/0,10.0.0.1"
    ) in lines


def test_dnsmasq_render_config_dual_stack_and_skipped_subnets() -> None:
    net = Network(
        id="net-a",
        subnets=(
            SUBNET_A,
            Subnet(cidr=NETW("10.0.1.0/24"), dhcp=False),
            Subnet(cidr=NETW("2001:db8::/64"), dns=(IP("2001:db8::2"),), ipv6_mode="dhcpv6-stateful"),
            Subnet(cidr=NETW("2001:db8:1::/64"), ipv6_mode="slaac"),
        ),
    )
    hosts = (
        WEB_1,
        dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("2001:db8::5"), "web-1"),
        dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("10.0.1.5"), "web-1"),
        dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("2001:db8:1::5"), "web-1"),
    )
    cfg = config(network=net, hosts=hosts, domain="example.org")
    lines = dnsmasq.render_config(cfg).splitlines()
    ranges = [line for line in lines if line.startswith("dhcp-range=")]
    # Tags follow the subnet's position, so they stay stable when DHCP is toggled.
    assert ranges == [
        "dhcp-range=set:subnet0,10.0.0.0,static,255.255.255.0,86400s",
        "dhcp-range=set:subnet2,2001:db8::,static,64,86400s",
    ]
    assert "dhcp-option=tag:subnet2,option6:dns-server,[2001:db8::2]" in lines
    assert "dhcp-option=tag:subnet2,option6:domain-search,example.org" in lines
    assert not any("subnet1" in line or "subnet3" in line for line in lines)
    assert dnsmasq.render_hosts(cfg) == "fa:16:3e:00:00:05,10.0.0.5,web-1\nfa:16:3e:00:00:05,[2001:db8::5],web-1\n"


def test_dnsmasq_render_hosts_file_exact() -> None:
    other = dnsmasq.DhcpHost("FA-16-3E-00-00-06", IP("10.0.0.6"))
    assert dnsmasq.render_hosts(config(hosts=(WEB_1, other))) == (
        "fa:16:3e:00:00:05,10.0.0.5,web-1\nfa:16:3e:00:00:06,10.0.0.6\n"
    )


def test_dnsmasq_inline_hosts_leave_no_hosts_file_line() -> None:
    lines = dnsmasq.render_config(config(inline_hosts=True)).splitlines()
    assert not any(line.startswith("dhcp-hostsfile=") for line in lines)
    assert "dhcp-host=fa:16:3e:00:00:05,10.0.0.5,web-1" in lines


def test_dnsmasq_argv_reads_only_our_config() -> None:
    assert dnsmasq.dnsmasq_argv(config()) == [
        "dnsmasq",
        "--conf-file=/var/lib/meta169/dhcp/net-a/dnsmasq.conf",
        "--keep-in-foreground",
    ]


def test_dnsmasq_paths_live_in_state_dir() -> None:
    paths = config().paths
    assert {p.parent for p in (paths.conf, paths.hosts, paths.leases, paths.pid, paths.log, paths.stderr)} == {STATE}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"isolated": True}, "no DHCP port IP"),
        ({"isolated": True, "dhcp_ips": (IP("10.9.0.3"),)}, "in no subnet"),
        ({"hosts": (dnsmasq.DhcpHost("fa:16:3e:00:00:07", IP("10.9.0.7")),)}, "in no subnet"),
        ({"state_dir": Path("relative/dir")}, "must be absolute"),
        ({"state_dir": Path("/tmp/a,b")}, "cannot take"),
        ({"lease_seconds": 60}, "minimum of 120s"),
        ({"domain": "bad domain"}, "not a DNS name"),
        ({"interface": "an-interface-name-too-long"}, "interface name"),
        ({"user": "Root; rm"}, "not a user name"),
    ],
)
def test_dnsmasq_config_rejects_bad_settings(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**overrides)


@pytest.mark.parametrize("hostname", ["web.1", "-web", "web_1", "a" * 64, "web-1\n"])
def test_dnsmasq_host_rejects_names_that_are_not_one_label(hostname: str) -> None:
    with pytest.raises(ValidationError, match="single DNS label"):
        dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("10.0.0.5"), hostname)


def test_dnsmasq_hosts_for_network_takes_ports_on_that_network() -> None:
    web = Instance(
        uuid="6f1f2a5e-4f49-4b33-9d80-4a3f2d7c9a10",
        name="web-1",
        hostname="web-1.example.org",
        ports=(
            Port(network_id="net-a", mac="fa:16:3e:00:00:05", ips=(IP("10.0.0.5"), IP("2001:db8::5"))),
            Port(network_id="net-b", mac="fa:16:3e:00:01:05", ips=(IP("10.1.0.5"),), device_number=1),
        ),
    )
    assert dnsmasq.hosts_for_network("net-a", [web]) == (
        dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("10.0.0.5"), "web-1"),
        dnsmasq.DhcpHost("fa:16:3e:00:00:05", IP("2001:db8::5"), "web-1"),
    )
