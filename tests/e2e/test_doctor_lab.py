"""Every lab fault, diagnosed by the right doctor and healed by its fix.

For each row of :data:`meta169.lab.faults.FAULTS`: ``lab break`` it, run the guest
doctor inside the VM and the host doctor for that VM (both as the real CLI, with the
flags ``lab doctor`` gives them), check the first finding and its evidence, apply the
fix the doctor printed (its ``command`` argv) or, where the fix is an action for the
operator, check that it names the action and ``lab heal``; then metadata must answer
the VM again, ``lab heal`` must leave the lab exactly as it was, and both doctors
must find nothing wrong. A healthy lab gives no error findings; the CLI's break,
status and heal are checked last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from meta169.lab import Lab
from meta169.lab import faults as lf
from meta169.lab.network import FAMILIES
from meta169.plumbing import iptables
from meta169.plumbing.command import run

pytestmark = pytest.mark.e2e

# Seconds per live probe of the guest doctor: a dropped SYN costs this much.
PROBE_TIMEOUT = "1"
_COUNTERS = re.compile(r"\[\d+:\d+\]")


@dataclass(frozen=True)
class Case:
    """How one fault is proved: on which VM, and how the printed fix is applied.

    ``apply``: ``guest`` runs the first command of the guest doctor's first finding
    inside the VM; ``host`` runs every command of the host doctor's first finding on
    the host; None means the fix is an operator's action (``names`` must be in it)
    and ``lab heal`` does it.
    """

    fault: str
    vm: str
    apply: Literal["guest", "host"] | None
    names: str


CASES = (
    Case("zeroconf", "a1", "guest", "ip route del 169.254.0.0/16 dev eth0"),
    Case("no-host-route", "b1", "guest", "ip route add 169.254.169.254/32 via 10.0.0.2 dev eth0"),
    Case("no-redirect", "a2", "host", "-j REDIRECT --to-ports 9697"),
    Case("proxy-down", "b2", None, "start meta169 proxy"),
    Case("server-down", "a1", None, "start meta169 serve"),
    Case("secret-mismatch", "b1", None, "the same secret"),
    Case("unknown-instance", "a2", None, "meta169 import"),
)


@dataclass(frozen=True)
class Report:
    argv: list[str]
    code: int
    doc: dict[str, Any]

    @property
    def findings(self) -> list[dict[str, Any]]:
        findings: list[dict[str, Any]] = self.doc["findings"]
        return findings

    @property
    def errors(self) -> list[str]:
        return [f["id"] for f in self.findings if f["severity"] == "error"]

    def __str__(self) -> str:
        return f"{' '.join(self.argv[-8:])} exited {self.code}: {json.dumps(self.findings, indent=1)[:3000]}"


def _run_doctor(argv: list[str]) -> Report:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode in (0, 1), f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}"
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == proc.returncode
    return Report(argv, proc.returncode, doc)


def _doctors(lab: Lab, vms: tuple[str, ...]) -> tuple[list[Report], list[Report]]:
    """The guest doctor in each VM and the host doctor for each VM, all at once."""
    lab.prepare_guest_root()
    guests = [lab.doctor_argv(vm, "--json", "--timeout", PROBE_TIMEOUT) for vm in vms]
    hosts = [lab.host_doctor_argv(vm, "--json") for vm in vms]
    with ThreadPoolExecutor(max_workers=2 * len(vms)) as pool:
        reports = list(pool.map(_run_doctor, guests + hosts))
    return reports[: len(vms)], reports[len(vms) :]


def _snapshot(lab: Lab, vm: str) -> dict[str, str]:
    """What a break may change for ``vm``: its routes, its router's rules, its registry entry."""
    plan = lab.vm(vm)
    out = {"routes": lab.exec(vm, ["ip", "-4", "route", "show"], check=True).stdout}
    router = lab.plan.tenant_of(plan).router_ns
    if router is not None:
        for family in FAMILIES:
            text = iptables.save(router, family)
            out[f"iptables{family}"] = "\n".join(
                _COUNTERS.sub("", line) for line in text.splitlines() if not line.startswith("#")
            )
    status, body = lab.metadata(vm, "/openstack/latest/meta_data.json")
    assert status == 200, (vm, status, body[:200])
    meta = json.loads(body)
    meta.pop("random_seed", None)  # fresh on every request [nova base.py]
    out["meta_data"] = json.dumps(meta, sort_keys=True)
    return out


