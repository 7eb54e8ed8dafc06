"""The seed's fault, reproduced in a routed lab VM, and its cure.

The seed's guest: CentOS's ifup-eth adds ``169.254.0.0/16 dev eth0 scope
link metric 1002``; without a more specific route the guest treats 169.254.169.254
as on-link and ARPs for it, nobody on the wire owns it in router mode (the router
only REDIRECTs), and curl reports "couldn't connect to host". With option 121's
``169.254.169.254/32 via 10.0.0.1`` present, longest prefix wins and the same /16
does no harm.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator

import pytest

from meta169.lab import Lab
from meta169.lab import plan as lp
from meta169.lab.network import route_get
from tests.e2e.lab_fixture import METADATA_V4, vm_request

pytestmark = pytest.mark.e2e

VM = "a2"


@pytest.fixture
def zeroconf_vm(lab: Lab) -> Iterator[str]:
    """VM a2 with the seed's zeroconf route and without the DHCP host route; restored after."""
    try:
        lab.add_zeroconf_route(VM, drop_host_route=True)
        yield VM
    finally:
        lab.restore_routes(VM)


def _routes(lab: Lab, vm: str) -> list[dict[str, object]]:
    out = lab.exec(vm, ["ip", "-j", "-4", "route", "show"], check=True).stdout
    routes: list[dict[str, object]] = json.loads(out)
    return routes


def test_path_zeroconf_without_host_route_arps_and_fails(lab: Lab, zeroconf_vm: str) -> None:
    routes = _routes(lab, zeroconf_vm)
    assert {"dst": "169.254.0.0/16", "dev": "eth0", "scope": "link", "metric": 1002}.items() <= next(
        r for r in routes if r["dst"] == "169.254.0.0/16"
    ).items()
    assert not any(r["dst"] == "169.254.169.254" for r in routes)
    chosen = route_get(lab.vm(zeroconf_vm).netns, METADATA_V4)
    assert "gateway" not in chosen, chosen  # on-link: the guest will ARP

    with pytest.raises(OSError) as info:
        vm_request(lab, zeroconf_vm, "/openstack", timeout=4)
    # A connect that never completes: timed out, or given up once ARP failed.
    assert isinstance(info.value, TimeoutError) or info.value.errno == errno.EHOSTUNREACH, info.value

    neigh = lab.exec(zeroconf_vm, ["ip", "-4", "neigh", "show", METADATA_V4], check=True).stdout
    assert "FAILED" in neigh or "INCOMPLETE" in neigh, neigh


def test_path_zeroconf_harmless_with_option_121_host_route(lab: Lab, zeroconf_vm: str) -> None:
    plan = lab.vm(zeroconf_vm)
    # What the DHCP lease had installed, back next to the zeroconf /16.
    lab.exec(zeroconf_vm, ["ip", "-4", "route", "replace", f"{METADATA_V4}/32", "via", str(lp.GATEWAY_IP)], check=True)
    assert any(r["dst"] == "169.254.0.0/16" for r in _routes(lab, zeroconf_vm))
    assert route_get(plan.netns, METADATA_V4).get("gateway") == str(lp.GATEWAY_IP)
    reply = vm_request(lab, zeroconf_vm, "/openstack/latest/meta_data.json", timeout=5)
    assert reply.status == 200
    assert reply.json()["uuid"] == plan.uuid


def test_path_zeroconf_lease_carries_the_host_route(lab: Lab) -> None:
    # The /32 the cure relies on came from the DHCP lease (option 121), not from us.
    from meta169.plumbing import dhclient

    lease_file = lab.plan.paths.dhclient(VM).lease
    leases = dhclient.parse_leases(lease_file.read_text())
    routes = [str(r) for r in leases[-1].classless_routes]
    assert routes[0] == f"169.254.169.254/32 via {lp.GATEWAY_IP}"
    assert routes[-1] == f"0.0.0.0/0 via {lp.GATEWAY_IP}"
