"""Real IMDSv2 clients from lab VMs with ``http_tokens: required``.

Every VM's registry entry is switched to ``required`` (through the lab's registry,
as an operator would), with its own availability zone and region so each answer
is provably that VM's. Then, from inside each VM's namespace:

- botocore's own IMDS code (``IMDSRegionProvider`` over a session configured by
  ``AWS_EC2_METADATA_SERVICE_ENDPOINT``, and an ``IMDSFetcher`` subclass for the
  identity document), with IMDSv1 fallback disabled, so only the token path can
  succeed [botocore utils.py IMDSFetcher._fetch_metadata_token / _get_request];
- cloud-init 22.4.2's DataSourceEc2 on its AWS token path;
- and a plain IMDSv1 request, which gets 401 on the EC2 and OpenStack trees.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meta169.lab import Lab
from meta169.lab import plan as lp
from meta169.model import MetadataOptions
from tests.e2e import hostile_cases as hc
from tests.e2e.lab_fixture import METADATA_V4, vm_request
from tests.harness.cloudinit import run_datasource

pytestmark = pytest.mark.e2e

VMS = ("a1", "a2", "b1", "b2")
REQUIRED = MetadataOptions(http_tokens="required")


def zone(vm: str) -> str:
    # EC2-style: the region plus one letter; botocore derives the region by dropping it.
    return f"{region(vm)}a"


def region(vm: str) -> str:
    return f"lab-{vm}-1"


@pytest.fixture(scope="module")
def required(lab: Lab) -> Iterator[None]:
    """Every VM on ``http_tokens: required``, each in its own zone and region."""
    with contextlib.ExitStack() as stack:
        for vm in VMS:
            stack.enter_context(hc.instance_policy(lab, vm, REQUIRED, availability_zone=zone(vm), region=region(vm)))
        yield


# --- botocore ---------------------------------------------------------------------------------

# Runs inside the VM. Records every request botocore sends (method, URL, status,
# whether it carried a token) by wrapping the session's send, and prints JSON.
SDK_SCRIPT = r"""
import json
import botocore.httpsession
import botocore.session
from botocore.utils import IMDSFetcher, IMDSRegionProvider

traffic = []
_send = botocore.httpsession.URLLib3Session.send

def send(self, request):
    names = {k.lower() for k in request.headers}
    entry = {"method": request.method, "url": request.url, "token": "x-aws-ec2-metadata-token" in names}
    traffic.append(entry)
    response = _send(self, request)
    entry["status"] = response.status_code
    return response

botocore.httpsession.URLLib3Session.send = send


class IdentityFetcher(IMDSFetcher):
    # The SDK's token-then-GET sequence, for the identity document.
    def document(self):
        token = self._fetch_metadata_token()
        reply = self._get_request("latest/dynamic/instance-identity/document", None, token=token)
        return json.loads(reply.text)


