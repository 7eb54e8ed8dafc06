"""The Debian package: built by ``make deb``, installed with apt into a fresh Debian 12,
serving there, purged without a trace, and checked by lintian.

The Debian 12 is a ``debootstrap --variant=minbase bookworm`` tree, made once and
cached under $META169_CACHE (with the package's dependencies included, so that
installing needs no network), then copied afresh for this module. The chroot
shares this host's network namespace: everything in it listens on 127.0.0.1.
Nothing is installed on the host; /proc is mounted inside the copy and unmounted,
and every process started in it is stopped by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.capabilities import require
from tests.counters import SUMMARY
from tests.integration.serving import one_instance_inventory
from tests.processes import free_port, stop

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("META169_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CHROOT_ENV = [
    "/usr/bin/env",
    "-i",
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
]
UNITS = (
    "meta169-serve.service",
    "meta169-proxy.service",
    "meta169-admin.service",
    "meta169-sync-libvirt.service",
    "meta169-sync-openstack.service",
)
# Paths only this package owns: none may survive a purge.
OWN_DIRS = ("/usr/lib/meta169", "/usr/share/doc/meta169", "/etc/meta169", "/var/lib/meta169")


pytestmark = pytest.mark.timeout(900)


def version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def cache_dir() -> Path:
    return Path(os.environ.get("META169_CACHE", str(ROOT / ".cache")))


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Unmount whatever is mounted inside ``path``, then delete it; never deletes through a mount."""
    for point in mounts_under(path):
        subprocess.run(["umount", point], check=False)
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)
    left = mounts_under(path)
    assert not left, f"still mounted, not deleting {path}: {left}"
    shutil.rmtree(path, ignore_errors=True)


# -- building ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make deb`` into a directory of this run; its time goes to the summary."""
    require("root", os.geteuid() == 0, "installing the build tools and the chroot need root")
    subprocess.run([str(ROOT / "scripts" / "install-system-deps"), "deb"], check=False)
    require(
        "python3.11-venv",
        subprocess.run(
            ["/usr/bin/python3.11", "-c", "import ensurepip, venv"], capture_output=True, check=False
        ).returncode
        == 0,
        "Debian's python3.11 with venv builds the package (apt-get install python3.11-venv)",
    )
    require("python3.11-dev", Path("/usr/include/python3.11/Python.h").exists(), "apt-get install python3.11-dev")
    require("gcc", shutil.which("gcc") is not None, "gcc compiles the fast path")
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "deb", f"DEB_OUT={out}"],
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
    )
    SUMMARY["deb build seconds"] = f"{time.monotonic() - started:.0f}"
    assert result.returncode == 0, result.stdout + result.stderr
    path = out / f"meta169_{version()}_amd64.deb"
    assert path.is_file(), (sorted(p.name for p in out.iterdir()), result.stdout)
    return path


def depends(deb: Path) -> list[str]:
    """Package names of the .deb's Depends (first of each alternative, no versions)."""
    text = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True).stdout
    return [re.split(r"[\s(]", item.split("|")[0].strip())[0] for item in text.split(",") if item.strip()]


@pytest.fixture(scope="module")
def debian12(deb: Path) -> Path:
    """A cached minbase Debian 12 with the package's dependencies installed."""
    require("debootstrap", shutil.which("debootstrap") is not None, "apt-get install debootstrap")
    include = sorted(set(depends(deb)))
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(include)}".encode()).hexdigest()[:12]
    target = cache_dir() / "debootstrap" / f"{SUITE}-minbase-{key}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.with_name(target.name + ".building")
    if building.exists():
        remove_tree(building)
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(include)}", SUITE, str(building), MIRROR],
            capture_output=True,
            check=False,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    except BaseException:
        remove_tree(building)
        raise
    SUMMARY["debootstrap seconds"] = f"{time.monotonic() - started:.0f}"
    (building / ".complete").write_text(" ".join(include) + "\n")
    if target.exists():
        remove_tree(target)
    building.rename(target)
    return target


