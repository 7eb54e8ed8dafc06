"""The lab signs EC2 instance identity documents with its own key (made by ``lab up``):
a document fetched inside a VM, with its ``signature``, ``pkcs7`` and ``rsa2048``, verifies
with ``meta169 identity verify`` against the certificate ``meta169 identity cert`` prints
for the lab [EC2 user guide, "Verify the instance identity document"]."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meta169.lab import Lab
from tests.e2e.lab_fixture import vm_request

pytestmark = pytest.mark.e2e

BASE = "/latest/dynamic/instance-identity/"
FORMS = ("document", "signature", "pkcs7", "rsa2048")


def _meta169(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meta169", *args], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@pytest.mark.parametrize("vm", ["a1", "b1"])
def test_lab_identity_document_verifies_with_the_labs_certificate(lab: Lab, vm: str, tmp_path: Path) -> None:
    listing = vm_request(lab, vm, BASE)
    assert listing.status == 200 and set(FORMS) <= set(listing.body.decode().split()), listing
    for form in FORMS:
        reply = vm_request(lab, vm, BASE + form)
        assert reply.status == 200 and reply.body, (form, reply.status, reply.body[:200])
        (tmp_path / form).write_bytes(reply.body)
    document = json.loads((tmp_path / "document").read_bytes())

    cert = _meta169("identity", "cert", "--state-root", str(lab.plan.config.directory))
    assert cert.returncode == 0, cert.stderr
    assert f"the certificate of lab {lab.name} ({lab.plan.paths.identity_dir})" in cert.stderr
    assert cert.stdout.startswith("-----BEGIN CERTIFICATE-----")
    (tmp_path / "cert.pem").write_text(cert.stdout)

    files = [arg for form in FORMS for arg in (f"--{form}", str(tmp_path / form))]
    verified = _meta169("identity", "verify", "--cert", str(tmp_path / "cert.pem"), *files)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"identity document verified: instanceId {document['instanceId']}" in verified.stdout
    assert document["privateIp"] == str(lab.vm(vm).ip)
