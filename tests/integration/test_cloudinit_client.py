"""The real client: cloud-init 22.4.2's own datasources against ``meta169 serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cloudinit import run_datasource
from tests.integration.serving import ServeProcess, imported_registry, start_serve

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly ops@example"
USER_DATA = "#cloud-config\nhostname: web-1\n"

# examples/inventory.yaml, with the port moved onto loopback: cloud-init connects from
# 127.0.0.1, and the server identifies it by that source address.
INVENTORY = f"""
networks:
  - id: net-a
    project_id: proj-a
    subnets:
      - cidr: 127.0.0.0/24
        gateway: 127.0.0.254
        dhcp: true
        dns: [127.0.0.53]
routers:
  - id: router-a
    networks: [net-a]
instances:
  - uuid: {UUID}
    name: web-1
    hostname: web-1
    project_id: proj-a
    availability_zone: nova
    instance_type: m1.small
    image_id: img-ubuntu-24.04
    metadata: {{role: web}}
    keys:
      - {{name: ops, type: ssh, data: "{KEY}"}}
    user_data: |
      #cloud-config
      hostname: web-1
    vendor_data: {{"cloud-init": "#cloud-config\\npackages: [htop]\\n"}}
    ports:
      - {{network: net-a, mac: "fa:16:3e:00:00:05", ips: [127.0.0.1]}}
"""

pytestmark = pytest.mark.cloudinit


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("ci")
    url = imported_registry(tmp, INVENTORY)
    srv = start_serve(url, ["127.0.0.1:0=router:router-a"])
    try:
        yield srv
    finally:
        srv.stop()


def _url(srv: ServeProcess) -> str:
    host, port = srv.addresses[0]
    return f"http://{host}:{port}"


def _assert_clean(report: dict[str, Any]) -> None:
    assert report["retries"]["count"] == 0, report["retries"]
    assert report["warnings"] == [], report["warnings"]
    failed = [
        r
        for r in report["requests"]
        if r.get("status") != 200
        and not str(r["url"]).endswith(("/user_data", "/vendor_data.json", "/vendor_data2.json", "/network_data.json"))
    ]
    assert failed == [], failed
    assert report["crawl_seconds"] < 1.0


def test_cloudinit_openstack_datasource_gets_identity(cloudinit_pkg: Path, server: ServeProcess) -> None:
    report = run_datasource("openstack", _url(server))
    assert report["instance_id"] == UUID
    assert report["local_hostname"] == "web-1"
    assert report["public_ssh_keys"] == [KEY]
    assert report["userdata_raw"] == USER_DATA
    assert report["availability_zone"] == "nova"
    assert report["metadata"]["meta"] == {"role": "web"}
    assert report["vendordata_present"]
    # cloud-init's own converter accepted our network_data.json
    converted = report["network_config"]
    assert converted["version"] == 1
    assert any(c.get("mac_address") == "fa:16:3e:00:00:05" for c in converted["config"])
    # the EC2 tree crawled alongside survived whole
    assert report["ec2_metadata"]["instance-id"] == UUID
    _assert_clean(report)


def test_cloudinit_ec2_datasource_gets_identity(cloudinit_pkg: Path, server: ServeProcess) -> None:
    report = run_datasource("ec2", _url(server))
    assert report["instance_id"] == UUID
    assert report["local_hostname"] == "web-1"
    assert report["public_ssh_keys"] == [KEY]
    assert report["userdata_raw"] == USER_DATA
    assert report["availability_zone"] == "nova"
    assert report["metadata"]["instance-type"] == "m1.small"
    assert report["metadata"]["local-ipv4"] == "127.0.0.1"
    _assert_clean(report)


def test_cloudinit_ec2_datasource_imdsv2_path(cloudinit_pkg: Path, server: ServeProcess) -> None:
    report = run_datasource("ec2", _url(server), imdsv2=True)
    assert report["imds_token_obtained"] is True
    assert report["instance_id"] == UUID
    assert report["public_ssh_keys"] == [KEY]
    assert report["userdata_raw"] == USER_DATA
    assert report["identity"]["instanceId"] == UUID
    assert all(r.get("token_sent") for r in report["requests"] if r["method"] == "GET"), report["requests"]
    _assert_clean(report)
