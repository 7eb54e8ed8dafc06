"""The lab's real guest image: Debian 12 from Debian's packages, built once and cached by recipe.

``meta169 lab guest build`` runs ``mmdebstrap --variant=minbase`` as root into a
directory, with the kernel, systemd, cloud-init 22.4.2, qemu-guest-agent, a DHCP
client and openssh-server, and turns it into three files QEMU boots directly
(``-kernel``/``-initrd``, the root filesystem as a virtio disk): no partition
table, no bootloader. The root filesystem is ext4 made by ``mkfs.ext4 -d`` from the
directory, so no loop device or mount is needed.

The image is the guest a cloud boots: no root password (the guest agent is the way
in), no network configuration of its own (cloud-init writes it from the metadata),
``console=ttyS0`` on the kernel command line QEMU passes. It is kept small: no
documentation, man pages or translations, and only the kernel modules a virtio
guest loads.

A :class:`Recipe` is data; its :meth:`~Recipe.digest` (over everything that
shapes the image, not over the mirror it is fetched from) names the cache
directory ``<cache>/guest-image/debian12-<digest>``, so a changed recipe builds a
new image and an unchanged one is reused. A build happens under a lock, in a
temporary directory renamed into place at the end, so a half-built image is never
used. Knows nothing of the lab's topology or of QEMU's command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meta169.errors import LabError

RECIPE_VERSION = 1
IMAGE_DIR = "guest-image"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 1800.0  # seconds for mmdebstrap: a slow mirror, a fresh machine

KERNEL = "vmlinuz"
INITRD = "initrd.img"
ROOTFS = "rootfs.ext4"
MANIFEST = "image.json"

# What the guest needs beyond --variant=minbase. cloud-init brings isc-dhcp-client
# (its ephemeral DHCP in the local stage) and python3; systemd-networkd, part of
# systemd, applies the network config cloud-init renders; dbus lets cloud-init's
# hostnamectl work; python3-click and python3-sqlalchemy are what the guest doctor,
# copied in by the agent, imports beyond the standard library (its CLI loads the
# registry module, which imports SQLAlchemy, for ``doctor --host``).
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "qemu-guest-agent",
    "isc-dhcp-client",
    "openssh-server",
    "iproute2",
    "sudo",
    "python3-click",
    "python3-sqlalchemy",
    "zstd",
)

# The modules a virtio guest with an ext4 root loads (paths under
# /usr/lib/modules/VERSION/kernel); every other module is deleted, which takes the
# image from about 700 MB to about 330 MB.
KEEP_MODULES: tuple[str, ...] = (
    "arch/", "crypto/", "lib/", "block/", "mm/", "virt/",
    "fs/ext4/", "fs/jbd2/", "fs/mbcache.ko", "fs/nls/", "fs/autofs/",
    "net/core/", "net/ipv4/", "net/ipv6/", "net/packet/", "net/unix/",
    "drivers/virtio/", "drivers/block/virtio_blk.ko", "drivers/net/virtio_net.ko", "drivers/net/net_failover.ko",
    "drivers/char/", "drivers/input/", "drivers/acpi/", "drivers/firmware/", "drivers/rtc/",
)  # fmt: skip

# Before the kernel's package is configured: its initramfs holds only what mounts a
# virtio ext4 root (initramfs-tools' MODULES=list), a few MB instead of about 30.
ESSENTIAL_HOOK = """\
#!/bin/sh
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d"
printf 'MODULES=list\\nCOMPRESS=zstd\\n' > "$1/etc/initramfs-tools/conf.d/meta169.conf"
printf 'virtio_pci\\nvirtio_blk\\next4\\n' >> "$1/etc/initramfs-tools/modules"
"""

CUSTOMIZE_HOOK = """\
#!/bin/sh
set -eu
R="$1"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 0' > "$R/etc/fstab"
echo localhost > "$R/etc/hostname"
# An empty machine-id: systemd makes one at first boot, so no two guests share one.
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
# cloud-init's locale module regenerates locales unless the system locale is the one
# it applies (cloudinit/distros/debian.py apply_locale): a minute under TCG.
echo 'LANG=C.UTF-8' > "$R/etc/default/locale"
# No network configuration of the image's own: cloud-init renders it for networkd.
chroot "$R" systemctl enable systemd-networkd.service
# Nothing in the lab reaches a mirror or needs trimming; these only cost boot time.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer; do
  chroot "$R" systemctl disable "$unit" >/dev/null 2>&1 || true
