"""A private *system* libvirtd, boxed in namespaces of the test's own, for a real guest
on a libvirt NAT network.

The session daemon of ``tests/integration/libvirt_daemon.py`` defines domains but
cannot start a network: a bridge, its dnsmasq and firewall rules need the system
daemon, run as root, which keeps its state in /etc/libvirt, /var/lib/libvirt and
/run. So this one runs

- in a network namespace the test made (``m169t-lv<hex>``): the network's bridge,
  dnsmasq, NAT and filter rules and the guest's tap are all there, with no link to
  the host's namespace;
- in a mount namespace of its own where /etc and /var are copy-on-write overlays of
  the host's (everything libvirt writes lands under the test's directory, the host's
  files are never changed) and /run is an empty tmpfs. The users Debian's
  libvirt-daemon-system package would create (libvirt-qemu, libvirt-dnsmasq) are
  added to the overlay's /etc/passwd and /etc/group only: libvirt resolves the
  former before it reads qemu.conf.

Its socket is in the test's directory, the one place both views share. It stops by
PID: every process in the network namespace is one this test started (libvirtd,
the dnsmasq it forks, QEMU, serve), so all of them get SIGTERM then SIGKILL, and
the namespace and directory are removed, on failure too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meta169.errors import LabError
from meta169.lab import agent as qga
from meta169.plumbing import netns
from meta169.plumbing.command import CommandResult
from tests.capabilities import require

LIBVIRTD = "/usr/sbin/libvirtd"
# What libvirt's qemu driver needs here: QEMU as root without the per-guest
# ownership changes, security labels, cgroups, /dev namespaces or virtlogd that a
# systemd host with libvirt-daemon-system provides.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
# Debian's libvirt-daemon-system: the users, with its uid/gid range.
SYSTEM_USERS = (
    ("libvirt-qemu", 64055, "/var/lib/libvirt"),
    ("libvirt-dnsmasq", 64056, "/var/lib/libvirt/dnsmasq"),
)


@dataclass
class LibvirtHost:
    root: Path
    netns: str
    process: subprocess.Popen[bytes] | None = None
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "libvirtd.log"

    def etc(self, relative: str) -> Path:
        """Where a file meant for the daemon's /etc goes (the overlay's upper layer)."""
        return self.root / "etc" / "upper" / relative

    def popen_in_netns(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the daemon's network namespace, output to ``ROOT/NAME.log``;
        stopped with everything else there."""
        with (self.root / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(
                netns.in_netns(self.netns, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.others.append(process)
        return process

    def tail(self, name: str, size: int = 3000) -> str:
        try:
            return (self.root / name).read_bytes()[-size:].decode(errors="replace")
        except OSError as exc:
            return f"({exc})"


def _sandbox_script(host: LibvirtHost) -> str:
    root = host.root
    users = "".join(
        f"echo {shlex.quote(f'{u}:x:{i}:{i}:{u}:{home}:/usr/sbin/nologin')} >> /etc/passwd\n"
        f"echo {shlex.quote(f'{u}:x:{i}:')} >> /etc/group\n"
        for u, i, home in SYSTEM_USERS
    )
    return (
        "set -e\n"
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={root}/etc/upper,workdir={root}/etc/work /etc\n"
        f"mount -t overlay overlay -o lowerdir=/var,upperdir={root}/var/upper,workdir={root}/var/work /var\n"
        "mount -t tmpfs -o mode=0755 tmpfs /run\n"
        f"{users}"
        "mkdir -p /var/lib/libvirt /var/cache/libvirt /var/log/libvirt\n"
        f"exec {LIBVIRTD} --config /etc/libvirt/libvirtd.conf\n"
    )


def start(host: LibvirtHost, *, network_hook: str | None = None, timeout: float = 60.0) -> None:
    """Write the daemon's configuration (and ``/etc/libvirt/hooks/network``), start
    it in its namespaces and wait until it answers."""
    import libvirt

    for part in ("etc/upper/libvirt/hooks", "etc/work", "var/upper", "var/work", "sock"):
        (host.root / part).mkdir(parents=True, exist_ok=True)
    host.etc("libvirt/qemu.conf").write_text(QEMU_CONF)
    host.etc("libvirt/libvirtd.conf").write_text(
        f'unix_sock_dir = "{host.socket.parent}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        f'log_outputs = "3:file:{host.log}"\n'
    )
    if network_hook is not None:
        hook = host.etc("libvirt/hooks/network")
        hook.write_text(network_hook)
        hook.chmod(0o755)
    netns.add(host.netns)
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _sandbox_script(host)]
    with (host.root / "libvirtd.out").open("ab") as out:
        host.process = subprocess.Popen(
            netns.in_netns(host.netns, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    deadline = time.monotonic() + timeout
    while True:
        if host.process.poll() is not None:
            raise RuntimeError(
                f"libvirtd exited {host.process.returncode}: {host.tail('libvirtd.out')}\n{host.tail('libvirtd.log')}"
            )
        try:
            libvirt.open(host.uri).close()
            return
        except libvirt.libvirtError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not answer within {timeout}s: {host.tail('libvirtd.log')}") from exc
            time.sleep(0.1)


def stop(host: LibvirtHost) -> None:
    """Destroy every running domain, then stop every process in the namespace (by PID)
    and remove the namespace."""
    if host.process is not None and host.process.poll() is None:
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(host.uri)
            try:
                for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.destroy()
            finally:
                conn.close()
    if netns.exists(host.netns):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in netns.pids(host.netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while netns.pids(host.netns) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not netns.pids(host.netns):
                break
    for process in (host.process, *host.others):
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
    host.process = None
    if netns.exists(host.netns):
        netns.delete(host.netns)


@contextlib.contextmanager
def libvirt_host(*, network_hook: str | None = None) -> Iterator[LibvirtHost]:
    """A started private system libvirtd; everything of it removed afterwards."""
    require("root", os.geteuid() == 0, "a system libvirtd in namespaces of the test's own needs root")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require("libvirt-python", False, "the libvirt binding is not installed (pip install -e '.[test]')")
    for tool in (LIBVIRTD, "/usr/sbin/dnsmasq"):
        require(f"executable {tool}", os.access(tool, os.X_OK), f"{tool} is missing (scripts/install-system-deps test)")
    require("overlayfs", "overlay" in Path("/proc/filesystems").read_text(), "the kernel has no overlay filesystem")
    # World-searchable: libvirt's dnsmasq drops to an unprivileged user.
    host = LibvirtHost(Path(tempfile.mkdtemp(prefix="m169lv-", dir="/tmp")), f"m169t-lv{secrets.token_hex(3)}")
    host.root.chmod(0o755)
    try:
        start(host, network_hook=network_hook)
        yield host
    finally:
        try:
            stop(host)
        finally:
            shutil.rmtree(host.root, ignore_errors=True)


class DomainAgent:
    """A domain's qemu-guest-agent through libvirt (``virDomainQemuAgentCommand``), as
    ``virsh qemu-agent-command`` reaches it; commands and replies as the lab's agent
    client encodes and checks them."""

    def __init__(self, domain: Any) -> None:
        self.domain = domain

    def call(self, command: str, arguments: dict[str, Any] | None = None, *, timeout: int = 10) -> Any:
        import libvirt_qemu

        reply = libvirt_qemu.qemuAgentCommand(self.domain, qga.encode(command, arguments).decode(), timeout, 0)
        return qga.result_of(json.loads(reply), command)

    def ping(self) -> bool:
        import libvirt

        try:
            self.call("guest-ping", timeout=5)
        except (libvirt.libvirtError, LabError):
            return False
        return True

    def exec(self, argv: list[str], *, timeout: float = 120.0) -> CommandResult:
        """Run ``argv`` in the guest and wait for it (LabError past ``timeout``)."""
        pid = int(self.call("guest-exec", qga.exec_arguments(argv))["pid"])
        deadline = time.monotonic() + timeout
        while True:
            done = qga.exec_status(self.call("guest-exec-status", {"pid": pid}), argv)
            if done is not None:
                return done
            if time.monotonic() > deadline:
                raise LabError(f"guest command {' '.join(argv)} did not finish in {timeout:g}s")
            time.sleep(0.5)