def _fix_texts(finding: dict[str, Any]) -> str:
    return "\n".join(step["text"] for step in finding["fix"])


@pytest.fixture
def clean_lab(lab: Lab) -> Iterator[Lab]:
    """The module's lab, healed after the test whatever happened."""
    try:
        yield lab
    finally:
        lab.heal(everything=True)


def test_doctor_lab_cases_cover_every_fault() -> None:
    assert sorted(c.fault for c in CASES) == sorted(f.name for f in lf.FAULTS)


def test_doctor_lab_healthy_no_error_findings(lab: Lab) -> None:
    vms = tuple(vm.name for vm in lab.vms)
    guests, hosts = _doctors(lab, vms)
    for report in guests + hosts:
        assert report.errors == [], report
        assert report.code == 0, report
    assert all(h.doc["broken_hop"] is None for h in hosts)


def _broken(lab: Lab, vm: str) -> str:
    """How the VM's metadata request fails now (AssertionError when it does not)."""
    try:
        status, body = lab.metadata(vm, timeout=1.5)
    except OSError as exc:
        return type(exc).__name__
    assert (status, body) != (200, lab.vm(vm).uuid.encode()), f"{vm} still gets its metadata"
    return f"HTTP {status}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.fault)
def test_doctor_lab_finds_and_fixes_fault(clean_lab: Lab, case: Case) -> None:
    lab = clean_lab
    row = lf.fault(case.fault)
    before = _snapshot(lab, case.vm)

    record = lab.break_fault(case.fault, case.vm)
    assert list(lab.faults) == [record]
    symptom = _broken(lab, case.vm)

    (guest,), (host,) = _doctors(lab, (case.vm,))
    assert guest.findings and guest.findings[0]["id"] == row.guest_finding, (symptom, guest)
    assert guest.findings[0]["severity"] == "error" and guest.findings[0]["evidence"], guest
    if row.host_finding is None:
        # A guest's routes are invisible from the network node: the host side is healthy.
        assert host.errors == [], host
    else:
        assert host.findings and host.findings[0]["id"] == row.host_finding, (symptom, host)
        assert host.findings[0]["severity"] == "error" and host.findings[0]["evidence"], host

    diagnosis = (host if row.host_finding is not None else guest).findings[0]
    assert case.names in _fix_texts(diagnosis), diagnosis
    if case.apply == "guest":
        first = next(step["command"] for step in diagnosis["fix"] if step["command"])
        lab.exec(case.vm, first, check=True)
    elif case.apply == "host":
        commands = [step["command"] for step in diagnosis["fix"] if step["command"]]
        assert commands, diagnosis
        for argv in commands:
            # Only ever inside this lab's namespaces.
            assert argv[:3] == ["ip", "netns", "exec"] and argv[3].startswith(lab.plan.prefix), argv
            run(argv)
    else:
        assert not any(step["command"] for step in diagnosis["fix"]), diagnosis
        assert list(lab.heal(case.vm)) == [record]
    lab.await_metadata(case.vm)  # reachable again: the VM gets its own uuid

    # heal puts back exactly what break changed (the doctor's fix may have done part of it).
    assert list(lab.heal(case.vm)) == ([] if case.apply is None else [record])
    assert list(lab.heal(case.vm)) == [] and list(lab.faults) == []
    assert _snapshot(lab, case.vm) == before
    for vm in lab.vms:
        lab.await_metadata(vm.name)
    (guest,), (host,) = _doctors(lab, (case.vm,))
    assert guest.errors == [] and host.errors == [], (guest, host)


