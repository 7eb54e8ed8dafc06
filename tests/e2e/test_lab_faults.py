"""The lab's fault seams (for ``lab break``/``heal`` and the doctor): each breaks the
path the way it should, for the tenant it should, and putting it back restores it."""

from __future__ import annotations

import pytest

from meta169.lab import Lab
from tests.e2e.lab_fixture import METADATA_V6, vm_request

pytestmark = pytest.mark.e2e


def _uuid_of(lab: Lab, vm: str, host: str = "169.254.169.254") -> str:
    reply = vm_request(lab, vm, "/latest/meta-data/instance-id", host=host, timeout=3)
    assert reply.status == 200, (vm, reply.status, reply.body[:200])
    return reply.body.decode()


def test_lab_fault_router_rules_removed_and_restored(lab: Lab) -> None:
    try:
        lab.remove_router_rules("a")
        # No REDIRECT: the router neither owns nor forwards 169.254.169.254.
        with pytest.raises(TimeoutError):
            vm_request(lab, "a1", "/openstack", timeout=1.5)
        assert _uuid_of(lab, "b1") == lab.vm("b1").uuid  # the isolated tenant is untouched
    finally:
        lab.apply_router_rules("a")
    assert _uuid_of(lab, "a1") == lab.vm("a1").uuid
    assert _uuid_of(lab, "a1", f"{METADATA_V6}%eth0") == lab.vm("a1").uuid


def test_lab_fault_proxy_stopped_and_started(lab: Lab) -> None:
    try:
        lab.stop_proxy()
        assert lab.state.process("proxy") is None
        for vm in ("a1", "b1"):
            with pytest.raises(ConnectionRefusedError):
                vm_request(lab, vm, "/openstack", timeout=3)
    finally:
        lab.start_proxy()
    assert [_uuid_of(lab, vm) for vm in ("a1", "b1")] == [lab.vm("a1").uuid, lab.vm("b1").uuid]


def test_lab_fault_server_stopped_and_started(lab: Lab) -> None:
    try:
        lab.stop_server()
        reply = vm_request(lab, "a2", "/openstack", timeout=5)
        assert reply.status in (502, 503), reply
    finally:
        lab.start_server()
    assert _uuid_of(lab, "a2") == lab.vm("a2").uuid
    assert all(p["alive"] for p in lab.status()["processes"])


def test_lab_fault_zeroconf_route_harmless_in_isolated_mode(lab: Lab) -> None:
    # In isolated mode the DHCP port owns 169.254.169.254 and answers ARP for it, so
    # even without the /32 the seed's on-link /16 reaches the proxy; only router
    # mode (test_path_zeroconf) fails.
    try:
        lab.add_zeroconf_route("b2", drop_host_route=True)
        routes = lab.exec("b2", ["ip", "-4", "route", "show"], check=True).stdout
        assert "169.254.0.0/16 dev eth0 scope link metric 1002" in routes
        assert "169.254.169.254 via" not in routes
        assert _uuid_of(lab, "b2") == lab.vm("b2").uuid
        neigh = lab.exec("b2", ["ip", "-4", "neigh", "show", "169.254.169.254"], check=True).stdout
        assert "lladdr fa:16:3e:0b:00:02" in neigh, neigh  # the DHCP port answered
    finally:
        lab.restore_routes("b2")
    routes = lab.exec("b2", ["ip", "-4", "route", "show"], check=True).stdout
    assert "169.254.0.0/16" not in routes and "169.254.169.254 via 10.0.0.2" in routes
