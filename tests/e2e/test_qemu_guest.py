"""Real guests in the lab: Debian 12 under QEMU (TCG), cloud-init 22.4.2 booting through
the whole metadata path.

One lab per module with one VM per tenant, both QEMU guests booting in parallel: a1
(routed tenant) with Nova's SMBIOS, so its ds-identify picks OpenStack; b1 (isolated
tenant) with the SMBIOS cloud-init takes for AWS, so it picks EC2, and its instance
requires IMDSv2 tokens. The guest image is built from Debian's archive on first use
and cached under $META169_CACHE (``.cache`` in the repository otherwise); booting
takes minutes under TCG, so everything here shares the two guests, and the last
test takes the lab down and checks that nothing of it is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meta169.errors import LabError
from meta169.lab import Lab, lab_namespaces, qemu
from meta169.lab import plan as lp
from meta169.lab.processes import find_marked
from meta169.registry import open_registry
from tests.counters import SUMMARY
from tests.e2e.guest_image import guest_image
from tests.e2e.lab_fixture import lab_config, require_lab

GUESTS = {"a1": "openstack", "b1": "ec2"}
# ds-identify's and cloud-init's names for each (instance-data.json v1.platform, v1.cloud_name).
PLATFORM = {"openstack": ("openstack", "openstack"), "ec2": ("ec2", "aws")}
DATASOURCE = {"openstack": "DataSourceOpenStackLocal", "ec2": "DataSourceEc2Local"}
CLOUD_INIT_WAIT = 900.0  # seconds for cloud-init's last stage under TCG

# Building the image on a fresh machine and booting two guests happen in the first test's setup.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def guests() -> Iterator[Lab]:
    """A lab whose a1 and b1 are QEMU guests (OpenStack and EC2), booted; always torn down."""
    image = guest_image()
    config = lab_config(
        vms_per_network=1,
        qemu=tuple(lp.QemuGuest(vm, ds) for vm, ds in GUESTS.items()),  # type: ignore[arg-type]
        guest_image=image.directory,
    )
    require_lab(config)
    try:
        built = Lab.up(config)
        SUMMARY["qemu guest boot"] = f"{built.up_seconds:.0f}s to lab up with both guests' agents answering (TCG)"
        try:
            yield built
        finally:
            built.down()
    finally:
        shutil.rmtree(config.directory, ignore_errors=True)


def guest_json(lab: Lab, vm: str, path: str) -> Any:
    return json.loads(lab.exec(vm, ["cat", path], check=True).stdout)


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """``meta169 lab ARGS`` for this lab, as a user runs it."""
    argv = [sys.executable, "-m", "meta169", "lab", args[0], "--name", lab.name,
            "--state-dir", str(lab.plan.config.directory), *args[1:]]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.parametrize("vm", sorted(GUESTS))
def test_qemu_guest_cloud_init_finishes_without_errors(guests: Lab, vm: str) -> None:
    started = time.monotonic()
    done = guests.exec(vm, ["cloud-init", "status", "--wait", "--long"], timeout=CLOUD_INIT_WAIT)
    SUMMARY[f"qemu guest {vm} cloud-init done"] = f"{time.monotonic() - started:.0f}s after lab up"
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "status: done" in done.stdout
    assert DATASOURCE[GUESTS[vm]] in done.stdout
    result = guest_json(guests, vm, "/run/cloud-init/result.json")["v1"]
    assert result["errors"] == [], result
    assert result["datasource"].startswith(DATASOURCE[GUESTS[vm]])


@pytest.mark.parametrize("vm", sorted(GUESTS))
def test_qemu_guest_ds_identify_picks_the_datasource_its_smbios_names(guests: Lab, vm: str) -> None:
    data = guest_json(guests, vm, "/run/cloud-init/instance-data.json")["v1"]
    assert (data["platform"], data["cloud_name"]) == PLATFORM[GUESTS[vm]]
    assert data["instance_id"] == guests.vm(vm).uuid
    identified = guests.exec(vm, ["cat", "/run/cloud-init/cloud.cfg"], check=True).stdout
    wanted = {"openstack": "OpenStack", "ec2": "Ec2"}[GUESTS[vm]]
    assert f"datasource_list: [ {wanted}, None ]" in identified


@pytest.mark.parametrize("vm", sorted(GUESTS))
def test_qemu_guest_hostname_key_and_user_data_are_the_registrys(guests: Lab, vm: str) -> None:
    registry = open_registry(guests.plan.paths.registry_url)
    try:
        instance = registry.get_instance(guests.vm(vm).uuid)
    finally:
        registry.close()
    hostname = cli(guests, "exec", vm, "--", "hostname")
    assert (hostname.returncode, hostname.stdout.strip()) == (0, instance.hostname)
    keys = guests.exec(vm, ["cat", "/home/debian/.ssh/authorized_keys"], check=True).stdout
    assert [k.data for k in instance.keys] == [line for line in keys.splitlines() if line and line[0] != "#"]
    # The registry's user data is a script (runcmd); what it wrote is what it says.
    assert instance.user_data is not None and lp.USER_DATA_MARK.encode() in instance.user_data
    mark = guests.exec(vm, ["cat", lp.USER_DATA_MARK], check=True).stdout.strip()
    assert mark == lp.user_data_mark(guests.name, vm) and mark.encode() in instance.user_data


_GET = """\
import http.client, sys
conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
headers = {"X-aws-ec2-metadata-token": sys.argv[2]} if len(sys.argv) > 2 else {}
conn.request("GET", sys.argv[1], headers=headers)
print(conn.getresponse().status)
"""


def test_qemu_guest_ec2_takes_the_imdsv2_path(guests: Lab) -> None:
    plain = guests.exec("b1", ["python3", "-c", _GET, "/latest/meta-data/instance-id"], check=True)
    assert plain.stdout.strip() == "401"  # the instance requires tokens
    assert guests.metadata("b1") == (200, guests.vm("b1").uuid.encode())  # PUT a token, then GET with it
    log = guests.exec("b1", ["cat", "/var/log/cloud-init.log"], check=True).stdout
    assert "Fetching Ec2 IMDSv2 API Token" in log  # DataSourceEc2._maybe_fetch_api_token


def test_qemu_guest_zeroconf_found_by_the_guest_doctor_and_fixed(guests: Lab) -> None:
    vm = "a1"
    assert guests.metadata(vm) == (200, guests.vm(vm).uuid.encode())
    guests.break_fault("zeroconf", vm)
    routes = guests.exec(vm, ["ip", "-4", "route", "show", "169.254.0.0/16"], check=True).stdout
    assert "169.254.0.0/16 dev eth0 scope link metric 1002" in routes
    with pytest.raises(OSError):  # the guest ARPs for 169.254.169.254 and nobody answers
        guests.metadata(vm)
    doctor = cli(guests, "doctor", vm, "--json")
    assert doctor.returncode != 0, doctor.stderr
    report = json.loads(doctor.stdout)
    first = report["findings"][0]
    assert first["id"] == "zeroconf-route", [f["id"] for f in report["findings"]]
    assert any("169.254.0.0/16 dev eth0 scope link metric 1002" in line for line in first["evidence"])
    fix = first["fix"][0]["command"]
    assert fix == ["ip", "route", "del", "169.254.0.0/16", "dev", "eth0"], first["fix"]
    guests.exec(vm, fix, check=True)  # the doctor's own fix, in the guest
    guests.await_metadata(vm)
    guests.heal(vm)  # and the lab's record of the fault, with the DHCP /32 back
    assert not guests.faults
    routes = guests.exec(vm, ["ip", "-4", "route"], check=True).stdout
    assert "169.254.169.254 via 10.0.0.1 dev eth0" in routes and "169.254.0.0/16" not in routes


def test_qemu_guest_status_console_and_kind(guests: Lab) -> None:
    described = {v["name"]: v for v in guests.status()["vms"]}
    assert {name: (v["kind"], v["datasource"]) for name, v in described.items()} == {
        vm: ("qemu", ds) for vm, ds in GUESTS.items()
    }
    shown = cli(guests, "status")
    assert "qemu/openstack" in shown.stdout and "qemu/ec2" in shown.stdout, shown.stderr
    console = cli(guests, "console", "a1")
    assert console.returncode == 0
    assert "Cloud-init v. 22.4.2 running 'init-local'" in console.stdout
    assert "Cloud-init v. 22.4.2 finished" in console.stdout


def test_qemu_guest_failed_lab_up_leaves_no_process_tap_or_overlay(guests: Lab) -> None:
    # A lab whose namespace VM cannot get a lease fails after its guest started booting.
    config = lab_config(
        vms_per_network=1, qemu=(lp.QemuGuest("a1"),), guest_image=guests.plan.config.guest_image,
        dhclient_binary="/bin/false",
    )  # fmt: skip
    try:
        with pytest.raises(LabError, match="up failed at step 'start dhclient in every VM'"):
            Lab.up(config)
        plan = lp.plan_lab(config)
        assert find_marked({qemu.marker(plan, "a1")}) == []
        assert lab_namespaces(plan.prefix) == ()
        assert plan.paths.log("qemu-a1").is_file()  # QEMU was started (its output's file)
        files = qemu.files(plan, plan.vm("a1"))
        assert not files.overlay.exists() and not files.agent_socket.exists()
    finally:
        shutil.rmtree(config.directory, ignore_errors=True)


def test_qemu_guest_lab_down_leaves_no_process_tap_or_overlay(guests: Lab) -> None:
    plan = guests.plan
    records = [guests.state.process(f"qemu-{vm}") for vm in GUESTS]
    assert all(r is not None for r in records)
    overlays = [qemu.files(plan, vm).overlay for vm in plan.qemu_vms]
    assert all(p.is_file() for p in overlays)
    report = guests.down(keep_files=True)  # the overlays go even when the files stay
    assert {f"qemu-{vm}" for vm in GUESTS} <= set(report.processes)
    assert report.problems == ()
    assert find_marked({qemu.marker(plan, vm) for vm in GUESTS}) == []
    assert all(not Path(f"/proc/{r.pid}").exists() for r in records if r is not None)
    assert lab_namespaces(plan.prefix) == ()  # the taps lived in the guests' namespaces
    assert not any(p.exists() for p in overlays)
    assert all(qemu.files(plan, vm).console.is_file() for vm in plan.qemu_vms)
