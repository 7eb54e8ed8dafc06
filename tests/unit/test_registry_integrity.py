"""The registry's integrity rules as pure functions: which network writes must look at
the ports on them, and how a refusal names what it refuses over."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from meta169.errors import Conflict
from meta169.model import Network, Subnet, parse_network
from meta169.registry.integrity import PortOwner, narrows, network_in_use, require_ports_within


def _net(*cidrs: str) -> Network:
    return Network("net-a", subnets=tuple(Subnet(parse_network(c)) for c in cidrs))


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, _net("10.0.0.0/24"), False),  # new: no port is on it yet
        (_net("10.0.0.0/24"), _net("10.0.0.0/24"), False),
        (_net("10.0.0.0/24"), _net("10.0.0.0/16"), False),  # wider
        (_net("10.0.0.0/24"), _net("10.1.0.0/24", "10.0.0.0/23"), False),  # one beside
        (_net("10.0.0.0/24", "2001:db8::/64"), _net("2001:db8::/48", "10.0.0.0/24"), False),
        (_net("10.0.0.0/24"), _net(), False),  # no subnets: any IP
        (_net(), _net(), False),
        (_net(), _net("10.0.0.0/24"), True),  # took any IP, now some
        (_net("10.0.0.0/24"), _net("10.0.0.128/25"), True),
        (_net("10.0.0.0/24"), _net("10.1.0.0/24"), True),
        (_net("10.0.0.0/24", "2001:db8::/64"), _net("10.0.0.0/24"), True),  # IPv6 gone
        (_net("10.0.0.0/24"), _net("10.0.0.0/25", "10.0.0.128/25"), True),  # split: looked at, holds all
        (_net("::ffff:10.0.0.0/120"), _net("10.0.0.0/24"), True),  # another version
    ],
)
def test_registry_integrity_narrows(before: Network | None, after: Network, expected: bool) -> None:
    assert narrows(before, after) is expected


def _owners(count: int, network_id: str = "net-a") -> list[PortOwner]:
    return [(network_id, f"10.0.0.{10 + n}", f"00000000-0000-4000-8000-{n:012d}") for n in range(count)]


def test_registry_integrity_ports_within_names_a_few_with_their_ips() -> None:
    asked: list[list[str]] = []

    def names(uuids: Sequence[str]) -> dict[str, str]:
        asked.append(list(uuids))
        return {u: f"vm-{u[-1]}" for u in asked[-1]}

    owners = [*_owners(7), ("net-a", "10.0.0.100", "00000000-0000-4000-8000-000000000001")]
    owners.append(("net-a", "10.0.0.200", "00000000-0000-4000-8000-000000000001"))  # inside: not named
    owners.append(("net-b", "10.0.0.10", "00000000-0000-4000-8000-000000000009"))  # another network
    with pytest.raises(Conflict) as info:
        require_ports_within({"net-a": _net("10.0.0.0/29", "10.0.0.192/26")}, reversed(owners), names)
    assert str(info.value) == (
        "network net-a: subnets 10.0.0.0/29, 10.0.0.192/26 would leave ports of 7 instances outside every "
        "subnet: 00000000-0000-4000-8000-000000000000 (vm-0) at 10.0.0.10, "
        "00000000-0000-4000-8000-000000000001 (vm-1) at 10.0.0.11 and 10.0.0.100, "
        "00000000-0000-4000-8000-000000000002 (vm-2) at 10.0.0.12, "
        "00000000-0000-4000-8000-000000000003 (vm-3) at 10.0.0.13, "
        "00000000-0000-4000-8000-000000000004 (vm-4) at 10.0.0.14 and 2 more instances; give those instances "
        "addresses in the new subnets (or remove them) in the same write, or keep a subnet that holds their addresses"
    )
    assert asked == [[f"00000000-0000-4000-8000-00000000000{n}" for n in range(5)]]  # only the named


def test_registry_integrity_ports_within_lets_what_fits_through() -> None:
    def names(uuids: Sequence[str]) -> dict[str, str]:
        raise AssertionError("nothing to name")

    require_ports_within({"net-a": _net("10.0.0.0/24")}, _owners(7), names)
    require_ports_within({"net-a": _net()}, _owners(7), names)  # no subnets: any IP
    require_ports_within({"net-b": _net("10.9.0.0/24")}, _owners(7), names)


@pytest.mark.parametrize(
    ("instances", "count", "routers", "message"),
    [
        ([("u1", "a")], 1, [], "network net-a is used by instance u1 (a)"),
        ([("u1", "a"), ("u2", "b")], 2, ["r1"], "network net-a is used by instances u1 (a), u2 (b), and by router r1"),
        ([("u1", "a")], 40, [], "network net-a is used by instances u1 (a) and 39 more instances"),
        ([], 0, ["r1", "r2"], "network net-a is used by routers r1, r2"),
        ([], 0, [f"r{n}" for n in range(7)], "network net-a is used by routers r0, r1, r2, r3, r4 and 2 more routers"),
    ],
)
def test_registry_integrity_network_in_use_message(
    instances: list[tuple[str, str]], count: int, routers: list[str], message: str
) -> None:
    error = network_in_use("net-a", instances, count, routers)
    assert isinstance(error, Conflict)
    assert str(error) == message