done
kernel=$(ls "$R/usr/lib/modules")
cd "$R/usr/lib/modules/$kernel/kernel"
find . -name '*.ko*' | while read -r module; do
  keep=no
  for prefix in $KEEP_MODULES; do
    case "${module#./}" in "$prefix"*) keep=yes; break ;; esac
  done
  [ "$keep" = yes ] || rm -f "$module"
done
find . -type d -empty -delete
chroot "$R" depmod -a "$kernel"
"""


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything that shapes the guest image; its digest names the cache entry."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = PACKAGES
    keep_modules: tuple[str, ...] = KEEP_MODULES
    essential_hook: str = ESSENTIAL_HOOK
    customize_hook: str = CUSTOMIZE_HOOK
    rootfs_mib: int = 1536
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if not self.packages:
            raise LabError("a guest image recipe needs packages")
        if self.rootfs_mib < 512:
            raise LabError(f"a root filesystem of {self.rootfs_mib} MiB is too small for Debian with cloud-init")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "suite": self.suite,
            "packages": list(self.packages),
            "keep_modules": list(self.keep_modules),
            "essential_hook": self.essential_hook,
            "customize_hook": self.customize_hook,
            "rootfs_mib": self.rootfs_mib,
        }

    def digest(self) -> str:
        """16 hex digits of SHA-256 over the recipe's canonical JSON."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"debian12-{self.digest()}"


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built image: a kernel, its initramfs and a raw ext4 root filesystem."""

    directory: Path
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS

    def size_bytes(self) -> int:
        """Bytes the image takes on disk (the root filesystem is sparse)."""
        return sum(_allocated(p) for p in (self.kernel, self.initrd, self.rootfs))


def mmdebstrap_argv(recipe: Recipe, target: Path, hooks: Path, mirror: str) -> list[str]:
    """The ``mmdebstrap`` command that builds ``recipe`` into the directory ``target``.

    ``hooks`` holds the executable hook scripts :func:`write_hooks` wrote.
    """
    argv = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
        f"--include={','.join(recipe.packages)}",
        # Only the Release file's expiry is not checked (a snapshot mirror serves an
        # old one); signatures still are, with Debian's keyring.
        "--aptopt=Acquire::Check-Valid-Until \"false\"",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=force-confold",
        f"--essential-hook={hooks / 'essential'}",
        f"--customize-hook={hooks / 'customize'}",
        recipe.suite, str(target), mirror,
    ]  # fmt: skip
    return argv


def mkfs_argv(recipe: Recipe, source: Path, image: Path) -> list[str]:
    """``mkfs.ext4`` making ``image`` (sparse, ``rootfs_mib``) from the directory ``source``."""
    return ["mkfs.ext4", "-q", "-F", "-L", "meta169-root", "-d", str(source), str(image), f"{recipe.rootfs_mib}M"]


def images_dir(cache: Path) -> Path:
    return cache / IMAGE_DIR


def find_image(cache: Path, recipe: Recipe | None = None) -> GuestImage | None:
    """The cached image of ``recipe`` (the default one), or None when it is not built."""
    recipe = recipe or Recipe()
    directory = images_dir(cache) / recipe.name
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(directory, manifest)
    if not all(p.is_file() for p in (image.kernel, image.initrd, image.rootfs)):
        return None
    return image


def missing_tools() -> list[str]:
    """The programs a build needs that are not on PATH."""
    return [t for t in ("mmdebstrap", "mkfs.ext4") if shutil.which(t) is None]


def build_image(
    cache: Path,
    recipe: Recipe | None = None,
    *,
    mirror: str = DEFAULT_MIRROR,
    force: bool = False,
    log: Callable[[str], None] = lambda _line: None,
) -> GuestImage:
    """The image of ``recipe``: the cached one, or built now (as root; minutes).

    LabError when a tool is missing, the build fails (its log's tail is in the
    message), or the image directory cannot be written.
    """
    recipe = recipe or Recipe()
    if not force and (found := find_image(cache, recipe)) is not None:
        return found
    if os.geteuid() != 0:
        raise LabError("building the guest image runs mmdebstrap as root: run it as root")
    missing = missing_tools()
    if missing:
        raise LabError(f"building the guest image needs {', '.join(missing)} (apt-get install mmdebstrap e2fsprogs)")
    root = images_dir(cache)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create {root}: {exc}") from exc
    with _locked(root / ".lock"):
        # Another build may have finished while this one waited for the lock.
        if not force and (found := find_image(cache, recipe)) is not None:
            return found
        return _build(root, recipe, mirror, log)


def _build(root: Path, recipe: Recipe, mirror: str, log: Callable[[str], None]) -> GuestImage:
    work = root / f".build-{recipe.name}-{os.getpid()}"
    final = root / recipe.name
    _remove_tree(work)
    try:
        hooks = work / "hooks"
        tree = work / "root"
        out = work / "image"
        hooks.mkdir(parents=True)
        out.mkdir()
        write_hooks(recipe, hooks)
        started = time.monotonic()
        log(f"mmdebstrap {recipe.suite} from {mirror} into {tree} ({len(recipe.packages)} packages beyond minbase)")
        _run(mmdebstrap_argv(recipe, tree, hooks, mirror), work / "mmdebstrap.log", timeout=BUILD_TIMEOUT)
        bootstrapped = time.monotonic()
        kernel, initrd = _boot_files(tree)
        shutil.copyfile(kernel, out / KERNEL)
        shutil.copyfile(initrd, out / INITRD)
        tree_bytes = _tree_size(tree)
        log(f"mkfs.ext4 -d: {tree_bytes / 2**20:.0f} MiB of files into a {recipe.rootfs_mib} MiB root filesystem")
        _run(mkfs_argv(recipe, tree, out / ROOTFS), work / "mkfs.log", timeout=600)
        manifest = {
            "name": recipe.name,
            "recipe": recipe.to_json(),
            "mirror": mirror,
            "kernel_version": kernel.name.removeprefix("vmlinuz-"),
            "packages": _versions(tree, ("cloud-init", "systemd", "qemu-guest-agent", "linux-image-amd64")),
            "built_at": time.time(),
            "bootstrap_seconds": round(bootstrapped - started, 1),
            "build_seconds": round(time.monotonic() - started, 1),
            "tree_bytes": tree_bytes,
        }
        image = GuestImage(out, manifest)
        manifest["image_bytes"] = image.size_bytes()
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _remove_tree(tree)
        _remove_tree(final)
        os.replace(out, final)
    except OSError as exc:
        raise LabError(f"building the guest image in {work}: {exc}") from exc
    finally:
        _remove_tree(work)
    found = find_image(root.parent, recipe)
    if found is None:
        raise LabError(f"the guest image {final} is incomplete after its build")
    return found


def write_hooks(recipe: Recipe, hooks: Path) -> None:
    """The hook scripts mmdebstrap runs, executable, in ``hooks``."""
    keep = " ".join(recipe.keep_modules)
    customize = recipe.customize_hook.replace("$KEEP_MODULES", keep)
    for name, text in (("essential", recipe.essential_hook), ("customize", customize)):
        path = hooks / name
        path.write_text(text)
        path.chmod(0o755)


def _run(argv: list[str], log: Path, *, timeout: float) -> None:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    try:
        with open(log, "wb") as out:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False, env=env)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{argv[0]} did not finish in {timeout:g}s; its log: {log}") from exc
    except OSError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise LabError(f"{argv[0]} exited {proc.returncode}:\n{tail}")


def _boot_files(tree: Path) -> tuple[Path, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise LabError(f"expected one kernel in {tree / 'boot'}, found {len(kernels)}")
    initrd = tree / "boot" / kernels[0].name.replace("vmlinuz-", "initrd.img-", 1)
    if not initrd.is_file():
        raise LabError(f"the kernel {kernels[0].name} has no initramfs ({initrd} is missing)")
    return kernels[0], initrd


def _versions(tree: Path, packages: tuple[str, ...]) -> dict[str, str]:
    # dpkg's status file, read as text: the versions the manifest reports.
    found: dict[str, str] = {}
    try:
        text = (tree / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return found
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") in packages:
            found[fields["Package"]] = fields.get("Version", "")
    return found


def _tree_size(tree: Path) -> int:
    total = 0
    for path in tree.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_tree(path: Path) -> None:
    # mmdebstrap mounts /proc, /sys and /dev inside the tree while it runs and
    # unmounts them itself; a tree that still has a mount is never deleted through it.
    if not path.exists():
        return
    mounts = _mounts_under(path)
    if mounts:
        raise LabError(f"{path} still has mounts ({', '.join(mounts)}); unmount them, then delete it")
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LabError(f"cannot open the build lock {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
