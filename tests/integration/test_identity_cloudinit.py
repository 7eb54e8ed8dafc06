"""cloud-init 22.4.2's EC2 datasource (IMDSv2 path) against a ``serve`` that signs
identity documents: it fetches every name listed under dynamic/instance-identity/, so
the three signature leaves must not disturb it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cloudinit import run_datasource
from tests.integration.serving import ServeProcess, imported_registry, run_cli, start_serve

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
INVENTORY = f"""
networks:
  - id: net-a
    project_id: proj-a
    subnets: [{{cidr: 127.0.0.0/24, gateway: 127.0.0.254, dhcp: true}}]
routers:
  - id: router-a
    networks: [net-a]
instances:
  - uuid: {UUID}
    name: web-1
    project_id: proj-a
    availability_zone: nova
    instance_type: m1.small
    ports: [{{network: net-a, mac: "fa:16:3e:00:00:05", ips: [127.0.0.1]}}]
"""

pytestmark = pytest.mark.cloudinit


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("ci-identity")
    url = imported_registry(tmp, INVENTORY)
    run_cli(url, "identity", "init", "--dir", str(tmp / "key"))
    srv = start_serve(url, ["127.0.0.1:0=router:router-a"], "--identity-key-dir", str(tmp / "key"))
    try:
        yield srv
    finally:
        srv.stop()


def test_identity_cloudinit_ec2_imdsv2_with_signed_identity(cloudinit_pkg: Path, server: ServeProcess) -> None:
    host, port = server.addresses[0]
    report = run_datasource("ec2", f"http://{host}:{port}", imdsv2=True)
    assert report["imds_token_obtained"] is True
    assert report["instance_id"] == UUID
    assert report["identity"]["instanceId"] == UUID
    assert report["availability_zone"] == "nova"
    fetched = {
        str(r["url"]).rsplit("/", 1)[-1]: r.get("status")
        for r in report["requests"]
        if "/dynamic/instance-identity" in str(r["url"])
    }
    # the listing (no trailing slash), then every leaf it names
    assert fetched == {"instance-identity": 200, "document": 200, "pkcs7": 200, "rsa2048": 200, "signature": 200}
    assert report["retries"]["count"] == 0, report["retries"]
    assert report["warnings"] == [], report["warnings"]
