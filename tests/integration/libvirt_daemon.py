"""A real, private libvirtd for the tests (Debian's libvirt-daemon), never the system's.

As root, libvirtd would use /etc/libvirt, /var/lib/libvirt and /run/libvirt. Run as
an unprivileged user it is a "session" daemon that keeps every file under $HOME and
$XDG_RUNTIME_DIR (libvirt.org/daemons.html), so the daemon here runs as 'nobody'
with both in a fresh temporary directory and its own ``--config`` putting the socket
there too. Root still connects to that socket (file permissions do not bind root).
Its qemu driver works without KVM for everything short of booting (defining,
undefining, metadata and their events), and its network driver reads DHCP leases
from the status files its lease helper would write (:meth:`LibvirtDaemon.write_leases`),
so no network is ever started and no host interface is touched.

Stopped by PID (its own process group) at the end, on failure too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.capabilities import require

LIBVIRTD_CANDIDATES = ("/usr/sbin/libvirtd", "/sbin/libvirtd")


@dataclass
class LibvirtDaemon:
    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The qemu driver in session mode, over this daemon's socket."""
        return f"qemu+unix:///session?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "libvirtd.log"

    def write_leases(self, bridge: str, leases: list[dict[str, object]]) -> None:
        """The lease file libvirt's lease helper keeps for a network's bridge, in its
        JSON format; libvirt reads it for virNetworkGetDHCPLeases."""
        folder = self.root / "run" / "libvirt" / "dnsmasq" / "lib"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{bridge}.status"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(leases))
        tmp.chmod(0o644)
        tmp.replace(path)


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        require("libvirtd", False, "no 'nobody' user to run a session libvirtd as")


def _libvirtd() -> str:
    for path in LIBVIRTD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("libvirtd")
    if found is None:
        require("libvirtd", False, "libvirtd not found (Debian: libvirt-daemon, scripts/install-system-deps test)")
    return found


def start(daemon: LibvirtDaemon, timeout: float = 60.0) -> None:
    """Start (or restart) the daemon in ``daemon.root`` and wait until it answers."""
    import libvirt

    user = _user()
    (daemon.root / "sock").mkdir(exist_ok=True)
    conf = daemon.root / "libvirtd.conf"
    conf.write_text(
        f'unix_sock_dir = "{daemon.root / "sock"}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        "log_level = 3\n"
    )
    # A guest booted by this daemon (as later tests may) logs to a file, not virtlogd.
    qemu_conf = daemon.root / "home" / ".config" / "libvirt" / "qemu.conf"
    qemu_conf.parent.mkdir(parents=True, exist_ok=True)
    qemu_conf.write_text('stdio_handler = "file"\n')
    for path in (daemon.root, *daemon.root.rglob("*")):
        os.chown(path, user.pw_uid, user.pw_gid)
    env = {
        "HOME": str(daemon.root / "home"),
        "XDG_RUNTIME_DIR": str(daemon.root / "run"),
        "XDG_CONFIG_HOME": str(daemon.root / "home" / ".config"),
        "XDG_CACHE_HOME": str(daemon.root / "home" / ".cache"),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    (daemon.root / "run").mkdir(mode=0o700, exist_ok=True)
    os.chown(daemon.root / "run", user.pw_uid, user.pw_gid)
    with daemon.log.open("ab") as log:
        daemon.process = subprocess.Popen(
            [_libvirtd(), "--config", str(conf)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            start_new_session=True,
        )
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    deadline = time.monotonic() + timeout
    while True:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"libvirtd exited {daemon.process.returncode}: {daemon.log.read_text()[-2000:]}")
        try:
            libvirt.open(daemon.uri).close()
            return
        except libvirt.libvirtError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"libvirtd did not answer within {timeout}s: {daemon.log.read_text()[-2000:]}"
                ) from exc
            time.sleep(0.05)


def stop(daemon: LibvirtDaemon) -> None:
    """Stop the daemon and anything it started (its process group), by its PID."""
    process = daemon.process
    if process is None:
        return
    daemon.process = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    # Whatever else was left in its group (a capability probe) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def libvirt_daemon() -> Iterator[LibvirtDaemon]:
    """A started private daemon; stopped and its directory removed afterwards."""
    require("root", os.geteuid() == 0, "a private libvirtd runs as 'nobody', started by root")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require("libvirt-python", False, "the libvirt binding is not installed (pip install -e '.[test]')")
    _libvirtd()
    # Not under pytest's tmp dirs: those are 0700 root and the daemon's user must reach it.
    daemon = LibvirtDaemon(Path(tempfile.mkdtemp(prefix="meta169-libvirtd-")))
    try:
        start(daemon)
        yield daemon
    finally:
        stop(daemon)
        shutil.rmtree(daemon.root, ignore_errors=True)
