"""The metadata path over IPv6 link-local, fe80::a9fe:a9fe.

Routed VM (a1): the router namespace owns fe80::a9fe:a9fe on its leg, so it answers
the guest's neighbour solicitation, and ip6tables REDIRECTs port 80 to the proxy on
[::]:9697. Isolated VM (b1): the DHCP namespace owns fe80::a9fe:a9fe and the proxy
listens on [fe80::a9fe:a9fe%port]:80 there. Either way the guest's source is its
EUI-64 link-local address, which the registry knows as one of the port's IPs.

The client is plain http.client in a thread inside the VM's namespace: cloud-init
22.4.2 itself cannot use a zoned URL (``http://[fe80::a9fe:a9fe%25eth0]``): its
``is_resolvable_url`` drops it from metadata_urls and falls back to 169.254.169.254.
"""

from __future__ import annotations

import pytest

from meta169.lab import Lab
from tests.e2e.lab_fixture import METADATA_V6, vm_request

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("vm", ["a1", "b1", "a2", "b2"])
def test_path_ipv6_link_local_openstack_tree(lab: Lab, vm: str) -> None:
    plan = lab.vm(vm)
    host = f"{METADATA_V6}%{plan.iface}"
    versions = vm_request(lab, vm, "/openstack", host=host)
    assert versions.status == 200
    assert "latest" in versions.body.decode().split()
    meta = vm_request(lab, vm, "/openstack/latest/meta_data.json", host=host)
    assert meta.status == 200
    assert meta.json()["uuid"] == plan.uuid
    assert meta.json()["hostname"] == plan.hostname
    ec2 = vm_request(lab, vm, "/latest/meta-data/local-ipv4", host=host)
    assert (ec2.status, ec2.body.decode()) == (200, str(plan.ip))
