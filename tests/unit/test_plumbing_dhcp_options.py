"""Option 121/249: route choice and order, RFC 3442 encoding, dnsmasq and dhclient text forms."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meta169.errors import ValidationError
from meta169.model import HostRoute, Subnet
from meta169.plumbing import dhcp_options as opts
from meta169.plumbing.dhcp_options import ClasslessRoute

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def route(dest: str, router: str) -> ClasslessRoute:
    return ClasslessRoute(NET(dest), IP(router))


NET_A = Subnet(cidr=NET("10.0.0.0/24"), gateway=IP("10.0.0.1"), dns=(IP("10.0.0.2"),))


# RFC 3442 section 3, the table of destination descriptors.
@pytest.mark.parametrize(
    ("destination", "descriptor"),
    [
        ("0.0.0.0/0", [0]),
        ("10.0.0.0/8", [8, 10]),
        ("10.0.0.0/24", [24, 10, 0, 0]),
        ("10.17.0.0/16", [16, 10, 17]),
        ("10.27.129.0/24", [24, 10, 27, 129]),
        ("10.229.0.128/25", [25, 10, 229, 0, 128]),
        ("10.198.122.47/32", [32, 10, 198, 122, 47]),
    ],
)
def test_dhcp_options_encode_matches_rfc3442_descriptor_table(destination: str, descriptor: list[int]) -> None:
    encoded = opts.encode([route(destination, "192.0.2.1")])
    assert list(encoded) == [*descriptor, 192, 0, 2, 1]
    assert opts.decode(encoded) == (route(destination, "192.0.2.1"),)


def test_dhcp_options_encode_isolated_example() -> None:
    routes = (route("169.254.169.254/32", "10.0.0.3"), route("0.0.0.0/0", "10.0.0.1"))
    assert opts.encode(routes) == bytes([32, 169, 254, 169, 254, 10, 0, 0, 3, 0, 10, 0, 0, 1])
    assert opts.to_dhclient(routes) == "32,169,254,169,254,10,0,0,3,0,10,0,0,1"
    assert opts.to_dnsmasq(routes) == "169.254.169.254/32,10.0.0.3,0.0.0.0/0,10.0.0.1"


def test_dhcp_options_decode_zeroes_host_bits_as_rfc3442_requires() -> None:
    # width 25 with 10.229.0.255: "the client MUST zero any bits in the subnet number
    # where the corresponding bit in the mask is zero".
    assert opts.decode(bytes([25, 10, 229, 0, 255, 10, 0, 0, 1])) == (route("10.229.0.128/25", "10.0.0.1"),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes([33, 1, 2, 3, 4, 5, 10, 0, 0, 1]), "exceeds 32"),
        (bytes([32, 169, 254, 169, 254, 10, 0, 0]), "needs 9 octets, 8 left"),
        (bytes([24, 10, 0]), "needs 8 octets, 3 left"),
        (bytes([0, 10, 0, 0, 1, 8]), "needs 6 octets, 1 left"),
    ],
)
def test_dhcp_options_decode_rejects_malformed_data(data: bytes, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        opts.decode(data)


@pytest.mark.parametrize(
    "text",
    [
        "32,169,254,169,254,10,0,0,3,0,10,0,0,1",
        "32,169,254,169,254,10,0,0,3,0,10,0,0,1;",
        "32 169 254 169 254 10 0 0 3 0 10 0 0 1",  # dhclient-script's environment form
        " 32, 169,254,169,254,10,0,0,3,0,10,0,0,1 ",
    ],
)
def test_dhcp_options_from_dhclient_accepts_lease_and_environment_forms(text: str) -> None:
    assert opts.from_dhclient(text) == (route("169.254.169.254/32", "10.0.0.3"), route("0.0.0.0/0", "10.0.0.1"))


@pytest.mark.parametrize("text", ["32,169,x", "32,169,254,169,256,10,0,0,3", "0x20,1", "32,,1"])
def test_dhcp_options_from_dhclient_rejects_garbage(text: str) -> None:
    with pytest.raises(ValidationError):
        opts.from_dhclient(text)


def test_dhcp_options_from_dhclient_empty_is_no_routes() -> None:
    assert opts.from_dhclient("") == ()


@pytest.mark.parametrize(
    "text", ["169.254.169.254/32", "169.254.169.254/32,10.0.0.3,0.0.0.0/0", "10.0.0.1/24,10.0.0.1", "a,b"]
)
def test_dhcp_options_from_dnsmasq_rejects_bad_lists(text: str) -> None:
    with pytest.raises(ValidationError):
        opts.from_dnsmasq(text)


# --- which routes, in which order ---------------------------------------------------

HOST_ROUTES = (
    HostRoute(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_address("10.0.0.9")),
    HostRoute(ipaddress.ip_network("198.51.100.128/25"), ipaddress.ip_address("10.0.0.10")),
)


@pytest.mark.parametrize(
    ("subnet", "isolated", "dhcp_ip", "expected"),
    [
        pytest.param(
            NET_A, False, None,
            "169.254.169.254/32,10.0.0.1,0.0.0.0/0,10.0.0.1",
            id="routed: metadata via the gateway",
        ),
        pytest.param(
            NET_A, True, "10.0.0.3",
            "169.254.169.254/32,10.0.0.3,0.0.0.0/0,10.0.0.1",
            id="isolated: metadata via the DHCP port",
        ),
        pytest.param(
            Subnet(cidr=NET("10.0.0.0/24")), True, "10.0.0.3",
            "169.254.169.254/32,10.0.0.3",
            id="isolated without gateway: no default route",
        ),
        pytest.param(
            Subnet(cidr=NET("10.0.0.0/24")), False, None,
            "",
            id="routed without gateway: nothing to push",
        ),
        pytest.param(
            Subnet(cidr=NET("10.0.0.0/24"), gateway=IP("10.0.0.1"), host_routes=HOST_ROUTES), False, None,
            "169.254.169.254/32,10.0.0.1,192.0.2.0/24,10.0.0.9,198.51.100.128/25,10.0.0.10,0.0.0.0/0,10.0.0.1",
            id="host routes between the metadata route and the default",
        ),
        pytest.param(
            Subnet(
                cidr=NET("10.0.0.0/24"),
                host_routes=(HostRoute(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.0.0.254")),),
            ),
            True, "10.0.0.3",
            "169.254.169.254/32,10.0.0.3,0.0.0.0/0,10.0.0.254",
            id="a default host route stands in for a missing gateway",
        ),
        pytest.param(
            Subnet(
                cidr=NET("10.0.0.0/24"),
                gateway=IP("10.0.0.1"),
                host_routes=(
                    HostRoute(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.0.0.254")),
                    HostRoute(ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_address("10.0.0.77")),
                    HostRoute(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_address("10.0.0.9")),
                    HostRoute(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_address("10.0.0.8")),
                ),
            ),
            False, None,
            "169.254.169.254/32,10.0.0.1,192.0.2.0/24,10.0.0.9,0.0.0.0/0,10.0.0.1",
            id="the gateway beats a default host route; ours beats a metadata host route; first duplicate wins",
        ),
    ],
)  # fmt: skip
def test_dhcp_options_classless_routes_order(
    subnet: Subnet, isolated: bool, dhcp_ip: str | None, expected: str
) -> None:
    routes = opts.classless_routes(subnet, isolated=isolated, dhcp_ip=IP(dhcp_ip) if dhcp_ip else None)
    assert opts.to_dnsmasq(routes) == expected


@pytest.mark.parametrize(
    ("subnet", "isolated", "dhcp_ip", "message"),
    [
        (NET_A, True, None, "needs the DHCP port IP"),
        (NET_A, True, IP("10.0.1.3"), "outside subnet"),
        (Subnet(cidr=ipaddress.ip_network("2001:db8::/64")), False, None, "IPv4 only"),
    ],
)
def test_dhcp_options_classless_routes_rejects_impossible_requests(
    subnet: Subnet, isolated: bool, dhcp_ip: IP | None, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        opts.classless_routes(subnet, isolated=isolated, dhcp_ip=dhcp_ip)


def test_dhcp_options_classless_route_rejects_ipv6() -> None:
    with pytest.raises(ValidationError, match="not IPv4"):
        ClasslessRoute(ipaddress.ip_network("2001:db8::/64"), IP("10.0.0.1"))  # type: ignore[arg-type]


# --- round trips ------------------------------------------------------------------------

routes_strategy = st.lists(
    st.builds(
        lambda addr, width, router: ClasslessRoute(NET((addr, width), strict=False), IP(router)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
        st.integers(0, 2**32 - 1),
    ),
    max_size=12,
)


@given(routes_strategy)
def test_dhcp_options_bytes_round_trip(routes: list[ClasslessRoute]) -> None:
    assert opts.decode(opts.encode(routes)) == tuple(routes)


@given(routes_strategy)
def test_dhcp_options_dhclient_and_dnsmasq_text_round_trip(routes: list[ClasslessRoute]) -> None:
    assert opts.from_dhclient(opts.to_dhclient(routes)) == tuple(routes)
    assert opts.from_dnsmasq(opts.to_dnsmasq(routes)) == tuple(routes)


@given(st.binary(max_size=40))
def test_dhcp_options_decode_never_fails_unexpectedly(data: bytes) -> None:
    # Any byte string either decodes, re-encoding to itself modulo host bits, or is
    # rejected with ValidationError; nothing else escapes.
    try:
        routes = opts.decode(data)
    except ValidationError:
        return
    assert opts.decode(opts.encode(routes)) == routes
    assert len(opts.encode(routes)) == len(data)