@dataclass
class Chroot:
    root: Path
    pids: list[int] = field(default_factory=list)

    def run(
        self, *argv: str, user: tuple[int, int] | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*argv, user=user), check=False, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def argv(self, *argv: str, user: tuple[int, int] | None = None, env: tuple[str, ...] = ()) -> list[str]:
        who = [f"--userspec={user[0]}:{user[1]}", f"--groups={user[1]}"] if user else []
        home = "HOME=/var/lib/meta169" if user else "HOME=/root"
        return ["chroot", *who, str(self.root), *CHROOT_ENV, home, *env, *argv]

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def ids(self, name: str) -> tuple[int, int] | None:
        for line in self.path("/etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == name:
                return int(parts[2]), int(parts[3])
        return None

    def group_id(self, name: str) -> int | None:
        for line in self.path("/etc/group").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == name:
                return int(parts[2])
        return None


@pytest.fixture(scope="module")
def chroot(debian12: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroot]:
    root = tmp_path_factory.mktemp("debian12") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(debian12), str(root)], check=True)
    box = Chroot(root)
    # Package scripts must not start services here, whatever they try.
    policy = box.path("/usr/sbin/policy-rc.d")
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    subprocess.run(["mount", "-t", "proc", "proc", str(box.path("/proc"))], check=True)
    try:
        yield box
    finally:
        for pid in box.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_tree(root)


@pytest.fixture(scope="module")
def installed(chroot: Chroot, deb: Path) -> list[str]:
    """apt-get install ./meta169_*.deb in the chroot; the package's paths."""
    shutil.copy(deb, chroot.path("/tmp") / deb.name)
    started = time.monotonic()
    chroot.run("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}")
    SUMMARY["deb install seconds"] = f"{time.monotonic() - started:.0f}"
    return chroot.run("dpkg", "-L", "meta169").stdout.split()


# -- the tests -------------------------------------------------------------------------------------


def test_deb_package_installs_program_units_and_config(chroot: Chroot, installed: list[str]) -> None:
    assert chroot.run("/usr/bin/meta169", "--version").stdout.split()[-1] == version()
    probe = "import sys; from meta169.http import wire; print(sys.prefix, sys.base_prefix, wire.compiled())"
    assert chroot.run("/usr/bin/meta169", "--help").returncode == 0
    # Debian's interpreter, this venv, and the compiled fast path.
    assert chroot.run("/usr/lib/meta169/bin/python3", "-c", probe).stdout.split() == [
        "/usr/lib/meta169",
        "/usr",
        "True",
    ]
    for name in UNITS:
        assert f"/lib/systemd/system/{name}" in installed
    # Every document a unit's Documentation= names is in the package.
    for unit in UNITS:
        for line in (ROOT / "packaging" / "systemd" / unit).read_text().splitlines():
            if line.startswith("Documentation="):
                for url in line.removeprefix("Documentation=").split():
                    assert url.removeprefix("file:") in installed, (unit, url)
    ids = chroot.ids("meta169")
    gid = chroot.group_id("meta169")
    assert ids is not None and gid is not None and ids[1] == gid
    assert ids[0] < 1000, "a system user"
    config = chroot.path("/etc/meta169/meta169.toml").stat()
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o640, 0, gid)
    etc = chroot.path("/etc/meta169").stat()
    assert (stat.S_IMODE(etc.st_mode), etc.st_uid, etc.st_gid) == (0o750, 0, gid)
    state = chroot.path("/var/lib/meta169").stat()
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o700, ids[0], gid)
    # Byte code is made by postinst, for this interpreter.
    assert list(chroot.path("/usr/lib/meta169/lib").rglob("__pycache__/cli.cpython-311.pyc"))


def test_deb_package_reinstall_keeps_an_edited_config_and_its_modes(
    chroot: Chroot, installed: list[str], deb: Path
) -> None:
    config = chroot.path("/etc/meta169/meta169.toml")
    config.write_text(config.read_text() + "\n# edited by the administrator\n")
    chroot.run("apt-get", "install", "-y", "-q", "--reinstall", f"/tmp/{deb.name}")
    assert config.read_text().endswith("# edited by the administrator\n")
    gid = chroot.group_id("meta169")
    st = config.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)


