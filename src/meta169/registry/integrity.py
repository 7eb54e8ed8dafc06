"""What a write must not leave in the registry, as pure functions of data.

Both backends check these inside the write's transaction (the last line: it also
sees writers that got in after a plan was read), and the import and sync plans check
them before the first write, so a dry run reports them too. All of them word a
refusal the same way: these functions raise the Conflict.

- A port's IPs lie in a subnet of its network; a network without subnets takes any
  IP. ``network_data.json`` is built from the subnet holding a port's address
  (``render/openstack.py`` leaves out a port with none), so a guest whose address
  left every subnet loses its network configuration. An incoming port is checked
  against its network's subnets where it is planned; here, a network written with
  subnets that may hold fewer addresses than before (:func:`narrows`) must still
  hold the address of every port already on it (:func:`require_ports_within`).
- A network still used is not removed: the refusal names the instances with ports
  on it and the routers attached to it (:func:`network_in_use`).

A refusal names a few instances and says how many more there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from meta169.errors import Conflict
from meta169.model import Network, Subnet, parse_ip

# How many instances (or routers) a refusal names before "and N more".
SHOWN = 5

# (network id, IP in normalized text, instance uuid): a row of Registry.port_owners.
PortOwner = tuple[str, str, str]


def narrows(before: Network | None, after: Network) -> bool:
    """Whether ``after``'s subnets may leave out an address ``before``'s held.

    False for a new network (no port is on it yet) and for one without subnets
    (it takes any IP); true when ``before`` had none (it took any IP), and when a
    subnet of ``before`` lies in none of ``after``'s. A network renamed, given
    another MTU, DNS or gateway, or a wider prefix, never narrows, so writing it
    costs no read of its ports.
    """
    if before is None or not after.subnets:
        return False
    if not before.subnets:
        return True
    return not all(any(_within(old, new) for new in after.subnets) for old in before.subnets)


def _within(inner: Subnet, outer: Subnet) -> bool:
    return inner.version == outer.version and (
        int(outer.cidr.network_address) <= int(inner.cidr.network_address)
        and int(inner.cidr.broadcast_address) <= int(outer.cidr.broadcast_address)
    )


def require_ports_within(
    networks: Mapping[str, Network],
    owners: Iterable[PortOwner],
    names: Callable[[Sequence[str]], Mapping[str, str]],
) -> None:
    """Conflict when an address in ``owners`` lies in no subnet of its network in
    ``networks`` (rows of other networks are ignored).

    ``names`` gives the names of the few instances the message names (a backend
    reads only those). The message names each network, those instances (uuid, name,
    the addresses left out) and how many more there are.
    """
    outside: dict[str, dict[str, list[str]]] = {}
    for network_id, text, uuid in owners:
        network = networks.get(network_id)
        if network is None or not network.subnets or network.subnet_for(parse_ip(text)) is not None:
            continue
        outside.setdefault(network_id, {}).setdefault(uuid, []).append(text)
    if not outside:
        return
    shown = {network_id: sorted(by_uuid)[:SHOWN] for network_id, by_uuid in outside.items()}
    named = names(sorted({uuid for uuids in shown.values() for uuid in uuids}))
    problems = []
    for network_id in sorted(outside):
        by_uuid = outside[network_id]
        instances = [
            f"{uuid} ({named.get(uuid, '')}) at {' and '.join(sorted(by_uuid[uuid], key=_ip_order))}"
            for uuid in shown[network_id]
        ]
        cidrs = ", ".join(str(s.cidr) for s in networks[network_id].subnets)
        problems.append(
            f"network {network_id}: subnets {cidrs} would leave ports of {_count(len(by_uuid), 'instance')} "
            f"outside every subnet: {_listed(instances, len(by_uuid), 'instances')}"
        )
    raise Conflict(
        "; ".join(problems) + "; give those instances addresses in the new subnets (or remove them) "
        "in the same write, or keep a subnet that holds their addresses"
    )


def network_in_use(
    network_id: str, instances: Sequence[tuple[str, str]], instance_count: int, routers: Sequence[str]
) -> Conflict:
    """The refusal to remove a network used by ``instances`` ((uuid, name) of the
    first few, of ``instance_count``, in uuid order) and ``routers`` (all of them)."""
    users = []
    if instances:
        named = [f"{uuid} ({name})" for uuid, name in instances[:SHOWN]]
        users.append(f"{_noun(instance_count, 'instance')} {_listed(named, instance_count, 'instances')}")
    if routers:
        users.append(f"{_noun(len(routers), 'router')} {_listed(routers[:SHOWN], len(routers), 'routers')}")
    return Conflict(f"network {network_id} is used by {', and by '.join(users)}")


def _listed(shown: Sequence[str], total: int, noun: str) -> str:
    """``a, b, c`` or ``a, b, c and 4 more instances``."""
    text = ", ".join(shown)
    return f"{text} and {total - len(shown)} more {noun}" if total > len(shown) else text


def _noun(count: int, noun: str) -> str:
    return noun if count == 1 else f"{noun}s"


def _count(count: int, noun: str) -> str:
    return f"{count} {_noun(count, noun)}"


def _ip_order(text: str) -> tuple[int, int]:
    ip = parse_ip(text)
    return ip.version, int(ip)
