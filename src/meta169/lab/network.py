"""The lab's network: namespaces, a bridge per tenant, veths, addresses and router rules.

Turns the network part of a :class:`~meta169.lab.plan.LabPlan` into kernel objects
through :mod:`meta169.plumbing`, checks that every VM got its address and its route
to 169.254.169.254, and clears and deletes the lab's namespaces. Every interface
lives in a namespace carrying the lab's prefix; nothing is made in the host's
namespace. Knows nothing of the state file, the registry, or which processes the
lab runs (a process found inside a namespace of the lab when it is deleted is the
lab's, since the lab made the namespace).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from typing import Any

from meta169.errors import LabError, Meta169Error
from meta169.lab import plan as lp
from meta169.lab.plan import LabPlan, TenantPlan, VMPlan
from meta169.plumbing import iptables, netns
from meta169.plumbing.command import Runner, kill_checked, run

FAMILIES: tuple[iptables.Family, ...] = (4, 6)


def lab_namespaces(prefix: str) -> tuple[str, ...]:
    """Namespaces that exist now and carry ``prefix`` (the lab's own, and nobody else's)."""
    try:
        names = sorted(p.name for p in netns.NETNS_DIR.iterdir())
    except FileNotFoundError:
        return ()
    return tuple(n for n in names if n.startswith(prefix))


def wire(tenant: TenantPlan, *, runner: Runner = run) -> None:
    """``tenant``'s bridge in its switch namespace, a veth leg into it for the DHCP port,
    the router and every VM, and the addresses of the DHCP port and the router."""
    sw = tenant.switch_ns
    # Snooping off: with no MLD querier on this bridge, a snooped report could
    # stop neighbour solicitations for fe80::a9fe:a9fe reaching its owner.
    runner(netns.ip_argv(sw, "link", "add", lp.BRIDGE, "type", "bridge", "mcast_snooping", "0"))
    netns.link_up(sw, lp.BRIDGE, runner=runner)
    legs: list[tuple[str, str, str, str | None]] = [
        (f"{lp.SWITCH_PORT_PREFIX}dhcp", tenant.dhcp_ns, lp.DHCP_IFACE, lp.lab_mac(tenant.key, 2)),
    ]
    if tenant.router_ns is not None:
        legs.append((f"{lp.SWITCH_PORT_PREFIX}qr", tenant.router_ns, lp.ROUTER_IFACE, lp.lab_mac(tenant.key, 1)))
    # A QEMU guest's leg is a bridge port in its namespace: the guest's own NIC has the
    # VM's MAC, and a bridge port with the same one would swallow its frames.
    legs += [(vm.switch_port, vm.netns, vm.iface, vm.mac if vm.kind == "netns" else None) for vm in tenant.vms]
    for port, peer_ns, peer_if, mac in legs:
        netns.create_veth(port, sw, peer_if, peer_ns, mac_b=mac, runner=runner)
        runner(netns.ip_argv(sw, "link", "set", "dev", port, "master", lp.BRIDGE))
    prefix = lp.SUBNET.prefixlen
    netns.add_address(tenant.dhcp_ns, lp.DHCP_IFACE, ipaddress.ip_interface(f"{lp.DHCP_IP}/{prefix}"), runner=runner)
    if tenant.router_ns is not None:
        netns.add_address(
            tenant.router_ns, lp.ROUTER_IFACE, ipaddress.ip_interface(f"{lp.GATEWAY_IP}/{prefix}"), runner=runner
        )
        # The router answers neighbour solicitations for fe80::a9fe:a9fe, so the
        # guest's packet reaches the ip6tables REDIRECT (an IPv4 packet reaches it
        # by the /32 route via the gateway instead).
        netns.add_metadata_address(tenant.router_ns, lp.ROUTER_IFACE, family=6, nodad=True, runner=runner)
    else:
        # Isolated mode: the DHCP port itself owns the metadata addresses
        # [neutron agent/linux/dhcp.py DeviceManager.setup, METADATA_CIDR].
        netns.add_metadata_address(tenant.dhcp_ns, lp.DHCP_IFACE, family=4, runner=runner)
        netns.add_metadata_address(tenant.dhcp_ns, lp.DHCP_IFACE, family=6, nodad=True, runner=runner)


def router_ns(plan: LabPlan, tenant: str) -> str:
    """The router namespace of ``tenant`` (LabError for an isolated tenant)."""
    ns = plan.tenant(tenant).router_ns
    if ns is None:
        raise LabError(f"tenant {tenant} is isolated: it has no router")
    return ns


def apply_router_rules(plan: LabPlan, tenant: str, *, runner: Runner = run) -> None:
    """(Re)install the REDIRECT/MARK/DROP rules in ``tenant``'s router, IPv4 and IPv6; idempotent."""
    ns = router_ns(plan, tenant)
    for ruleset in lp.router_rulesets(plan.tenant(tenant)):
        iptables.apply(ns, ruleset, runner=runner)


