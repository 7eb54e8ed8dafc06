"""A lab VM as a real guest: QEMU (TCG) booting the Debian 12 image of :mod:`~meta169.lab.image`.

A QEMU guest keeps the namespace a bare VM would have (``m169lab-NAME-a1``) and
its veth leg into the tenant's switch, but that leg is a port of a bridge in the
namespace, together with a tap; QEMU runs inside the namespace (``ip netns exec``)
and its virtio NIC, with the MAC the plan gives the VM, is that tap. So the guest's
frames enter the tenant's L2 exactly where a bare VM's would: dnsmasq's host entry
for the MAC gives it its address and option 121, and its packets to
169.254.169.254 take the router's REDIRECT (routed tenant) or reach the DHCP
namespace's own address (isolated tenant), then the proxy and serve. The
namespace has no address of its own and no route anywhere: QEMU has no user-mode
network and no host port.

The guest boots the image's kernel directly (``console=ttyS0``, serial output to
``console.log``) from a copy-on-write overlay of the cached root filesystem, one
per VM in its state directory. Its SMBIOS is what Nova's libvirt driver writes
(manufacturer OpenStack Foundation, product OpenStack Nova, serial and uuid the
instance's) or, for an EC2 guest, what cloud-init's ds-identify takes for AWS (uuid
and serial equal and starting with ``ec2``), so the guest's own ds-identify picks
the datasource. The lab reaches inside through qemu-guest-agent on a virtio-serial
port whose socket is in the VM's state directory (:mod:`~meta169.lab.agent`).

Pure: the command line, the SMBIOS, the files, what ``lab status`` shows. IO: the
bridge and tap, the overlay, starting QEMU, waiting for the agent, and the guest
side of the lab's seams (routes, metadata GETs, the guest doctor) through the agent.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import shutil
import subprocess
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meta169
from meta169.errors import CommandFailed, LabError
from meta169.lab import agent as qga
from meta169.lab import plan as lp
from meta169.lab import processes
from meta169.lab.image import GuestImage
from meta169.lab.network import expected_metadata_hop
from meta169.lab.plan import LabPlan, VMPlan
from meta169.plumbing import netns
from meta169.plumbing.command import CommandResult, Runner, run

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
MEMORY_MIB = 1024
# Interfaces inside the guest's namespace (it has the veth leg VM_IFACE too).
GUEST_BRIDGE = "m169qbr"
GUEST_TAP = "m169qtap"
# net.ifnames=0 keeps the guest's NIC eth0, the name the lab's faults and the
# doctor's fixes use (as a bare VM's).
KERNEL_CMDLINE = "console=ttyS0 root=/dev/vda rw net.ifnames=0 panic=-1"
BOOT_TIMEOUT = 900.0  # seconds from QEMU's start until the agent answers (TCG, two guests on two cores)
SETTLE_TIMEOUT = 90.0  # seconds for a guest to see a break or heal: each probe starts python3 under TCG
GUEST_DOCTOR_DIR = "/run/meta169"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SUN_PATH_MAX = 107  # bytes in a Unix socket path (sockaddr_un.sun_path, less the NUL)

_OPENSTACK_VENDOR = ("OpenStack Foundation", "OpenStack Nova")  # nova/virt/libvirt/driver.py, sysinfo
_EC2_VENDOR = ("Amazon EC2", "Amazon EC2")


@dataclass(frozen=True, slots=True)
class GuestFiles:
    """One guest's files, in its VM directory of the lab's state directory."""

    directory: Path
    pid_file: Path

    @property
    def overlay(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.directory / "qga.sock"


def files(plan: LabPlan, vm: VMPlan) -> GuestFiles:
    paths = plan.paths
    return GuestFiles(paths.vm_dir(vm.name), paths.qemu_pid_file(vm.name))


def marker(plan: LabPlan, vm: str) -> str:
    """The argument only guest ``vm``'s QEMU carries: its pid file, in the lab's state directory."""
    return str(plan.paths.qemu_pid_file(vm))


def agent_socket(plan: LabPlan, vm: VMPlan) -> qga.AgentSocket:
    return qga.AgentSocket(files(plan, vm).agent_socket)


def image_of(plan: LabPlan) -> GuestImage:
    """The image the lab's guests boot (LabError when it is not there)."""
    directory = plan.config.guest_image
    if directory is None:
        raise LabError(f"lab {plan.name} has no guest image (meta169 lab guest build)")
    image = GuestImage(directory)
    for path in (image.kernel, image.initrd, image.rootfs):
        if not path.is_file():
            raise LabError(f"the guest image is incomplete: {path} is missing (meta169 lab guest build)")
    return image


