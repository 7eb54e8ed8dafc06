"""The lab's fault table and the pure logic of ``lab break``/``lab heal`` (README, "Lab faults")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meta169.doctor import guest, host
from meta169.errors import ConfigError, ValidationError
from meta169.lab import faults as lf
from meta169.lab import plan as lp
from meta169.lab.state import FaultRecord, LabState, ProcessRecord

STATE = Path("/run/meta169-lab/u")


def _plan() -> lp.LabPlan:
    return lp.plan_lab(lp.LabConfig(name="u", state_dir=STATE, python="/usr/bin/python3"))


def _record(name: str, vm: str | None = None) -> FaultRecord:
    plan = _plan()
    return FaultRecord(name, lf.target_of(plan, lf.fault(name), vm), vm)


def _nothing(lab: object, record: FaultRecord) -> None:
    return None


# --- the table ----------------------------------------------------------------------------------------


def test_lab_faults_table_has_the_readme_faults() -> None:
    wanted = {"zeroconf", "no-host-route", "no-redirect", "proxy-down", "server-down", "secret-mismatch",
              "unknown-instance"}  # fmt: skip
    assert wanted <= {f.name for f in lf.FAULTS}


@pytest.mark.parametrize("row", lf.FAULTS, ids=lambda f: f.name)
def test_lab_faults_table_names_real_doctor_findings(row: lf.Fault) -> None:
    guest_ids = {c.id for c in guest.CHECKS}
    host_ids = {c.id for c in host.CHECKS}
    assert row.guest_finding is None or row.guest_finding in guest_ids
    assert row.host_finding is None or row.host_finding in host_ids
    assert row.summary and not row.summary.endswith(".")


def test_lab_faults_table_seed_fault_is_guest_side_in_routed_vms() -> None:
    row = lf.fault("zeroconf")
    assert (row.scope, row.modes, row.guest_finding, row.host_finding) == ("vm", ("router",), "zeroconf-route", None)
    assert "169.254.0.0/16 dev eth0 scope link metric 1002" in row.summary


def test_lab_faults_row_validates() -> None:
    with pytest.raises(ValidationError):
        lf.Fault("x", "cluster", lf.MODES, "s", ("proxy",), "a", None, _nothing, _nothing)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        lf.Fault("x", "lab", (), "s", ("proxy",), "a", None, _nothing, _nothing)
    with pytest.raises(ValidationError):
        lf.Fault("x", "lab", lf.MODES, "s", (), "a", None, _nothing, _nothing)
    with pytest.raises(ValidationError):
        lf.Fault("x", "lab", lf.MODES, "s", ("proxy",), None, None, _nothing, _nothing)
    row = lf.Fault("x", "lab", lf.MODES, "s", ("proxy",), "a", None, _nothing, _nothing)
    with pytest.raises(ValidationError, match="duplicate"):
        lf.check_table([row, row])


def test_lab_faults_unknown_name_lists_the_known() -> None:
    with pytest.raises(ConfigError, match=r"zeroconf.*unknown-instance"):
        lf.fault("bogus")


# --- targets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "vm", "target"),
    [
        ("zeroconf", "a1", "a1"),
        ("zeroconf", "a2", "a2"),
        ("no-host-route", "b1", "b1"),
        ("unknown-instance", "a1", "a1"),
        ("unknown-instance", "b2", "b2"),
        ("no-redirect", "a2", "a"),
        ("no-redirect", None, "a"),  # the lab's one router
        ("proxy-down", None, ""),
        ("proxy-down", "b1", ""),
        ("server-down", "a1", ""),
        ("secret-mismatch", None, ""),
    ],
)
def test_lab_faults_target_of(name: str, vm: str | None, target: str) -> None:
    assert lf.target_of(_plan(), lf.fault(name), vm) == target


@pytest.mark.parametrize(
    ("name", "vm", "message"),
    [
        ("zeroconf", "b1", "breaks only router VMs \\(a1, a2\\); in isolated VM b1 it breaks nothing"),
        ("no-host-route", "a1", "breaks only isolated VMs \\(b1, b2\\)"),
        ("no-redirect", "b2", "breaks only router VMs"),
        ("zeroconf", None, "breaks one VM: name it \\(a1, a2\\)"),
        ("unknown-instance", None, "name it \\(a1, a2, b1, b2\\)"),
        ("zeroconf", "c1", "has no VM 'c1'"),
    ],
)
def test_lab_faults_target_of_rejects(name: str, vm: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lf.target_of(_plan(), lf.fault(name), vm)


# --- conflicts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("active", "new", "clash"),
    [
        ((("zeroconf", "a1"),), ("zeroconf", "a1"), 0),  # break twice
        ((("proxy-down", None),), ("proxy-down", "a1"), 0),  # the same lab-wide fault, named by a VM
        ((("proxy-down", None),), ("secret-mismatch", None), 0),  # both restart the proxy
        ((("server-down", None),), ("secret-mismatch", None), 0),
        ((("zeroconf", "a1"), ("no-redirect", "a1")), ("no-redirect", "a2"), 1),  # one router
        ((("zeroconf", "a1"),), ("zeroconf", "a2"), None),
        ((("zeroconf", "a1"),), ("unknown-instance", "a1"), None),  # routes and registry: both may hold
        ((("no-host-route", "b1"),), ("proxy-down", None), None),
        ((("proxy-down", None),), ("server-down", None), None),
    ],
)
def test_lab_faults_conflict(
    active: tuple[tuple[str, str | None], ...], new: tuple[str, str | None], clash: int | None
) -> None:
    plan = _plan()
    records = [_record(n, v) for n, v in active]
    row = lf.fault(new[0])
    found = lf.conflict(records, row, lf.target_of(plan, row, new[1]))
    assert found == (None if clash is None else records[clash])


def test_lab_faults_conflict_ignores_unknown_records() -> None:
    # A state file written by a newer meta169 may name a fault this one does not know.
    stray = FaultRecord("from-the-future", "a1", "a1")
    assert lf.conflict([stray], lf.fault("zeroconf"), "a1") is None
    assert lf.describe(stray) == "from-the-future"
    assert not lf.affects(_plan(), stray, _plan().vm("a1"))


# --- what a fault breaks, what heal undoes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "vm", "broken", "text", "heal"),
    [
        ("zeroconf", "a1", ("a1",), "zeroconf on a1", "meta169 lab heal a1"),
        ("no-redirect", "a2", ("a1", "a2"), "no-redirect on router a", "meta169 lab heal"),
        ("proxy-down", "b1", ("a1", "a2", "b1", "b2"), "proxy-down", "meta169 lab heal"),
        ("unknown-instance", "b2", ("b2",), "unknown-instance on b2", "meta169 lab heal b2"),
    ],
)
def test_lab_faults_affected_describe_heal_command(
    name: str, vm: str, broken: tuple[str, ...], text: str, heal: str
) -> None:
    record = _record(name, vm)
    assert tuple(v.name for v in lf.affected(_plan(), record)) == broken
    assert lf.describe(record) == text
    assert lf.heal_command(record) == heal


def test_lab_faults_to_heal_selects_and_reverses() -> None:
    plan = _plan()
    z = _record("zeroconf", "a1")
    nh = _record("no-host-route", "b1")
    nr = _record("no-redirect", "a2")
    pd = _record("proxy-down")
    active = [z, nh, nr, pd]
    assert lf.to_heal(plan, active, "a1") == (pd, nr, z)  # its own, its router's, the lab's; last first
    assert lf.to_heal(plan, active, "b1") == (pd, nh)
    assert lf.to_heal(plan, active, "b2") == (pd,)
    assert lf.to_heal(plan, active, None) == (pd, nr)  # not bound to one VM
    assert lf.to_heal(plan, active, None, everything=True) == (pd, nr, nh, z)
    assert lf.to_heal(plan, [], None) == ()
    assert lf.to_heal(plan, [], "a1", everything=True) == ()


def test_lab_faults_still_broken() -> None:
    plan = _plan()
    vms = plan.vms
    assert lf.still_broken(plan, [], vms) == ()
    assert [v.name for v in lf.still_broken(plan, [_record("no-redirect", "a1")], vms)] == ["a1", "a2"]
    assert [v.name for v in lf.still_broken(plan, [_record("no-host-route", "b2")], vms)] == ["b2"]


# --- the state file and the TCP wiring -------------------------------------------------------------------


def test_lab_faults_recorded_in_state_round_trip() -> None:
    config = lp.LabConfig(name="u", state_dir=STATE, python="/usr/bin/python3")
    records = (FaultRecord("zeroconf", "a1", "a1", 1.5), FaultRecord("secret-mismatch", "", None, 2.0))
    st = LabState(config, status="up", processes=(ProcessRecord("serve", 10),), faults=records, tcp_port=41234)
    back = LabState.from_json(json.loads(json.dumps(st.to_json())), source="t")
    assert back.faults == records and back.tcp_port == 41234
    assert back.without_fault(records[0]).faults == records[1:]
    assert back.with_fault(FaultRecord("zeroconf", "a1", "a1", 9.0)).faults[-1].since == 9.0  # replaced, not doubled
    assert len(back.with_fault(FaultRecord("zeroconf", "a1", "a1", 9.0)).faults) == 2
    # A state file from before lab break knew no faults.
    old = st.to_json()
    del old["faults"], old["tcp_port"]
    legacy = LabState.from_json(old, source="t")
    assert legacy.faults == () and legacy.tcp_port is None


def test_lab_faults_tcp_wiring_keeps_markers() -> None:
    plan = _plan()
    paths = plan.paths
    tcp = lp.TcpUpstream(41234, paths.secret("serve"), paths.secret("proxy"))
    serve, proxy = lp.serve_argv(plan, tcp), lp.proxy_argv(plan, tcp)
    # lab down finds serve and the proxy by these arguments, on either wiring.
    assert set(lp.process_markers(plan)) & set(serve) == {f"unix:{paths.serve_socket}=proxy"}
    assert str(paths.listeners) in proxy
    assert serve[-4:] == ["--listen", "127.0.0.1:41234=proxy", "--proxy-secret-file", str(paths.secret("serve"))]
    assert proxy[proxy.index("--upstream") + 1] == "127.0.0.1:41234"
    assert proxy[-2:] == ["--secret-file", str(paths.secret("proxy"))]
    assert lp.upstream(plan) == f"unix:{paths.serve_socket}"
    assert "--secret-file" not in lp.proxy_argv(plan) and "--proxy-secret-file" not in lp.serve_argv(plan)
    with pytest.raises(ConfigError):
        lp.TcpUpstream(0, paths.secret("serve"), paths.secret("proxy"))
