"""``meta169 lab`` up, status, exec and down, from the CLI and from Python, leave nothing.

"Nothing" is checked from outside: no namespace with the lab's prefix
(``ip netns list``), no process whose arguments name a file of its state directory
(/proc), and the host namespace's own links untouched throughout (the lab never has
a leg there). A failing ``lab up``, and a ``lab up`` killed halfway, are cleaned up
too: the first by itself, the second by ``lab down``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.errors import LabError
from meta169.lab import Lab, LabConfig
from meta169.lab import plan as lp
from meta169.plumbing.command import run
from tests.e2e.lab_fixture import lab_config, require_lab

pytestmark = pytest.mark.e2e


@pytest.fixture
def config() -> Iterator[LabConfig]:
    """A fresh lab config; whatever a test leaves is swept by ``lab down`` afterwards."""
    cfg = lab_config()
    require_lab(cfg)
    try:
        yield cfg
    finally:
        try:
            Lab.down_named(cfg)
        finally:
            shutil.rmtree(cfg.directory, ignore_errors=True)


def _cli(cfg: LabConfig, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "meta169", "lab", *args[:1], "--name", cfg.name, "--state-dir", str(cfg.directory)]
    return subprocess.run([*argv, *args[1:]], capture_output=True, text=True, timeout=timeout, check=False)


def _netns_list() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def _host_links() -> set[str]:
    return {f"{link['ifname']}/{link.get('address', '')}" for link in json.loads(run(["ip", "-j", "link"]).stdout)}


def _lab_processes(cfg: LabConfig) -> list[tuple[int, str]]:
    """Processes (other than this one) with an argument inside the lab's state directory."""
    inside = f"{cfg.directory}/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(inside in a for a in args):
            found.append((int(entry.name), " ".join(args)))
    return found


def _assert_nothing_left(cfg: LabConfig) -> None:
    prefix = lp.netns_prefix(cfg.name)
    assert [n for n in _netns_list() if n.startswith(prefix)] == []
    assert _lab_processes(cfg) == []


def test_lab_cli_up_status_exec_down_leaves_nothing(config: LabConfig) -> None:
    links_before = _host_links()
    up = _cli(config, "up", "--json")
    assert up.returncode == 0, up.stderr
    shown = json.loads(up.stdout)
    assert shown["status"] == "up"
    assert _host_links() == links_before  # no leg of the lab in the host namespace

    status = _cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    vms = {vm["name"]: vm for vm in data["vms"]}
    assert sorted(vms) == ["a1", "a2", "b1", "b2"]
    for vm in vms.values():
        assert set(vm) >= {"name", "netns", "uuid", "hostname", "ip", "mac", "network", "tenant", "mode"}
        assert vm["netns"] in _netns_list()
        assert vm["hostname"] == vm["name"]
    assert (vms["a1"]["ip"], vms["a1"]["mode"], vms["a1"]["network"]) == ("10.0.0.11", "router", "net-a")
    assert (vms["b1"]["ip"], vms["b1"]["mode"], vms["b1"]["network"]) == ("10.0.0.11", "isolated", "net-b")
    assert vms["a1"]["uuid"] != vms["b1"]["uuid"]
    roles = {p["role"]: p for p in data["processes"]}
    assert {"serve", "proxy", "dnsmasq-a", "dnsmasq-b", "dhclient-a1", "dhclient-b2"} <= set(roles)
    assert all(p["alive"] for p in roles.values()), roles

    human = _cli(config, "status")
    assert human.returncode == 0 and "m169lab-" in human.stdout and "isolated" in human.stdout

    shown_addr = _cli(config, "exec", "b2", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert shown_addr.returncode == 0, shown_addr.stderr
    assert " 10.0.0.12/24 " in shown_addr.stdout
    failing = _cli(config, "exec", "a1", "--", "sh", "-c", "exit 7")
    assert failing.returncode == 7
    unknown = _cli(config, "exec", "z9", "--", "true")
    assert unknown.returncode == 2 and "no VM 'z9'" in unknown.stderr

    again = _cli(config, "up")
    assert again.returncode == 4 and "already up" in again.stderr

    down = _cli(config, "down")
    assert down.returncode == 0, down.stderr
    assert "9 namespaces" in down.stdout
    _assert_nothing_left(config)
    assert not config.directory.exists() or not any(config.directory.iterdir())
    assert _host_links() == links_before
    gone = _cli(config, "status")
    assert gone.returncode == 4 and "no lab" in gone.stderr


def test_lab_down_after_killed_up_removes_everything(config: LabConfig) -> None:
    # Kill `lab up` as soon as its background servers exist: namespaces, rules and
    # processes are half made, and the state file may lag behind the last step.
    argv = [sys.executable, "-m", "meta169", "lab", "up", "--name", config.name, "--state-dir", str(config.directory)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    try:
        while not (config.directory / "proxy.pid").exists():
            assert proc.poll() is None, "lab up ended before it could be interrupted"
            assert time.monotonic() < deadline, "lab up never started the proxy"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert any(n.startswith(lp.netns_prefix(config.name)) for n in _netns_list())
    assert _lab_processes(config) != []

    down = _cli(config, "down")
    assert down.returncode == 0, down.stderr
    _assert_nothing_left(config)


def test_lab_down_without_state_file_sweeps_by_prefix(config: LabConfig) -> None:
    up = _cli(config, "up")
    assert up.returncode == 0, up.stderr
    (config.directory / "lab.json").unlink()
    down = _cli(config, "down")
    assert down.returncode == 0, down.stderr
    assert "9 namespaces" in down.stdout
    _assert_nothing_left(config)


@pytest.mark.parametrize(
    ("binary", "step"),
    [("dnsmasq_binary", "start dnsmasq for net-a"), ("dhclient_binary", "start dhclient in every VM")],
)
def test_lab_failed_up_removes_what_it_made(config: LabConfig, binary: str, step: str) -> None:
    # /bin/false exists (the prerequisite check passes) and fails when started:
    # the failure comes after namespaces, rules, serve and proxy exist.
    broken = LabConfig(**{**config.to_json(), "state_dir": config.directory, binary: "/bin/false"})
    links_before = _host_links()
    with pytest.raises(LabError) as info:
        Lab.up(broken)
    message = str(info.value)
    assert f"step '{step}'" in message and "everything it had made was removed" in message, message
    _assert_nothing_left(config)
    assert _host_links() == links_before
    recorded = json.loads((config.directory / "lab.json").read_text())
    assert recorded["status"] == "failed" and recorded["namespaces"] == [] and recorded["processes"] == []
    # The logs stay for the post-mortem; a new `lab up` of the same name works.
    assert (config.directory / "serve.log").exists()
    rebuilt = Lab.up(config)
    try:
        assert rebuilt.status()["status"] == "up"
    finally:
        rebuilt.down()
    _assert_nothing_left(config)
