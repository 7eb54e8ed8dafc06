"""dhclient: our config, argv, packaged script and lease file parsing."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from meta169.errors import ValidationError
from meta169.plumbing import dhclient
from meta169.plumbing.dhcp_options import ClasslessRoute

# What dhclient 4.4.3 wrote in the e2e test for the isolated example network.
LEASE = """\
default-duid "\\000\\001\\000\\001";
lease {
  interface "m169xsb";
  fixed-address 10.0.0.5;
  option subnet-mask 255.255.255.0;
  option routers 10.0.0.1;
  option dhcp-lease-time 86400;
  option domain-name-servers 10.0.0.2;
  option dhcp-server-identifier 10.0.0.3;
  option interface-mtu 1500;
  option rfc3442-classless-static-routes 32,169,254,169,254,10,0,0,3,0,10,0,0,1;
  option host-name "web-1";
  option ms-classless-static-routes 32,169,254,169,254,10,0,0,3,0,10,0,0,1;
  renew 0 2026/11/29 09:56:10;
  rebind 0 2026/11/29 20:45:01;
  expire 0 2026/11/29 23:45:01;
}
lease {
  interface "m169xsb";
  fixed-address 10.0.0.6;
  option subnet-mask 255.255.255.0;
  expire 0 2026/11/30 23:45:01;
}
"""

ROUTES = (
    ClasslessRoute(ipaddress.IPv4Network("169.254.169.254/32"), ipaddress.IPv4Address("10.0.0.3")),
    ClasslessRoute(ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Address("10.0.0.1")),
)


def test_dhclient_parse_leases_reads_every_block() -> None:
    first, second = dhclient.parse_leases(LEASE)
    assert (first.interface, first.fixed_address) == ("m169xsb", "10.0.0.5")
    assert first.options["host-name"] == "web-1"
    assert first.options["routers"] == "10.0.0.1"
    assert first.statements["expire"] == "0 2026/11/29 23:45:01"
    assert first.classless_routes == ROUTES
    assert first.ms_classless_routes == ROUTES
    assert second.fixed_address == "10.0.0.6"
    assert second.classless_routes == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lease {\n  fixed-address 10.0.0.5\n}\n", "cannot parse"),
        ("lease {\nlease {\n", "nested"),
        ("}\n", "outside a lease block"),
        ("lease {\n  fixed-address 10.0.0.5;\n", "ends inside"),
    ],
)
def test_dhclient_parse_leases_rejects_broken_files(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        dhclient.parse_leases(text)


def test_dhclient_render_conf_declares_and_requests_classless_routes() -> None:
    assert dhclient.render_conf(timeout=7).splitlines() == [
        "# meta169: dhclient configuration (generated)",
        "option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;",
        "option ms-classless-static-routes code 249 = array of unsigned integer 8;",
        "timeout 7;",
        "initial-interval 1;",
        "request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers, domain-search, "
        "host-name, interface-mtu, rfc3442-classless-static-routes, ms-classless-static-routes;",
    ]
    assert "249" not in dhclient.render_conf(request_ms_routes=False)
    with pytest.raises(ValidationError):
        dhclient.render_conf(timeout=0)


def test_dhclient_argv_uses_only_our_files() -> None:
    paths = dhclient.DhclientPaths(Path("/tmp/m169t-x/dhcp"), "eth0")
    assert dhclient.dhclient_argv(paths, script=Path("/opt/dhclient-script")) == [
        "dhclient", "-4", "-1", "-v",
        "-sf", "/opt/dhclient-script",
        "-cf", "/tmp/m169t-x/dhcp/dhclient-eth0.conf",
        "-lf", "/tmp/m169t-x/dhcp/dhclient-eth0.leases",
        "-pf", "/tmp/m169t-x/dhcp/dhclient-eth0.pid",
        "eth0",
    ]  # fmt: skip


def test_dhclient_packaged_script_is_executable_and_never_names_host_files() -> None:
    path = dhclient.script_path()
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "/etc/" not in code
    assert "resolv" not in code
    assert "new_rfc3442_classless_static_routes" in code