def _unit_exec_start(chroot: Chroot, name: str) -> list[str]:
    for line in chroot.path(f"/lib/systemd/system/{name}").read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=").split()
    raise AssertionError(f"{name} has no ExecStart")


def test_deb_package_serve_answers_from_the_chroot(chroot: Chroot, installed: list[str]) -> None:
    ids = chroot.ids("meta169")
    assert ids is not None
    chroot.path("/tmp/inventory.yaml").write_text(one_instance_inventory())
    chroot.path("/tmp/inventory.yaml").chmod(0o644)
    # As the unit's user, with the shipped config (read by default) naming the registry.
    assert chroot.run("/usr/bin/meta169", "config", "check", user=ids).stdout.strip().endswith(": ok")
    chroot.run("/usr/bin/meta169", "import", "/tmp/inventory.yaml", user=ids)
    # What RuntimeDirectory= would make, and a notify socket the service can reach.
    runtime = chroot.path("/run/meta169")
    runtime.mkdir(mode=0o750, exist_ok=True)
    os.chown(runtime, *ids)
    notify_dir = chroot.path("/run/meta169-test")
    notify_dir.mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_dir / "notify"))
        (notify_dir / "notify").chmod(0o666)
        notify.settimeout(30)
        argv = [*_unit_exec_start(chroot, "meta169-serve.service"), "--listen", f"127.0.0.1:{port}=network:net-a"]
        log = chroot.path("/tmp/serve.log").open("wb")
        proc = subprocess.Popen(
            chroot.argv(*argv, user=ids, env=("NOTIFY_SOCKET=/run/meta169-test/notify",)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        chroot.pids.append(proc.pid)
        try:
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                pytest.fail("no READY=1 within 30s:\n" + chroot.path("/tmp/serve.log").read_text())
            assert "READY=1" in message.splitlines(), message
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/openstack/latest/meta_data.json")
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status == 200, body
            assert json.loads(body)["uuid"] == "11111111-1111-4111-8111-111111111111"
        finally:
            stop(proc, 10)
            log.close()


def test_deb_package_lintian_finds_no_errors(deb: Path) -> None:
    require("lintian", shutil.which("lintian") is not None, "apt-get install lintian")
    started = time.monotonic()
    result = subprocess.run(
        ["lintian", "--no-tag-display-limit", str(deb)], check=False, capture_output=True, text=True, timeout=600
    )
    SUMMARY["lintian seconds"] = f"{time.monotonic() - started:.0f}"
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIXP]: ", line)]
    SUMMARY["lintian findings"] = str(len(tags)) + ("".join(f"\n  {t}" for t in tags) if tags else "")
    errors = [t for t in tags if t.startswith("E: ")]
    assert not errors, "\n".join(errors)


def deb_members(deb: Path) -> list[str]:
    """The files and symlinks (not directories) the .deb holds, as absolute paths."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    members = []
    for line in listing.splitlines():
        mode, _, _, _, _, name, *_ = line.split()
        if mode[0] in "-l":
            members.append(name.removeprefix("."))
    return members


def test_deb_package_purge_leaves_nothing(chroot: Chroot, installed: list[str], deb: Path) -> None:
    # Runs last in this module: it removes the package the other tests use.
    members = deb_members(deb)
    assert "/usr/bin/meta169" in members and "/etc/meta169/meta169.toml" in members
    assert set(members) <= set(installed)
    started = time.monotonic()
    chroot.run("dpkg", "--purge", "meta169")
    SUMMARY["deb purge seconds"] = f"{time.monotonic() - started:.0f}"
    left = [path for path in members if os.path.lexists(chroot.path(path))]
    assert not left, left
    assert not [d for d in OWN_DIRS if chroot.path(d).exists()]
    assert chroot.ids("meta169") is None and chroot.group_id("meta169") is None
    # (exits 1 when it lists nothing)
    overrides = chroot.run("dpkg-statoverride", "--list", check=False).stdout
    assert "meta169" not in overrides, overrides
    status = chroot.run("dpkg-query", "-W", "-f=${Status}", "meta169", check=False)
    assert "installed" not in status.stdout.replace("not-installed", ""), status.stdout
