"""Guests cannot reach the proxy port directly, nor claim another identity.

The router's filter INPUT rules accept port 9697 only for packets the mangle rule
marked on their way to 169.254.169.254:80 (the REDIRECT), and drop the rest
silently: a direct connect times out rather than being refused. The proxy strips
every identity header a guest sends and stamps the TCP source address and the
listener's router or network, so forged headers never select another instance.
"""

from __future__ import annotations

import errno

import pytest

from meta169.lab import Lab
from meta169.lab import plan as lp
from tests.e2e.lab_fixture import METADATA_V6, vm_connect, vm_request

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "host",
    [str(lp.GATEWAY_IP), f"{lp.eui64_link_local(lp.lab_mac('a', 1))}%eth0", f"{METADATA_V6}%eth0"],
    ids=["gateway-v4", "router-link-local", "metadata-v6"],
)
def test_path_proxy_port_dropped_from_vm(lab: Lab, host: str) -> None:
    with pytest.raises(TimeoutError):
        vm_connect(lab, "a1", host, lp.PROXY_PORT, timeout=1.5)
    # The same router answers on the redirected port 80 of the metadata address.
    reply = vm_request(lab, "a1", "/openstack/latest/meta_data.json", timeout=3)
    assert reply.json()["uuid"] == lab.vm("a1").uuid


def test_path_router_port_80_is_not_the_proxy(lab: Lab) -> None:
    # Only 169.254.169.254 is redirected: the gateway's own port 80 has no listener.
    with pytest.raises(ConnectionRefusedError):
        vm_connect(lab, "a1", str(lp.GATEWAY_IP), 80, timeout=3)


def _forgeries(lab: Lab, victim: str) -> list[dict[str, str]]:
    v = lab.vm(victim)
    other_net = "net-b" if v.network_id == "net-a" else "net-a"
    ip = str(v.ip)
    return [
        {"X-Forwarded-For": ip},
        {"X-Forwarded-For": f"{ip}, {ip}"},
        {"Forwarded": f"for={ip}"},
        {"X-Real-IP": ip},
        {"X-Instance-ID": v.uuid, "X-Tenant-ID": v.project_id, "X-Instance-ID-Signature": "0" * 64},
        {"X-Neutron-Network-ID": v.network_id, "X-Forwarded-For": ip},
        {"X-Neutron-Router-ID": "router-a", "X-Forwarded-For": ip},
        {"X-OVN-Network-ID": v.network_id},
        {"X-Meta169-Caller-IP": ip},
        {"X-Meta169-Caller-IP": ip, "X-Meta169-Network-ID": v.network_id},
        {"X-Meta169-Caller-IP": ip, "X-Meta169-Network-ID": other_net},
        {"X-Meta169-Caller-IP": ip, "X-Meta169-Router-ID": "router-a"},
        {"x-meta169-caller-ip": ip, "X-META169-NETWORK-ID": v.network_id},
    ]


@pytest.mark.parametrize(
    ("caller", "victim"),
    [("a1", "a2"), ("b1", "b2"), ("a1", "b1"), ("b2", "a2")],
    ids=["routed-same-net", "isolated-same-net", "routed-to-other-tenant", "isolated-to-other-tenant"],
)
def test_path_forged_identity_headers_never_yield_other_vm(lab: Lab, caller: str, victim: str) -> None:
    me, other = lab.vm(caller), lab.vm(victim)
    for headers in _forgeries(lab, victim):
        for host in ("169.254.169.254", f"{METADATA_V6}%eth0"):
            reply = vm_request(lab, caller, "/openstack/latest/meta_data.json", host=host, headers=headers)
            assert other.uuid.encode() not in reply.body, (host, headers)
            assert reply.status == 200, (host, headers, reply.status, reply.body[:200])
            assert reply.json()["uuid"] == me.uuid, (host, headers)
        ec2 = vm_request(lab, caller, "/latest/meta-data/instance-id", headers=headers)
        assert (ec2.status, ec2.body.decode()) == (200, me.uuid), headers


def test_path_same_ip_each_tenant_sees_its_own_instance(lab: Lab) -> None:
    for a, b in (("a1", "b1"), ("a2", "b2")):
        assert lab.vm(a).ip == lab.vm(b).ip
        got = {vm: vm_request(lab, vm, "/latest/meta-data/instance-id").body.decode() for vm in (a, b)}
        assert got == {a: lab.vm(a).uuid, b: lab.vm(b).uuid}


def test_path_isolated_vm_cannot_reach_other_tenant(lab: Lab) -> None:
    # Tenant b has no gateway; 10.0.0.1 is nobody on its wire (ARP fails).
    with pytest.raises(OSError) as info:
        vm_connect(lab, "b1", str(lp.GATEWAY_IP), lp.PROXY_PORT, timeout=4)
    assert isinstance(info.value, TimeoutError) or info.value.errno == errno.EHOSTUNREACH