def smbios(plan: LabPlan, vm: VMPlan) -> str:
    """QEMU's ``-smbios type=1,...``: the platform ds-identify reads from /sys/class/dmi/id."""
    manufacturer, product = _EC2_VENDOR if vm.datasource == "ec2" else _OPENSTACK_VENDOR
    # QEMU's option syntax doubles a comma inside a value; none of these has one.
    return f"type=1,manufacturer={manufacturer},product={product},serial={vm.uuid},uuid={vm.uuid}"


def qemu_argv(plan: LabPlan, vm: VMPlan, image: GuestImage) -> list[str]:
    """QEMU for guest ``vm``, as run inside its namespace: TCG, no display, no default
    devices, no network but the tap, the agent on a Unix socket."""
    f = files(plan, vm)
    return [
        QEMU_BINARY,
        "-name", f"{plan.prefix}{vm.name}",
        "-accel", "tcg",
        "-machine", "pc",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(MEMORY_MIB),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_CMDLINE,
        "-drive", f"file={f.overlay},format=qcow2,if=virtio,cache=unsafe",
        "-netdev", f"tap,id=net0,ifname={GUEST_TAP},script=no,downscript=no",
        # romfile= : no iPXE option ROM, the kernel is booted directly.
        "-device", f"virtio-net-pci,netdev=net0,mac={vm.mac},romfile=",
        "-smbios", smbios(plan, vm),
        # Entropy for the guest's getrandom(): ssh-keygen and Python block without it.
        "-device", "virtio-rng-pci",
        "-chardev", f"file,id=console,path={f.console}", "-serial", "chardev:console",
        "-chardev", f"socket,id=qga,path={f.agent_socket},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        "-pidfile", marker(plan, vm.name),
    ]  # fmt: skip


def overlay_argv(image: GuestImage, overlay: Path) -> list[str]:
    """``qemu-img`` making a copy-on-write overlay of the cached root filesystem."""
    return [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs), str(overlay)]


def describe(plan: LabPlan, vm: VMPlan) -> dict[str, Any]:
    """What ``lab status --json`` adds for a QEMU guest."""
    f = files(plan, vm)
    return {
        "datasource": vm.datasource,
        "console": str(f.console),
        "agent_socket": str(f.agent_socket),
        "overlay": str(f.overlay),
        "smbios": smbios(plan, vm),
        "image": None if plan.config.guest_image is None else str(plan.config.guest_image),
    }


def missing_tools() -> list[str]:
    return [t for t in (QEMU_BINARY, QEMU_IMG) if shutil.which(t) is None]


# --- IO: wiring, starting, waiting ------------------------------------------------------------


def wire(vm: VMPlan, *, runner: Runner = run) -> None:
    """In ``vm``'s namespace: a bridge joining its veth leg to a tap for QEMU's NIC.

    The namespace itself takes no part in IPv6 (no link-local address, no router
    solicitation of its own): only the guest speaks on the tenant's network.
    """
    ns = vm.netns
    for iface in (vm.iface, GUEST_BRIDGE, GUEST_TAP):
        netns.check_ifname(iface)
    runner(netns.ip_argv(ns, "link", "add", GUEST_BRIDGE, "type", "bridge", "mcast_snooping", "0"))
    runner(netns.ip_argv(ns, "tuntap", "add", "dev", GUEST_TAP, "mode", "tap"))
    for iface in (GUEST_BRIDGE, GUEST_TAP, vm.iface):
        runner(netns.ip_argv(ns, "link", "set", "dev", iface, "addrgenmode", "none"))
    for iface in (GUEST_TAP, vm.iface):
        runner(netns.ip_argv(ns, "link", "set", "dev", iface, "master", GUEST_BRIDGE))
    for iface in (GUEST_BRIDGE, GUEST_TAP, vm.iface):
        netns.link_up(ns, iface, runner=runner)


