"""cloud-init 22.4.2's own datasources inside every lab VM.

Each run is the whole real path: the VM's dhclient lease and option 121 route, the
router's REDIRECT (tenant a) or the DHCP namespace's 169.254.169.254 (tenant b), the
one ``meta169 proxy``, ``meta169 serve`` and the registry. Both tenants use the
same IPs (a1 and b1 are both 10.0.0.11), and each VM must get its own identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meta169.lab import Lab
from meta169.lab import plan as lp
from tests.harness.cloudinit import Source, run_datasource

pytestmark = [pytest.mark.e2e, pytest.mark.cloudinit]

VMS = ("a1", "a2", "b1", "b2")
OPTIONAL = ("/user_data", "/vendor_data.json", "/vendor_data2.json", "/network_data.json", "/user-data")


def _crawl(lab: Lab, vm: str, source: Source) -> dict[str, Any]:
    return run_datasource(
        source,
        "http://169.254.169.254",
        netns=lab.vm(vm).netns,
        allow_net=("169.254.169.254/32", "fe80::/10"),
        host_macs=True,
        timeout=60,
    )


@pytest.mark.parametrize("source", ["openstack", "ec2"])
@pytest.mark.parametrize("vm", VMS)
def test_path_cloudinit_datasource_gets_own_identity(lab: Lab, cloudinit_pkg: Path, vm: str, source: Source) -> None:
    plan = lab.vm(vm)
    expected = lp.instance(lab.plan, plan)
    report = _crawl(lab, vm, source)
    assert report["instance_id"] == plan.uuid
    assert report["local_hostname"] == plan.hostname
    assert report["public_ssh_keys"] == [expected.keys[0].data]
    assert expected.user_data is not None
    assert report["userdata_raw"] == expected.user_data.decode()
    assert f"vm {vm}" in report["userdata_raw"]
    assert report["retries"]["count"] == 0, report["retries"]
    assert report["retries"]["log_lines"] == [], report["retries"]
    failed = [r for r in report["requests"] if r.get("status") != 200 and not str(r["url"]).endswith(OPTIONAL)]
    assert failed == [], failed
    if source == "ec2":
        assert report["metadata"]["local-ipv4"] == str(plan.ip)
        assert report["metadata"]["mac"] == plan.mac
    else:
        assert report["metadata"]["uuid"] == plan.uuid
        assert report["ec2_metadata"]["instance-id"] == plan.uuid
        # cloud-init matched network_data.json's link to the VM's own eth0 by MAC
        links = [c for c in report["network_config"]["config"] if c.get("type") == "physical"]
        assert [(c["mac_address"], c["name"]) for c in links] == [(plan.mac, plan.iface)], links


def test_path_same_ip_in_both_tenants_distinct_instances(lab: Lab, cloudinit_pkg: Path) -> None:
    a1, b1 = lab.vm("a1"), lab.vm("b1")
    assert a1.ip == b1.ip and a1.mode != b1.mode
    ids = {vm: _crawl(lab, vm, "openstack")["instance_id"] for vm in ("a1", "b1")}
    assert ids == {"a1": a1.uuid, "b1": b1.uuid}