def remove_router_rules(plan: LabPlan, tenant: str, *, runner: Runner = run) -> None:
    """Delete the lab's rules from ``tenant``'s router (IPv4 and IPv6)."""
    ns = router_ns(plan, tenant)
    for family in FAMILIES:
        iptables.remove(ns, family, runner=runner)


def expected_metadata_hop(vm: VMPlan) -> ipaddress.IPv4Address:
    """Where option 121 sends 169.254.169.254: the gateway (routed) or the DHCP port (isolated)."""
    return lp.GATEWAY_IP if vm.mode == "router" else lp.DHCP_IP


def route_get(ns: str, destination: str, *, runner: Runner = run) -> dict[str, Any]:
    """``ip -j route get DEST`` inside ``ns``: the route the kernel would use."""
    out = runner(netns.ip_argv(ns, "-j", "route", "get", destination)).stdout
    try:
        routes = json.loads(out)
    except ValueError as exc:
        raise LabError(f"ip route get {destination} in {ns} printed no JSON: {exc}") from exc
    return dict(routes[0]) if routes else {}


def check_vms(plan: LabPlan, *, runner: Runner = run) -> None:
    """Every VM has its planned address and routes 169.254.169.254 via the hop option 121
    names; one LabError listing every VM that does not."""
    problems = []
    for vm in plan.vms:
        if vm.kind == "qemu":
            continue  # the guest's own network: meta169.lab.qemu.check_network, once it has booted
        want = ipaddress.ip_interface(f"{vm.ip}/{lp.SUBNET.prefixlen}")
        have = netns.addresses(vm.netns, vm.iface, runner=runner)
        if want not in have:
            problems.append(f"{vm.name} has {', '.join(map(str, have)) or 'no address'}, not {want}")
            continue
        hop = str(expected_metadata_hop(vm))
        got = route_get(vm.netns, str(lp.METADATA_V4), runner=runner).get("gateway")
        if got != hop:
            problems.append(f"{vm.name} routes 169.254.169.254 via {got or 'on-link'}, not via {hop} (option 121)")
    if problems:
        raise LabError("; ".join(problems))


def wait_for_dad(plan: LabPlan, *, runner: Runner = run) -> None:
    """Until every VM's and router's link-local address has passed duplicate address detection."""
    for vm in plan.vms:
        if vm.kind == "netns":
            netns.wait_for_dad(vm.netns, vm.iface, runner=runner)
    for tenant in plan.tenants:
        if tenant.router_ns is not None:
            netns.wait_for_dad(tenant.router_ns, lp.ROUTER_IFACE, runner=runner)


def remove_namespace(plan: LabPlan, ns: str, *, runner: Runner = run) -> None:
    """Delete ``ns``, one of the lab's, after removing its rules and the processes inside."""
    if ns in {t.router_ns for t in plan.tenants}:
        # Our rules go with the namespace; removing them first keeps the
        # "never leave a rule of ours" promise independent of that.
        for family in FAMILIES:
            with contextlib.suppress(Meta169Error):
                iptables.remove(ns, family, runner=runner)
    _kill_inside(ns, runner=runner)
    netns.delete(ns, runner=runner)


def _kill_inside(ns: str, *, runner: Runner) -> None:
    # Processes inside a namespace of ours are ours (it was made by this lab); each is
    # signalled only while it is still in that namespace (same inode), so a recycled
    # PID is never hit.
    try:
        inode = (netns.NETNS_DIR / ns).stat().st_ino
    except OSError:
        return
    pids = netns.pids(ns, runner=runner)
    kill_checked(pids, lambda pid: _netns_inode(pid) == inode)


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
