"""The lab's parts apart from a running lab: module boundaries, markers, command lines,
the order of ``lab up``'s steps, the ledger and what ``lab down`` deletes."""

from __future__ import annotations

import ast
import pkgutil
from collections.abc import Sequence
from pathlib import Path

import pytest

import meta169.lab
from meta169.errors import ConfigError, LabError
from meta169.lab import doctor_argv, lifecycle, status, supervise
from meta169.lab import plan as lp
from meta169.lab.state import LabState, Ledger, ProcessRecord
from meta169.lab.supervise import Supervisor
from meta169.plumbing.command import CommandResult

STATE = Path("/run/meta169-lab/p")
SUBMODULES = sorted(m.name for m in pkgutil.iter_modules(meta169.lab.__path__))


def _plan(state_dir: Path = STATE) -> lp.LabPlan:
    return lp.plan_lab(lp.LabConfig(name="p", state_dir=state_dir, python="/usr/bin/python3"))


def _imports_from_package(module: str) -> list[str]:
    """Names ``module`` takes from the package ``meta169.lab`` itself (not from a submodule)."""
    source = Path(meta169.lab.__path__[0], f"{module}.py").read_text()
    taken = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "meta169.lab":
            taken += [a.name for a in node.names if a.name not in SUBMODULES]
        if isinstance(node, ast.Import):
            taken += [a.name for a in node.names if a.name == "meta169.lab"]
    return taken


# --- module boundaries ----------------------------------------------------------------------------


@pytest.mark.parametrize("module", SUBMODULES)
def test_lab_submodules_never_take_names_from_the_package(module: str) -> None:
    # The package re-exports from its submodules; a submodule importing it would be a cycle.
    assert _imports_from_package(module) == []


def test_lab_package_reexports_lazily() -> None:
    for name in meta169.lab.__all__:
        assert getattr(meta169.lab, name) is not None
    with pytest.raises(AttributeError):
        _ = meta169.lab.no_such_name


# --- processes: markers and wiring ----------------------------------------------------------------


@pytest.mark.parametrize("role", ["serve", "proxy", "dnsmasq-a", "dnsmasq-b", "dhclient-a1", "dhclient-b2"])
def test_lab_every_role_marker_is_swept_by_lab_down(role: str) -> None:
    plan = _plan()
    assert supervise.marker(plan, role) in lp.process_markers(plan)


def test_lab_serve_and_proxy_carry_their_markers() -> None:
    plan = _plan()
    assert supervise.marker(plan, "serve") in lp.serve_argv(plan)
    assert supervise.marker(plan, "proxy") in lp.proxy_argv(plan)


@pytest.mark.parametrize(("role", "error"), [("nginx", LabError), ("", LabError), ("dnsmasq-z", ConfigError)])
def test_lab_marker_of_an_unknown_role_is_an_error(role: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        supervise.marker(_plan(), role)


def test_lab_tcp_upstream_follows_the_state() -> None:
    plan = _plan()
    state = LabState(plan.config)
    assert supervise.tcp_upstream(plan, state) is None
    tcp = supervise.tcp_upstream(plan, LabState(plan.config, tcp_port=40001))
    assert tcp == lp.TcpUpstream(40001, STATE / "serve.secret", STATE / "proxy.secret")


# --- doctor command lines -------------------------------------------------------------------------


def test_lab_guest_doctor_runs_inside_the_vm_with_its_lease() -> None:
    plan = _plan()
    argv = doctor_argv.guest_doctor_argv(plan, "b1", "--json")
    lease = str(plan.paths.dhclient("b1").lease)
    assert argv == ["ip", "netns", "exec", plan.vm("b1").netns, "/usr/bin/python3", "-m", "meta169", "doctor",
                    "--files-root", str(STATE / "guest-root"), "--lease", lease, "--json"]  # fmt: skip
    other = doctor_argv.guest_doctor_argv(plan, "a1", files_root=Path("/srv/guest"))
    assert other[other.index("--files-root") + 1] == "/srv/guest"


def test_lab_host_doctor_names_only_this_lab() -> None:
    plan = _plan()
    argv = doctor_argv.host_doctor_argv(plan, None)
    netns = [argv[i + 1] for i, a in enumerate(argv) if a == "--netns"]
    assert netns == [f"{plan.tenant('a').router_ns}=router", f"{plan.tenant('a').dhcp_ns}=dhcp",
                     f"{plan.tenant('b').dhcp_ns}=dhcp"]  # fmt: skip
    assert argv[argv.index("--upstream") + 1] == f"unix:{STATE}/serve.sock"
    assert "--secret-file" not in argv and "--network" not in argv
    tcp = supervise.tcp_upstream(plan, LabState(plan.config, tcp_port=40001))
    caller = doctor_argv.host_doctor_argv(plan, tcp, "b2", "--json")
    assert caller[caller.index("--secret-file") + 1] == str(STATE / "proxy.secret")
    assert caller[-5:] == ["--network", "net-b", "--ip", "10.0.0.12", "--json"]


def test_lab_host_doctor_scope_is_what_the_command_line_names() -> None:
    plan = _plan()
    scope = doctor_argv.host_doctor_scope(plan, None)
    argv = doctor_argv.host_doctor_argv(plan, None)
    assert [f"{ns}={role}" for ns, role in scope["namespaces"]] == [
        argv[i + 1] for i, a in enumerate(argv) if a == "--netns"]  # fmt: skip
    assert (scope["upstream"], scope["secret_file"], scope["registry"]) == (
        f"unix:{STATE}/serve.sock", "", f"sqlite://{STATE}/registry.db")  # fmt: skip
    assert scope["listener_files"] == [str(STATE / "listeners.json")]


def test_lab_up_lab_scopes_reads_the_state_files_of_labs_that_are_up(tmp_path: Path) -> None:
    up, down = _plan(tmp_path / "p"), lp.plan_lab(lp.LabConfig(name="q", state_dir=tmp_path / "q"))
    for plan, lab_status in ((up, "up"), (down, "down")):
        plan.paths.root.mkdir()
        Ledger(LabState(plan.config, status=lab_status), plan.paths.state).save()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "lab.json").write_text("{")
    scopes, problems = doctor_argv.up_lab_scopes(tmp_path)
    assert [label for label, _ in scopes] == [f"lab p ({up.paths.state})"]
    assert scopes[0][1] == doctor_argv.host_doctor_scope(up, None)
    assert len(problems) == 1 and "not JSON" in problems[0]
    # One lab's own directory works as the root too; a missing root holds no lab.
    assert [label for label, _ in doctor_argv.up_lab_scopes(up.paths.root)[0]] == [f"lab p ({up.paths.state})"]
    assert doctor_argv.up_lab_scopes(tmp_path / "absent") == ((), ())