def test_doctor_host_without_arguments_discovers_the_lab(lab: Lab) -> None:
    # --only keeps other labs and namespaces on this host out of the verdict.
    argv = [sys.executable, "-m", "meta169", "doctor", "--host", "--json",
            "--state-root", str(lab.plan.config.directory), "--only", f"{lab.plan.prefix}*"]  # fmt: skip
    report = _run_doctor(argv)
    assert report.code == 0 and report.errors == [], report
    (found,) = [line for line in report.doc["discovered"] if line.startswith(f"lab {lab.name} ")]
    checked = {ns for t in lab.plan.tenants for ns in (t.router_ns, t.dhcp_ns) if ns is not None}
    assert all(ns in found for ns in checked), found
    hops = {h["hop"]: h for h in report.doc["path"]}
    assert all(ns in hops["next-hop"]["detail"] for ns in checked), hops["next-hop"]
    assert (hops["proxy"]["state"], hops["server"]["state"]) == ("ok", "ok")
    assert f"unix:{lab.plan.paths.serve_socket}" in hops["server"]["detail"]


def _cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "meta169", "lab", *args, "--name", lab.name,
            "--state-dir", str(lab.plan.config.directory)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_lab_cli_break_status_heal(lab: Lab) -> None:
    # Runs last in this module: the CLI changes the lab behind the fixture's back
    # (Lab.break_fault, heal and down re-read the state file for that).
    broke = _cli(lab, "break", "zeroconf", "a1")
    assert broke.returncode == 0, broke.stderr
    assert "broke zeroconf on a1" in broke.stdout and "expect zeroconf-route" in broke.stdout

    again = _cli(lab, "break", "zeroconf", "a1")
    assert again.returncode == 4
    assert "zeroconf on a1 is already active; heal it first: meta169 lab heal a1" in again.stderr
    wrong = _cli(lab, "break", "zeroconf", "b1")
    assert wrong.returncode == 2 and "in isolated VM b1 it breaks nothing" in wrong.stderr
    down = _cli(lab, "break", "proxy-down")
    assert down.returncode == 0, down.stderr

    status = json.loads(_cli(lab, "status", "--json").stdout)
    faults = {f["description"]: f["affects"] for f in status["faults"]}
    assert faults == {"zeroconf on a1": ["a1"], "proxy-down": ["a1", "a2", "b1", "b2"]}
    paths = lab.plan.paths
    assert (status["registry"], status["upstream"], status["listeners"]) == (
        paths.registry_url, f"unix:{paths.serve_socket}", str(paths.listeners))  # fmt: skip
    assert [v["lease"] for v in status["vms"]] == [str(paths.dhclient(v.name).lease) for v in lab.vms]
    assert "faults: zeroconf on a1 (breaks a1); proxy-down" in _cli(lab, "status").stdout

    host = _cli(lab, "doctor", "--host", "b2", "--json")
    assert host.returncode == 1, host.stderr
    assert json.loads(host.stdout)["findings"][0]["id"] == "proxy-not-listening"

    healed = _cli(lab, "heal")  # the lab-wide fault only
    assert healed.returncode == 0, healed.stderr
    assert "healed proxy-down" in healed.stdout and "still broken: zeroconf on a1" in healed.stdout
    guest = _cli(lab, "doctor", "a1", "--json")
    assert guest.returncode == 1 and json.loads(guest.stdout)["findings"][0]["id"] == "zeroconf-route"
    assert "healed zeroconf on a1" in _cli(lab, "heal", "a1").stdout
    noop = _cli(lab, "heal", "--all")
    assert noop.returncode == 0 and "nothing to heal" in noop.stdout
    guest = _cli(lab, "doctor", "a1", "--json")
    assert guest.returncode == 0, guest.stdout
    assert json.loads(_cli(lab, "status", "--json").stdout)["faults"] == []
