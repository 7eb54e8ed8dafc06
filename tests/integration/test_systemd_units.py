"""The systemd units in packaging/systemd: valid, hardened, and true to the services.

systemd is not PID 1 on every machine this suite runs on, so nothing here asks a
running manager. ``systemd-analyze verify`` and ``security --offline=yes`` read
the unit files themselves. Their ExecStart names /usr/bin/meta169, which the
package installs and this host does not have, and verify refuses a unit whose
program is missing: the files are checked as copies with that one path replaced
by this venv's meta169 (everything else byte for byte).

Each service is then started the way its unit starts it: the command line and
Environment= lines are read from the unit file, with this venv's meta169 for
/usr/bin/meta169, a config file of the test's own for /etc/meta169/meta169.toml
(and its clouds.yaml for /etc/meta169/clouds.yaml); the test plays the manager's
part of the protocol (a NOTIFY_SOCKET to receive on, WATCHDOG_USEC, the unit's
UMask=). The sync units follow a loopback OpenStack of the API references'
samples (tests/integration/openstack_cloud.py) and a private libvirtd
(tests/integration/libvirt_daemon.py), never the host's.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.capabilities import require
from tests.counters import SUMMARY
from tests.integration import libvirt_daemon as daemons
from tests.integration.notify import Manager, manager_at
from tests.integration.openstack_cloud import running_cloud
from tests.integration.serving import ServeProcess, imported_registry, one_instance_inventory, start_serve
from tests.processes import free_port, stop

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "packaging" / "systemd"
# Each unit and what its ExecStart runs after `meta169 --config FILE`.
COMMANDS = {
    "meta169-serve.service": "serve",
    "meta169-proxy.service": "proxy",
    "meta169-admin.service": "admin",
    "meta169-sync-libvirt.service": "sync libvirt --watch",
    "meta169-sync-openstack.service": "sync openstack --watch",
}
UNITS = tuple(COMMANDS)
INSTALLED_BINARY = "/usr/bin/meta169"
INSTALLED_CONFIG = "/etc/meta169/meta169.toml"
INSTALLED_CLOUDS = "/etc/meta169/clouds.yaml"
MAX_SERVE_EXPOSURE = 2.5
# The manager's watchdog timeout in these tests: short, so pings come quickly.
WATCHDOG_USEC = 1_000_000


# -- the unit files as data -------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}``; systemd's syntax for what the units use
    (comments, repeated keys, backslash continuation)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((UNIT_DIR / name).read_text())


def service_value(name: str, key: str) -> str:
    values = unit(name)["Service"].get(key, [])
    assert len(values) == 1, f"{name}: {key}= appears {len(values)} times"
    return values[0]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_is_notify_with_watchdog_reload_and_restart(name: str) -> None:
    service = unit(name)["Service"]
    assert service_value(name, "Type") == "notify"
    # Workers report to the main process, which alone notifies.
    assert service_value(name, "NotifyAccess") == "main"
    assert service_value(name, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert service_value(name, "Restart") == "on-failure"
    assert int(service_value(name, "WatchdogSec")) > 0
    assert service_value(name, "UMask") == "0077"
    assert service["ExecStart"] == [f"{INSTALLED_BINARY} --config {INSTALLED_CONFIG} {COMMANDS[name]}"]
    assert unit(name)["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_runs_as_meta169_with_only_the_capabilities_it_needs(name: str) -> None:
    assert service_value(name, "User") == "meta169"
    caps = set(service_value(name, "CapabilityBoundingSet").split())
    ambient = set(service_value(name, "AmbientCapabilities").split())
    if name == "meta169-proxy.service":
        # setns(2) into the namespaces, and port 80 in isolated mode.
        assert caps == ambient == {"CAP_SYS_ADMIN", "CAP_NET_BIND_SERVICE"}
        assert service_value(name, "RestrictNamespaces") == "net"
    else:
        assert caps == ambient == set()
        assert service_value(name, "RestrictNamespaces") == "yes"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectControlGroups"):
        assert service_value(name, key) == "yes", key
    assert service_value(name, "ProtectSystem") == "strict"
    assert service_value(name, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


# -- systemd-analyze ----------------------------------------------------------------------------


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    require("systemd-analyze", path is not None, "systemd-analyze is not installed (package systemd)")
    assert path is not None
    return path


def _venv_meta169() -> Path:
    path = Path(sys.executable).with_name("meta169")
    require("venv meta169", path.exists(), f"{path} is missing: install the package into the venv")
    return path


def _copy_units(dest: Path) -> dict[str, Path]:
    """The units with /usr/bin/meta169 replaced by this venv's meta169."""
    binary = str(_venv_meta169())
    out = {}
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert text.count(INSTALLED_BINARY) == 1, f"{name}: expected one {INSTALLED_BINARY}"
        out[name] = dest / name
        out[name].write_text(text.replace(INSTALLED_BINARY, binary))
    return out


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    units = _copy_units(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units.values())],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even for some warnings; any line naming our units is a finding.
    findings = [line for line in result.stderr.splitlines() if "meta169" in line]
    assert result.returncode == 0 and not findings, result.stderr