def test_lab_serve_signs_identity_documents_with_the_labs_key() -> None:
    plan = _plan()
    argv = lp.serve_argv(plan)
    assert argv[argv.index("--identity-key-dir") + 1] == str(STATE / "identity")
    assert plan.paths.identity_dir.parent == plan.paths.root


def test_lab_status_describes_vms_as_the_readme_says() -> None:
    described = status.describe_vm(_plan().vm("a2"))
    assert set(described) >= {"name", "netns", "uuid", "hostname", "ip", "mac", "network", "tenant", "mode"}
    assert (described["ip"], described["mode"], described["network"]) == ("10.0.0.12", "router", "net-a")


# --- lab up's steps, the ledger, lab down's files -------------------------------------------------


def test_lab_up_steps_in_order() -> None:
    plan = _plan()
    ledger = Ledger(LabState(plan.config), plan.paths.state, persist=False)
    names = [name for name, _ in lifecycle.steps(plan, ledger, Supervisor(plan, ledger), runner=_no_commands)]
    assert names == [
        "create namespaces",
        "wire tenant a (router)",
        "wire tenant b (isolated)",
        f"router rules in {plan.tenant('a').router_ns}",
        "seed the registry",
        "make the identity signing key",
        "start meta169 serve and proxy",
        "start dnsmasq for net-a",
        "start dnsmasq for net-b",
        "start dhclient in every VM",
        "check VM addresses and routes",
        "wait for IPv6 duplicate address detection",
    ]


def _no_commands(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult:
    raise AssertionError("listing the steps must run nothing")


def test_lab_ledger_writes_every_update(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    ledger = Ledger(LabState(plan.config), plan.paths.state)
    assert not plan.paths.state.exists()  # the constructor does no IO
    ledger.update(ledger.state.with_process(ProcessRecord("serve", 42)))
    other = Ledger(LabState(plan.config), plan.paths.state)
    assert other.reload() and other.state.process("serve") == ProcessRecord("serve", 42)


def test_lab_ledger_writes_nothing_when_told_or_without_a_directory(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    Ledger(LabState(plan.config), plan.paths.state, persist=False).update(LabState(plan.config, status="up"))
    assert not plan.paths.state.exists()
    gone = _plan(tmp_path / "absent")
    Ledger(LabState(gone.config), gone.paths.state).update(LabState(gone.config, status="up"))
    assert not (tmp_path / "absent").exists()


def test_lab_ledger_reload_adopts_only_this_lab(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    ledger = Ledger(LabState(plan.config), plan.paths.state)
    assert not ledger.reload()  # no file yet
    stranger = lp.LabConfig(name="q", state_dir=tmp_path, python="/usr/bin/python3")
    Ledger(LabState(stranger), plan.paths.state).update(LabState(stranger, status="up"))
    assert not ledger.reload() and ledger.state.config.name == "p"


def test_lab_remove_files_deletes_only_the_labs(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    paths = plan.paths
    ours = [paths.state, paths.listeners, paths.registry, paths.log("serve"), paths.pid_file("proxy")]
    for path in ours:
        path.write_text("x")
    paths.vm_dir("a1").mkdir()
    (paths.vm_dir("a1") / "dhclient.leases").write_text("x")
    paths.guest_root.mkdir()
    lifecycle.make_identity_key(plan)
    (tmp_path / "notes.txt").write_text("someone else's")
    lifecycle.remove_files(plan)
    assert not any(p.exists() for p in ours)
    assert not paths.vm_dir("a1").exists() and not paths.guest_root.exists()
    assert not paths.identity_dir.exists()
    assert (tmp_path / "notes.txt").read_text() == "someone else's"  # and so the directory stays
