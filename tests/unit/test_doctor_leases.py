"""What DHCP gave, from each client's lease format."""

from __future__ import annotations

import ipaddress

import pytest

from meta169.doctor.leases import (
    parse_dhclient,
    parse_lease_file,
    parse_nmcli_dhcp4,
    parse_sd_lease,
    parse_udhcpc_env,
)
from meta169.errors import ValidationError

V4 = ipaddress.IPv4Address


def _routes(lease: object) -> list[str]:
    return [str(r) for r in lease.routes]  # type: ignore[attr-defined]


DHCLIENT = """\
lease {
  interface "eth0";
  fixed-address 10.0.0.11;
  option routers 10.0.0.1;
  option dhcp-server-identifier 10.0.0.2;
  option rfc3442-classless-static-routes 32,169,254,169,254,10,0,0,2,0,10,0,0,1;
}
lease {
  interface "eth0";
  fixed-address 10.0.0.12;
  option routers 10.0.0.1;
  option unknown-121 20:a9:fe:a9:fe:a:0:0:1:0:a:0:0:1;
}
"""


def test_doctor_leases_dhclient_option_121_in_both_spellings() -> None:
    first, second = parse_dhclient(DHCLIENT, "/var/lib/dhcp/dhclient.eth0.leases")
    assert (first.interface, first.address, first.server) == ("eth0", V4("10.0.0.11"), V4("10.0.0.2"))
    assert _routes(first) == ["169.254.169.254/32 via 10.0.0.2", "0.0.0.0/0 via 10.0.0.1"]
    assert first.has_metadata_host_route
    # Undeclared, dhclient prints the option as colon hex with leading zeros dropped.
    assert _routes(second) == ["169.254.169.254/32 via 10.0.0.1", "0.0.0.0/0 via 10.0.0.1"]
    assert any(e.startswith("option rfc3442-classless-static-routes 32,169") for e in first.evidence)


def test_doctor_leases_dhclient_without_option_121_records_its_absence() -> None:
    text = 'lease {\n  interface "eth0";\n  fixed-address 10.0.0.5;\n  option routers 10.0.0.1;\n}\n'
    (lease,) = parse_dhclient(text, "/var/lib/dhclient/dhclient-eth0.leases")
    assert lease.records_routes and lease.routes == ()
    assert lease.routers == (V4("10.0.0.1"),)
    assert lease.metadata_route is None


def test_doctor_leases_networkd_current_format_with_option_249() -> None:
    lease = parse_sd_lease(
        "# This is private data. Do not parse.\nADDRESS=10.0.0.13\nROUTER=10.0.0.1\nSERVER_ADDRESS=10.0.0.2\n"
        "CLASSLESS_ROUTES=169.254.169.254/32,10.0.0.1 0.0.0.0/0,10.0.0.1\nOPTION_249=20a9fea9fe0a000001000a000001\n",
        "/run/systemd/netif/leases/2", interface="ens3",
    )  # fmt: skip
    assert _routes(lease) == ["169.254.169.254/32 via 10.0.0.1", "0.0.0.0/0 via 10.0.0.1"]
    assert [str(r) for r in lease.ms_classless or ()] == _routes(lease)
    assert lease.server == V4("10.0.0.2")


def test_doctor_leases_networkd_before_systemd_246_wrote_routes() -> None:
    lease = parse_sd_lease("ADDRESS=10.0.0.13\nROUTES=169.254.169.254/32,10.0.0.2 0.0.0.0/0,10.0.0.1\n", "/x")
    assert lease.has_metadata_host_route
    assert lease.evidence[0].startswith("ROUTES=")


def test_doctor_leases_networkd_without_routes_means_none_were_sent() -> None:
    lease = parse_sd_lease("ADDRESS=10.0.0.13\nROUTER=10.0.0.1\n", "/run/systemd/netif/leases/2")
    assert lease.records_routes and lease.routes == ()


def test_doctor_leases_networkd_json_format() -> None:
    lease = parse_sd_lease(
        '{"Address":[10,0,0,13],"Router":[[10,0,0,1]],"Classless_Routes":[{"Destination":[169,254,169,254],'
        '"DestinationString":"169.254.169.254","DestinationPrefixLength":32,"Gateway":[10,0,0,1]}],'
        '"Private_Options":[{"Option":249,"Data":"20a9fea9fe0a000001"}]}',
        "/run/systemd/netif/leases/2",
    )
    assert lease.address == V4("10.0.0.13") and lease.routers == (V4("10.0.0.1"),)
    assert _routes(lease) == ["169.254.169.254/32 via 10.0.0.1"]
    assert [str(r) for r in lease.ms_classless or ()] == ["169.254.169.254/32 via 10.0.0.1"]


def test_doctor_leases_networkmanager_internal_lease_cannot_tell() -> None:
    (lease,) = parse_lease_file(
        "/var/lib/NetworkManager/internal-1dd9a779-d327-56e1-8454-c65e2556c12c-ens3.lease",
        "# This is private data. Do not parse.\nADDRESS=10.0.0.19\n", {},
    )  # fmt: skip
    assert (lease.client, lease.interface, lease.address) == ("networkmanager", "ens3", V4("10.0.0.19"))
    assert not lease.records_routes  # n-dhcp4 stores only the address


def test_doctor_leases_nmcli_options_per_device() -> None:
    text = (
        "GENERAL.DEVICE:                         eth0\n"
        "DHCP4.OPTION[1]:                        classless_static_routes = "
        "169.254.169.254/32 10.0.0.1 0.0.0.0/0 10.0.0.1\n"
        "DHCP4.OPTION[2]:                        ip_address = 10.0.0.20\n"
        "DHCP4.OPTION[3]:                        routers = 10.0.0.1\n"
        "DHCP4.OPTION[4]:                        requested_classless_static_routes = 1\n\n"
        "GENERAL.DEVICE:                         lo\n"
    )
    (lease,) = parse_nmcli_dhcp4(text)
    assert lease.interface == "eth0" and lease.has_metadata_host_route
    assert lease.evidence[0] == "DHCP4.OPTION classless_static_routes = 169.254.169.254/32 10.0.0.1 0.0.0.0/0 10.0.0.1"


def test_doctor_leases_udhcpc_environment_dump() -> None:
    lease = parse_udhcpc_env(
        "export interface='eth0'\nexport ip='10.0.0.15'\nexport router='10.0.0.1'\nexport serverid='10.0.0.2'\n"
        "export staticroutes='169.254.169.254/32 10.0.0.1 0.0.0.0/0 10.0.0.1'\n",
        "/run/udhcpc/eth0.env",
    )
    assert (lease.interface, lease.address, lease.server) == ("eth0", V4("10.0.0.15"), V4("10.0.0.2"))
    assert lease.has_metadata_host_route


def test_doctor_leases_dispatch_by_path_and_content() -> None:
    assert parse_lease_file("/run/systemd/netif/leases/3", "ADDRESS=10.0.0.9\n", {3: "ens4"})[0].interface == "ens4"
    assert parse_lease_file("/tmp/lab/vm-a1/dhclient-eth0.leases", DHCLIENT, {})[0].client == "dhclient"
    assert parse_lease_file("/etc/NetworkManager/system-connections/x.nmconnection", "[ipv4]\n", {}) == ()


def test_doctor_leases_refuse_a_truncated_option() -> None:
    with pytest.raises(ValidationError):
        parse_sd_lease("ADDRESS=10.0.0.9\nOPTION_249=20a9fe\n", "/x")