def start(plan: LabPlan, vm: VMPlan, *, log: Path) -> processes.Background:
    """Make ``vm``'s overlay and start its QEMU inside its namespace; returns at once
    (the guest boots for minutes: :func:`wait_booted`)."""
    missing = missing_tools()
    if missing:
        raise LabError(f"QEMU guests need {', '.join(missing)} (apt-get install qemu-system-x86 qemu-utils)")
    image = image_of(plan)
    f = files(plan, vm)
    if len(str(f.agent_socket).encode()) > _SUN_PATH_MAX:
        raise LabError(f"{f.agent_socket} is too long for a Unix socket path: use a shorter --state-dir")
    try:
        f.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        for stale in (f.overlay, f.console, f.agent_socket, f.pid_file):
            stale.unlink(missing_ok=True)
    except OSError as exc:
        raise LabError(f"cannot prepare {f.directory}: {exc}") from exc
    try:
        run(overlay_argv(image, f.overlay))
    except CommandFailed as exc:
        raise LabError(f"{vm.name}: cannot make its overlay of {image.rootfs}: {exc}") from exc
    argv = netns.in_netns(vm.netns, qemu_argv(plan, vm, image))
    return processes.start(f"qemu-{vm.name}", argv, log=log, pid_file=plan.paths.pid_file(f"qemu-{vm.name}"),
                           marker=marker(plan, vm.name))  # fmt: skip


def wait_booted(
    plan: LabPlan, vm: VMPlan, *, process: subprocess.Popen[bytes] | None, timeout: float = BOOT_TIMEOUT
) -> float:
    """Wait until ``vm``'s agent answers (qemu-guest-agent starts after cloud-init's
    network stage), then check that the guest has its planned address and routes
    169.254.169.254 via the hop option 121 names; the seconds it took.

    LabError, with the end of the serial console, when QEMU exits or the guest does
    not come up in ``timeout``.
    """
    f = files(plan, vm)
    started = time.monotonic()
    where = agent_socket(plan, vm)
    while not qga.ping(where, timeout=5.0):
        if process is not None and process.poll() is not None:
            raise LabError(f"{vm.name}: QEMU exited with status {process.returncode}; "
                           f"its log:\n{processes.tail(plan.paths.log(f'qemu-{vm.name}'))}\n"
                           f"its console:\n{processes.tail(f.console)}")  # fmt: skip
        if time.monotonic() - started > timeout:
            raise LabError(f"{vm.name}: the guest agent did not answer within {timeout:g}s; "
                           f"the end of its console ({f.console}):\n{processes.tail(f.console)}")  # fmt: skip
        time.sleep(2.0)
    check_network(plan, vm)
    return time.monotonic() - started


def check_network(plan: LabPlan, vm: VMPlan) -> None:
    """The guest has its planned address on eth0 and routes 169.254.169.254 via the hop
    option 121 names (LabError otherwise)."""
    guest = runner(plan, vm)
    want = ipaddress.ip_interface(f"{vm.ip}/{lp.SUBNET.prefixlen}")
    have = netns.parse_ip_addr_json(guest(["ip", "-j", "addr", "show", "dev", vm.iface]).stdout)
    if want not in have:
        raise LabError(f"{vm.name} (QEMU) has {', '.join(map(str, have)) or 'no address'} on {vm.iface}, not {want}")
    routes = json.loads(guest(["ip", "-j", "route", "get", str(lp.METADATA_V4)]).stdout or "[]")
    got = routes[0].get("gateway") if routes else None
    hop = str(expected_metadata_hop(vm))
    if got != hop:
        raise LabError(f"{vm.name} (QEMU) routes 169.254.169.254 via {got or 'on-link'}, not via {hop} (option 121)")


def remove_overlays(plan: LabPlan) -> list[str]:
    """Delete every guest's overlay, agent socket and pid file (after QEMU has stopped);
    problems. The console log stays, for what went wrong."""
    problems = []
    for vm in plan.qemu_vms:
        f = files(plan, vm)
        for path in (f.overlay, f.agent_socket, f.pid_file):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                problems.append(f"delete {path}: {exc}")
    return problems


# --- IO: the guest side of the lab's seams, through the agent ---------------------------------


def runner(plan: LabPlan, vm: VMPlan) -> qga.AgentRunner:
    """A Runner whose commands run inside guest ``vm``."""
    return qga.AgentRunner(agent_socket(plan, vm))


def exec_in(
    plan: LabPlan, vm: VMPlan, argv: Sequence[str], *, input: str | None = None, check: bool = False,
    timeout: float | None = None,
) -> CommandResult:  # fmt: skip
    """Run ``argv`` inside guest ``vm`` and wait for it."""
    return runner(plan, vm)(argv, input=input, check=check, timeout=timeout)