session = botocore.session.Session()
config = {
    "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
    "ec2_metadata_v1_disabled": session.get_config_variable("ec2_metadata_v1_disabled"),
}
out = {"config": config, "region": IMDSRegionProvider(session).provide()}
fetcher = IdentityFetcher(timeout=2, num_attempts=1, config=config)
out["endpoint"] = fetcher.get_base_url()
out["identity"] = fetcher.document()
out["traffic"] = traffic
print(json.dumps(out))
"""


def run_sdk(lab: Lab, vm: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="m169t-sdk-") as home:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": home,
            # Only these choose the endpoint and the mode; no profile, no proxy.
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{METADATA_V4}",
            "AWS_EC2_METADATA_V1_DISABLED": "true",
            "AWS_METADATA_SERVICE_TIMEOUT": "2",
            "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1",
            "AWS_CONFIG_FILE": str(Path(home) / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(Path(home) / "credentials"),
        }
        proc = subprocess.run(
            lab.exec_argv(vm, [sys.executable, "-c", SDK_SCRIPT]),
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.usefixtures("required")
@pytest.mark.parametrize("vm", VMS)
def test_imdsv2_botocore_region_and_identity(lab: Lab, vm: str) -> None:
    plan = lab.vm(vm)
    out = run_sdk(lab, vm)
    assert out["config"] == {"ec2_metadata_service_endpoint": f"http://{METADATA_V4}", "ec2_metadata_v1_disabled": True}
    assert out["endpoint"] == f"http://{METADATA_V4}"
    assert out["region"] == region(vm)
    doc = out["identity"]
    assert (doc["instanceId"], doc["region"], doc["availabilityZone"]) == (plan.uuid, region(vm), zone(vm))
    assert doc["privateIp"] == str(plan.ip)
    # Two sessions: PUT the token, then GET with it; nothing was ever sent without one.
    token_url = f"http://{METADATA_V4}/latest/api/token"
    assert [(t["method"], t["url"], t["status"], t["token"]) for t in out["traffic"]] == [
        ("PUT", token_url, 200, False),
        ("GET", f"http://{METADATA_V4}/latest/meta-data/placement/availability-zone/", 200, True),
        ("PUT", token_url, 200, False),
        ("GET", f"http://{METADATA_V4}/latest/dynamic/instance-identity/document", 200, True),
    ]
    hc.assert_no_leak(lab, vm, json.dumps(out).encode(), "botocore")


# --- cloud-init -------------------------------------------------------------------------------


@pytest.mark.cloudinit
@pytest.mark.usefixtures("required")
@pytest.mark.parametrize("vm", VMS)
def test_imdsv2_cloudinit_ec2_datasource(lab: Lab, cloudinit_pkg: Path, vm: str) -> None:
    plan = lab.vm(vm)
    expected = lp.instance(lab.plan, plan)
    report = run_datasource(
        "ec2",
        f"http://{METADATA_V4}",
        imdsv2=True,
        netns=plan.netns,
        allow_net=("169.254.169.254/32", "fe80::/10"),
        timeout=60,
    )
    assert report["ok"], report["errors"]
    assert report["imds_token_obtained"] is True
    assert report["instance_id"] == plan.uuid
    assert report["local_hostname"] == plan.hostname
    assert report["public_ssh_keys"] == [expected.keys[0].data]
    assert report["userdata_raw"] == hc.own_user_data(lab, vm).decode()
    assert (report["availability_zone"], report["region"]) == (zone(vm), region(vm))
    assert report["identity"]["instanceId"] == plan.uuid
    requests = report["requests"]
    assert (requests[0]["method"], requests[0]["url"], requests[0]["status"]) == (
        "PUT",
        f"http://{METADATA_V4}/latest/api/token",
        200,
    )
    rest = requests[1:]
    assert rest and all(r["token_sent"] for r in rest), [r for r in rest if not r["token_sent"]]
    assert [r for r in rest if r["status"] != 200] == []
    assert report["retries"]["count"] == 0, report["retries"]
    hc.assert_no_leak(lab, vm, json.dumps(report).encode(), "cloud-init report")


# --- IMDSv1 ---------------------------------------------------------------------------------

V1_PATHS = (
    "/latest/meta-data/instance-id",
    "/latest/meta-data/",
    "/latest/user-data",
    "/2009-04-04/meta-data/instance-id",
    "/latest/dynamic/instance-identity/document",
    "/openstack",
    "/openstack/latest/meta_data.json",
    "/openstack/latest/user_data",
    "/openstack/2012-08-10/meta_data.json",
    "/",
)


@pytest.mark.usefixtures("required")
@pytest.mark.parametrize("vm", VMS)
def test_imdsv2_v1_request_is_401_on_both_trees(lab: Lab, vm: str) -> None:
    plan = lab.vm(vm)
    own = (plan.uuid.encode(), hc.own_user_data(lab, vm))
    for host in (METADATA_V4, hc.V6_HOST):
        for method in ("GET", "HEAD"):
            for path in V1_PATHS:
                reply = vm_request(lab, vm, path, host=host, method=method)
                assert reply.status == 401, (host, method, path, reply.body[:200])
                assert not any(secret in reply.body for secret in own), (path, reply.body)
                hc.assert_no_leak(lab, vm, reply.body, path)
        # The same requests with a token from this VM are served.
        token = hc.get_token(lab, vm, ttl=60, host=host)
        ok = vm_request(lab, vm, "/openstack/latest/meta_data.json", host=host, headers={hc.TOKEN_HEADER: token})
        assert ok.status == 200 and ok.json()["uuid"] == plan.uuid
        ok = vm_request(lab, vm, "/latest/meta-data/placement/region", host=host, headers={hc.TOKEN_HEADER: token})
        assert (ok.status, ok.body) == (200, region(vm).encode())


@pytest.mark.cloudinit
@pytest.mark.usefixtures("required")
def test_imdsv2_cloudinit_v1_path_refused(lab: Lab, cloudinit_pkg: Path) -> None:
    # The same datasource on its IMDSv1 path (any non-AWS platform) gets nothing.
    report = run_datasource(
        "ec2",
        f"http://{METADATA_V4}",
        imdsv2=False,
        netns=lab.vm("a1").netns,
        allow_net=("169.254.169.254/32", "fe80::/10"),
        max_wait=1,
        retries=0,
        timeout=60,
        check=False,
    )
    assert report["ok"] is False
    statuses = {r["status"] for r in report["requests"]}
    assert statuses == {401}, report["requests"]
    assert not any(r["token_sent"] for r in report["requests"])
