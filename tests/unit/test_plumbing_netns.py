"""Namespace helpers without namespaces: names, argv, ``ip -j`` parsing, argument checks."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import pytest

from meta169.errors import PlumbingError, ValidationError
from meta169.plumbing import netns
from meta169.plumbing.command import CommandResult


@pytest.mark.parametrize("name", ["m169t-abc123-0", "qrouter-1234", "a", "x" * 64, "net.a_b"])
def test_netns_check_name_accepts(name: str) -> None:
    assert netns.check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "-n", "x" * 65, "a b", "ns\n"])
def test_netns_check_name_rejects(name: str) -> None:
    with pytest.raises(ValidationError, match="namespace name"):
        netns.check_name(name)


@pytest.mark.parametrize("name", ["lo", "eth0", "m169abcdef1a", "x" * 15, "tap-net-a"])
def test_netns_check_ifname_accepts(name: str) -> None:
    assert netns.check_ifname(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "-x", "eth0:1 ", "eth0\n"])
def test_netns_check_ifname_rejects_names_beyond_ifnamsiz_or_odd(name: str) -> None:
    with pytest.raises(ValidationError, match="interface name"):
        netns.check_ifname(name)


def test_netns_argv_builders() -> None:
    assert netns.in_netns("m169t-a", ["iptables-save"]) == ["ip", "netns", "exec", "m169t-a", "iptables-save"]
    assert netns.ip_argv("m169t-a", "link", "show") == ["ip", "-n", "m169t-a", "link", "show"]
    with pytest.raises(ValidationError):
        netns.in_netns("a/../b", ["true"])


class Recorder:
    def __init__(self, stdout: str = "") -> None:
        self.calls: list[tuple[str, ...]] = []
        self.stdout = stdout

    def __call__(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult:
        self.calls.append(tuple(argv))
        return CommandResult(tuple(argv), 0, self.stdout, "")


def test_netns_create_veth_never_creates_an_end_in_the_callers_namespace() -> None:
    runner = Recorder()
    netns.create_veth("m169aa", "m169t-x-0", "m169ab", "m169t-x-1", mac_b="FA:16:3E:00:00:05", runner=runner)
    assert runner.calls == [
        (
            "ip", "-n", "m169t-x-0", "link", "add", "m169aa", "type", "veth",
            "peer", "name", "m169ab", "address", "fa:16:3e:00:00:05", "netns", "m169t-x-1",
        ),
        ("ip", "-n", "m169t-x-0", "link", "set", "dev", "m169aa", "up"),
        ("ip", "-n", "m169t-x-1", "link", "set", "dev", "m169ab", "up"),
    ]  # fmt: skip


def test_netns_add_route_picks_family_and_replaces() -> None:
    runner = Recorder()
    metadata, dhcp_port = ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_address("10.0.0.3")
    netns.add_route("m169t-x", metadata, via=dhcp_port, runner=runner)
    netns.add_route("m169t-x", "default", via=ipaddress.ip_address("2001:db8::1"), dev="eth0", runner=runner)
    assert runner.calls == [
        ("ip", "-n", "m169t-x", "-4", "route", "replace", "169.254.169.254/32", "via", "10.0.0.3"),
        ("ip", "-n", "m169t-x", "-6", "route", "replace", "default", "via", "2001:db8::1", "dev", "eth0"),
    ]
    with pytest.raises(ValidationError, match="gateway, a device"):
        netns.add_route("m169t-x", "default", runner=runner)


IP_ADDR_JSON = """[{"ifindex":2,"ifname":"m169aa","flags":["BROADCAST","UP"],"addr_info":[
{"family":"inet","local":"10.0.0.3","prefixlen":24,"scope":"global"},
{"family":"inet","local":"169.254.169.254","prefixlen":32,"scope":"global"},
{"family":"inet6","local":"fe80::a9fe:a9fe","prefixlen":128,"scope":"link","tentative":true}]}]"""


def test_netns_parse_ip_addr_json() -> None:
    assert netns.parse_ip_addr_json(IP_ADDR_JSON) == (
        ipaddress.ip_interface("10.0.0.3/24"),
        ipaddress.ip_interface("169.254.169.254/32"),
        ipaddress.ip_interface("fe80::a9fe:a9fe/128"),
    )
    assert netns.parse_ip_addr_json("") == ()
    with pytest.raises(PlumbingError, match="not JSON"):
        netns.parse_ip_addr_json("Device does not exist")


def test_netns_add_metadata_address_is_idempotent_from_what_ip_reports() -> None:
    present = Recorder(IP_ADDR_JSON)
    assert netns.add_metadata_address("m169t-x", "m169aa", runner=present) is False
    assert netns.add_metadata_address("m169t-x", "m169aa", family=6, runner=present) is False
    assert len(present.calls) == 2  # only the two lookups
    empty = Recorder('[{"ifname":"m169aa","addr_info":[]}]')
    assert netns.add_metadata_address("m169t-x", "m169aa", family=6, nodad=True, runner=empty) is True
    assert empty.calls[-1] == ("ip", "-n", "m169t-x", "addr", "add", "fe80::a9fe:a9fe/128", "dev", "m169aa", "nodad")
    assert netns.remove_metadata_address("m169t-x", "m169aa", runner=empty) is False


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((socket.AF_INET, socket.SOCK_STREAM, ipaddress.ip_address("::1"), 80), {}, "does not match"),
        ((socket.AF_UNIX, socket.SOCK_STREAM, ipaddress.ip_address("10.0.0.1"), 80), {}, "AF_INET"),
        ((socket.AF_INET, socket.SOCK_RAW, ipaddress.ip_address("10.0.0.1"), 80), {}, "SOCK_STREAM"),
        ((socket.AF_INET, socket.SOCK_STREAM, ipaddress.ip_address("10.0.0.1"), 70000), {}, "0..65535"),
        ((socket.AF_INET6, socket.SOCK_STREAM, ipaddress.ip_address("fe80::a9fe:a9fe"), 80), {}, "needs an interface"),
        (
            (socket.AF_INET6, socket.SOCK_STREAM, ipaddress.ip_address("fe80::a9fe:a9fe"), 80),
            {"interface": "x" * 16},
            "interface name",
        ),
    ],
)
def test_netns_open_socket_in_netns_checks_arguments_before_any_io(
    args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        netns.open_socket_in_netns("m169t-never-created", *args, **kwargs)  # type: ignore[arg-type]


def test_netns_metadata_interfaces_match_neutron() -> None:
    assert str(netns.METADATA_V4_INTERFACE) == "169.254.169.254/32"
    assert str(netns.METADATA_V6_INTERFACE) == "fe80::a9fe:a9fe/128"