def exposure(analyze: str, path: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    return float(found.group(1))


def test_systemd_units_security_exposure(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    units = _copy_units(tmp_path)
    scores = {name: exposure(analyze, path) for name, path in units.items()}
    SUMMARY["systemd-analyze security exposure"] = ", ".join(f"{n}={s}" for n, s in scores.items())
    for name in ("meta169-serve.service", "meta169-admin.service", "meta169-sync-openstack.service"):
        assert scores[name] <= MAX_SERVE_EXPOSURE, scores
    # No private user namespace: libvirtd authorizes by the client's group.
    assert scores["meta169-sync-libvirt.service"] <= MAX_SERVE_EXPOSURE + 0.5, scores
    # The proxy keeps CAP_SYS_ADMIN to join namespaces; still far from systemd's "UNSAFE" (9+).
    assert scores["meta169-proxy.service"] <= 5.0, scores


# -- the services, started as their units start them --------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    with manager_at(tmp_path / "notify") as made:
        yield made


def unit_command(
    name: str, config: Path, files: dict[str, Path] | None = None
) -> tuple[list[str], dict[str, str], int]:
    """argv, environment and umask of the unit's ExecStart, for this venv and ``config``;
    ``files`` stand in for other installed paths the unit names (in argv or Environment=)."""
    service = unit(name)["Service"]
    instead = {INSTALLED_CONFIG: str(config), **{k: str(v) for k, v in (files or {}).items()}}
    argv = service["ExecStart"][0].split()
    assert argv[0] == INSTALLED_BINARY
    argv[0] = str(_venv_meta169())
    argv = [instead.get(arg, arg) for arg in argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    for line in service.get("Environment", []):
        for item in line.split():
            key, _, value = item.strip('"').partition("=")
            env[key] = instead.get(value, value)
    return argv, env, int(service_value(name, "UMask"), 8)


@contextlib.contextmanager
def started(
    name: str,
    config: Path,
    manager: Manager,
    log: Path,
    *,
    watchdog: bool = True,
    files: dict[str, Path] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    argv, env, umask = unit_command(name, config, files)
    env["NOTIFY_SOCKET"] = str(manager.path)
    if watchdog:
        env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, umask=umask
        )
    try:
        yield proc
    finally:
        stop(proc, 10)


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    url = imported_registry(tmp_path, one_instance_inventory(), name="inventory.yaml")
    return url


def write_config(path: Path, registry_url: str, section: str, settings: dict[str, object]) -> Path:
    def value(item: object) -> str:
        if isinstance(item, list):
            return "[" + ", ".join(value(x) for x in item) + "]"
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int):
            return str(item)
        return '"' + str(item) + '"'

    lines = ["[registry]", f"url = {value(registry_url)}", "", f"[{section}]"]
    lines += [f"{key} = {value(item)}" for key, item in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def assert_ready_then_watchdog(
    manager: Manager,
    proc: subprocess.Popen[bytes],
    log: Path,
    port: int,
    path: str,
    expect: int,
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    # At the moment READY=1 arrives the service must already answer.
    return assert_ready_when(manager, proc, log, lambda: http_get(port, path, headers) == expect)


def assert_ready_when(
    manager: Manager, proc: subprocess.Popen[bytes], log: Path, done: Callable[[], bool]
) -> dict[str, str]:
    """READY=1 with a STATUS=, ``done()`` already true when it arrives, then watchdog pings."""
    ready = manager.wait_for("READY", proc, log)
    assert done(), ready
    assert ready["READY"] == "1" and ready.get("STATUS"), ready
    # Two pings a watchdog period: at least two within 2.5 periods, with room for a busy machine.
    pings = 0
    deadline = time.monotonic() + 2.5 * WATCHDOG_USEC / 1e6
    while time.monotonic() < deadline:
        fields = manager.receive(max(0.01, deadline - time.monotonic()))
        if fields is not None and fields.get("WATCHDOG") == "1":
            pings += 1
    assert pings >= 2, manager.messages
    return ready


def test_systemd_unit_serve_notifies_ready_status_and_watchdog(
    tmp_path: Path, manager: Manager, registry_url: str
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "meta169.toml", registry_url, "serve", {"listen": [f"127.0.0.1:{port}=network:net-a"]}
    )
    log = tmp_path / "serve.log"
    with started("meta169-serve.service", config, manager, log) as proc:
        ready = assert_ready_then_watchdog(manager, proc, log, port, "/openstack/latest/meta_data.json", 200)
        assert re.fullmatch(r"serving 1 listeners, registry revision \d+", ready["STATUS"]), ready


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def test_systemd_unit_serve_workers_ready_together_and_a_stuck_worker_stops_the_pings(
    tmp_path: Path, manager: Manager, registry_url: str
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "meta169.toml",
        registry_url,
        "serve",
        {"listen": [f"127.0.0.1:{port}=network:net-a"], "workers": 2},
    )
    log = tmp_path / "serve.log"
    with started("meta169-serve.service", config, manager, log) as proc:
        ready = assert_ready_then_watchdog(manager, proc, log, port, "/openstack/latest/meta_data.json", 200)
        assert re.fullmatch(r"serving 1 listeners in 2 processes, registry revision \d+", ready["STATUS"]), ready
        (worker,) = _children(proc.pid)
        os.kill(worker, signal.SIGSTOP)
        try:
            # One period for pings already on their way, then none while it is stopped.
            time.sleep(WATCHDOG_USEC / 1e6)
            while manager.receive(0.01) is not None:
                pass
            quiet_since = len(manager.messages)
            time.sleep(2 * WATCHDOG_USEC / 1e6)
            while manager.receive(0.01) is not None:
                pass
            assert not [m for m in manager.messages[quiet_since:] if m.get("WATCHDOG")], manager.messages
        finally:
            os.kill(worker, signal.SIGCONT)
        manager.wait_for("WATCHDOG", proc, log, timeout=3 * WATCHDOG_USEC / 1e6)


@pytest.fixture
def upstream(tmp_path: Path, registry_url: str) -> Iterator[tuple[Path, ServeProcess]]:
    sock = tmp_path / "run" / "proxy.sock"
    srv = start_serve(registry_url, [f"unix:{sock}=proxy"])
    try:
        yield sock, srv
    finally:
        srv.stop()


def test_systemd_unit_proxy_notifies_ready_status_and_watchdog(
    tmp_path: Path, manager: Manager, registry_url: str, upstream: tuple[Path, ServeProcess]
) -> None:
    sock, _ = upstream
    port = free_port()
    config = write_config(
        tmp_path / "meta169.toml",
        registry_url,
        "proxy",
        {"upstream": f"unix:{sock}", "listen": [f"127.0.0.1:{port}=network:net-a"]},
    )
    log = tmp_path / "proxy.log"
    with started("meta169-proxy.service", config, manager, log) as proc:
        ready = assert_ready_then_watchdog(manager, proc, log, port, "/openstack/latest/meta_data.json", 200)
        assert ready["STATUS"] == f"proxying 1 listeners to unix:{sock}", ready


def test_systemd_unit_admin_notifies_ready_status_and_watchdog(
    tmp_path: Path, manager: Manager, registry_url: str
) -> None:
    port = free_port()
    token = tmp_path / "admin.token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o600)
    config = write_config(
        tmp_path / "meta169.toml", registry_url, "admin", {"listen": f"127.0.0.1:{port}", "token-file": str(token)}
    )
    log = tmp_path / "admin.log"
    with started("meta169-admin.service", config, manager, log) as proc:
        ready = assert_ready_then_watchdog(
            manager, proc, log, port, "/v1/instances", 200, {"Authorization": "Bearer " + "t" * 32}
        )
        assert re.fullmatch(rf"admin API on 127\.0\.0\.1:{port}, registry revision \d+", ready["STATUS"]), ready


def test_systemd_unit_without_watchdog_usec_sends_no_pings(tmp_path: Path, manager: Manager, registry_url: str) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "meta169.toml", registry_url, "serve", {"listen": [f"127.0.0.1:{port}=network:net-a"]}
    )
    log = tmp_path / "serve.log"
    with started("meta169-serve.service", config, manager, log, watchdog=False) as proc:
        manager.wait_for("READY", proc, log)
        time.sleep(1.5 * WATCHDOG_USEC / 1e6)
        while manager.receive(0.01) is not None:
            pass
        assert not [m for m in manager.messages if "WATCHDOG" in m], manager.messages


# -- the sync units -------------------------------------------------------------------------------


def registry_instances(registry_url: str) -> set[str]:
    from meta169.registry import open_registry

    registry = open_registry(registry_url)
    try:
        return {i.uuid for i in registry.list_instances()}
    finally:
        registry.close()


def assert_stops_cleanly(manager: Manager, proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, as systemctl stop sends it: STOPPING=1, then exit 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log.read_text()
    assert any(m.get("STOPPING") == "1" for m in [*manager.messages, *manager.drain()]), manager.messages


def test_systemd_unit_sync_openstack_notifies_ready_status_watchdog_and_stops(tmp_path: Path, manager: Manager) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    config = write_config(tmp_path / "meta169.toml", registry_url, "sync", {"cloud": "samples", "interval": 5})
    log = tmp_path / "sync.log"
    with (
        running_cloud(tmp_path),
        started(
            "meta169-sync-openstack.service",
            config,
            manager,
            log,
            files={INSTALLED_CLOUDS: tmp_path / "clouds.yaml"},
        ) as proc,
    ):
        ready = assert_ready_when(manager, proc, log, lambda: len(registry_instances(registry_url)) == 1)
        assert re.fullmatch(r"openstack:samples in sync at registry revision \d+", ready["STATUS"]), ready
        assert_stops_cleanly(manager, proc, log)


def test_systemd_unit_sync_libvirt_notifies_ready_status_watchdog_and_stops(tmp_path: Path, manager: Manager) -> None:
    import libvirt

    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    guest = str(uuidlib.uuid4())
    log = tmp_path / "sync.log"
    with daemons.libvirt_daemon() as daemon:
        conn = libvirt.open(daemon.uri)
        try:
            conn.defineXML(
                f"<domain type='qemu'><name>unit-guest</name><uuid>{guest}</uuid><memory>65536</memory>"
                "<os><type arch='x86_64'>hvm</type></os></domain>"
            )
        finally:
            conn.close()
        config = write_config(tmp_path / "meta169.toml", registry_url, "sync", {"uri": daemon.uri})
        with started("meta169-sync-libvirt.service", config, manager, log) as proc:
            ready = assert_ready_when(manager, proc, log, lambda: registry_instances(registry_url) == {guest})
            assert ready["STATUS"] == f"libvirt:{daemon.uri} in sync at registry revision 1", ready
            assert_stops_cleanly(manager, proc, log)
