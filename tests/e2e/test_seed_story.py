"""The seed's day, as one test: a guest that lost its metadata, diagnosed and cured.

A CentOS 6 guest behind a Neutron router: ``ifup-eth`` added ``169.254.0.0/16 dev
eth0 scope link metric 1002`` and nothing pushed a /32, so the guest ARPed for
169.254.169.254 and cloud-init got "couldn't connect to host". Here VM a1 carries
the CentOS 6 network scripts of the doctor's corpus (``--files-root``), ``lab break
zeroconf a1`` recreates the route table, cloud-init 22.4.2's own OpenStack
datasource fails, ``meta169 doctor`` names the route line, ``NOZEROCONF=yes`` and the
DHCP /32 alternative, its fix is applied (now and for good), and the same
datasource then succeeds with a1's uuid.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meta169.lab import Lab
from tests.harness.cloudinit import run_datasource

pytestmark = [pytest.mark.e2e, pytest.mark.cloudinit]

VM = "a1"
SEED_ROUTE = "169.254.0.0/16 dev eth0 scope link metric 1002"
CENTOS6 = Path(__file__).resolve().parents[1] / "unit" / "corpus" / "centos6-zeroconf" / "files" / "etc"


def _centos6_root(tmp_path: Path) -> Path:
    """The guest's /etc: CentOS 6's network, ifcfg-eth0 and ifup-eth (no lease: the lab's is given)."""
    root = tmp_path / "centos6"
    shutil.copytree(CENTOS6, root / "etc")
    return root


def _doctor(lab: Lab, root: Path) -> dict[str, Any]:
    argv = lab.doctor_argv(VM, "--json", "--timeout", "1", files_root=root)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def _crawl(lab: Lab, *, check: bool) -> dict[str, Any]:
    return run_datasource(
        "openstack",
        "http://169.254.169.254",
        netns=lab.vm(VM).netns,
        allow_net=("169.254.169.254/32",),
        host_macs=True,
        request_timeout=1,
        retries=0,
        timeout=60,
        check=check,
    )


def test_seed_story_zeroconf_diagnosed_fixed_cloudinit_succeeds(lab: Lab, cloudinit_pkg: Path, tmp_path: Path) -> None:
    a1 = lab.vm(VM)
    root = _centos6_root(tmp_path)
    try:
        lab.break_fault("zeroconf", VM)
        routes = lab.exec(VM, ["ip", "-4", "route", "show"], check=True).stdout
        assert SEED_ROUTE in routes and "169.254.169.254 via" not in routes, routes

        failed = _crawl(lab, check=False)
        assert (failed["ok"], failed["get_data"]) == (False, False), failed
        asked = [r for r in failed["requests"] if r["url"] == "http://169.254.169.254/openstack"]
        assert asked and all(r.get("status") is None for r in asked), failed["requests"]  # no answer at all

        doc = _doctor(lab, root)
        assert doc["exit_code"] == 1 and doc["broken_hop"] == "route", doc["path"]
        first = doc["findings"][0]
        assert (first["id"], first["severity"]) == ("zeroconf-route", "error"), first
        evidence = "\n".join(first["evidence"])
        assert f"ip-route.json: {SEED_ROUTE}" in evidence
        assert "Add Zeroconf route" in evidence  # the ifup-eth lines, from the guest's files
        fixes = [(step["text"], step["command"]) for step in first["fix"]]
        assert fixes[0][1] == ["ip", "route", "del", "169.254.0.0/16", "dev", "eth0"], fixes
        assert fixes[0][0].startswith("ip route del 169.254.0.0/16 dev eth0"), fixes
        texts = "\n".join(text for text, _ in fixes)
        assert "NOZEROCONF=yes in /etc/sysconfig/network" in texts, texts
        assert "push 169.254.169.254/32 via 10.0.0.1 by DHCP option 121" in texts, texts

        # The cure, now and at the next network restart.
        lab.exec(VM, fixes[0][1], check=True)
        network = root / "etc" / "sysconfig" / "network"
        network.write_text(network.read_text() + "NOZEROCONF=yes\n")

        after = _doctor(lab, root)
        assert [f["id"] for f in after["findings"] if f["severity"] == "error"] == [], after["findings"]
        assert not {"zeroconf-route", "nozeroconf-unset"} & {f["id"] for f in after["findings"]}

        report = _crawl(lab, check=True)
        assert report["instance_id"] == a1.uuid
        assert report["metadata"]["uuid"] == a1.uuid
        assert report["local_hostname"] == a1.hostname
    finally:
        lab.heal(everything=True)
    routes = lab.exec(VM, ["ip", "-4", "route", "show"], check=True).stdout
    assert "169.254.169.254 via 10.0.0.1 dev eth0" in routes and "169.254.0.0/16" not in routes