# Run by the guest's python3: one GET of http://169.254.169.254PATH, after an IMDSv2
# token PUT when asked to (an EC2 guest's instance requires tokens). Prints JSON.
_PROBE = """\
import http.client, json, sys
path, token = sys.argv[1], sys.argv[2] == "1"
def ask(method, headers):
    conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
    try:
        conn.request(method, path if method == "GET" else "/latest/api/token", headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()
try:
    headers = {}
    if token:
        status, body = ask("PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        if status != 200:
            print(json.dumps({"status": status, "body": body.decode("latin-1")}))
            sys.exit(0)
        headers["X-aws-ec2-metadata-token"] = body.decode()
    status, body = ask("GET", headers)
    print(json.dumps({"status": status, "body": body.decode("latin-1")}))
except OSError as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def metadata(plan: LabPlan, vm: VMPlan, path: str = "/latest/meta-data/instance-id") -> tuple[int, bytes]:
    """One GET of http://169.254.169.254``path`` by the guest itself: (status, body).

    OSError when the guest's connection failed (as a bare VM's GET raises it).
    """
    token = "1" if vm.datasource == "ec2" else "0"
    result = exec_in(plan, vm, ["python3", "-c", _PROBE, path, token], check=True, timeout=60)
    try:
        reply = json.loads(result.stdout)
    except ValueError as exc:
        raise LabError(f"{vm.name}: the metadata probe printed {result.stdout[:200]!r}") from exc
    if "error" in reply:
        raise OSError(reply["error"])
    return int(reply["status"]), str(reply["body"]).encode("latin-1")


def await_metadata(plan: LabPlan, vm: VMPlan, *, status: int = 200, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until guest ``vm`` gets ``status`` for its instance-id (and, for 200, its own uuid)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, body = metadata(plan, vm)
            seen = f"HTTP {got} {body[:80]!r}"
            if got == status and (status != 200 or body == vm.uuid.encode()):
                return
        except OSError as exc:
            seen = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise LabError(f"{vm.name} (QEMU): GET http://{lp.METADATA_V4}/latest/meta-data/instance-id gave "
                           f"{seen} after {timeout:g}s, not HTTP {status}")  # fmt: skip
        time.sleep(1.0)


def doctor_bundle() -> tuple[bytes, str]:
    """This meta169's Python package as a zip (sources and data, no compiled extension)
    and its digest: what :func:`install_doctor` copies into a guest."""
    package = Path(meta169.__file__).resolve().parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(package.rglob("*")):
            rel = path.relative_to(package.parent)
            if not path.is_file() or "__pycache__" in rel.parts or path.suffix in (".so", ".c", ".pyc"):
                continue
            info = zipfile.ZipInfo(str(rel), date_time=(2020, 1, 1, 0, 0, 0))  # same bytes, same digest
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()[:16]


def install_doctor(plan: LabPlan, vm: VMPlan) -> str:
    """Copy this meta169 into guest ``vm`` through the agent (once per version), unpacked
    under /run/meta169; the PYTHONPATH that runs it there.

    The guest has Debian's python3 and python3-click (the image's recipe), which is
    all ``meta169 doctor`` imports.
    """
    data, digest = doctor_bundle()
    lib = f"{GUEST_DOCTOR_DIR}/{digest}"
    guest = runner(plan, vm)
    if guest(["test", "-f", f"{lib}/.complete"], check=False).returncode == 0:
        return lib
    archive = f"{GUEST_DOCTOR_DIR}/meta169-{digest}.zip"
    guest(["mkdir", "-p", GUEST_DOCTOR_DIR])
    with qga.GuestAgent(agent_socket(plan, vm)) as session:
        session.write_file(archive, data)
    unpack = ("import sys, zipfile, pathlib; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2]); "
              "pathlib.Path(sys.argv[2], '.complete').touch()")  # fmt: skip
    guest(["python3", "-c", unpack, archive, lib], timeout=120)
    guest(["rm", "-f", archive])
    return lib


def doctor(plan: LabPlan, vm: VMPlan, *extra: str, timeout: float = 300.0) -> CommandResult:
    """``meta169 doctor`` inside guest ``vm``, on the guest's own files, routes and leases."""
    lib = install_doctor(plan, vm)
    env = {"PATH": GUEST_PATH, "PYTHONPATH": lib, "LANG": "C.UTF-8"}  # the agent passes no environment on
    guest = qga.AgentRunner(agent_socket(plan, vm), env=env)
    return guest(["python3", "-m", "meta169", "doctor", *extra], check=False, timeout=timeout)


def console_text(plan: LabPlan, vm: VMPlan) -> bytes:
    """Everything guest ``vm`` wrote to its serial console so far."""
    path = files(plan, vm).console
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LabError(f"{vm.name} has no console log yet ({path})") from None
    except OSError as exc:
        raise LabError(f"cannot read {path}: {exc}") from exc
