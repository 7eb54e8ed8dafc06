"""The Debian 12 guest image the QEMU and libvirt guest tests boot, built from Debian's
archive on first use and cached under $META169_CACHE (``.cache`` in the repository
otherwise), so a fresh machine builds it once and later runs reuse it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from meta169.errors import LabError
from meta169.lab import qemu
from meta169.lab.image import GuestImage, build_image, find_image
from tests.capabilities import require
from tests.counters import SUMMARY

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("META169_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def cache_dir() -> Path:
    return Path(os.environ.get("META169_CACHE", str(ROOT / ".cache")))


def guest_image() -> GuestImage:
    """The cached image, built first if there is none (a capability: skipped, or failed
    under META169_REQUIRE_E2E=1, when the tools are missing or the build fails)."""
    for tool in (qemu.QEMU_BINARY, qemu.QEMU_IMG, "mmdebstrap", "mkfs.ext4"):
        require(f"executable {tool}", shutil.which(tool) is not None, f"{tool} is not on PATH")
    cached = find_image(cache_dir()) is not None
    started = time.monotonic()
    try:
        image = build_image(cache_dir(), mirror=MIRROR)
    except LabError as exc:
        require("the guest image", False, f"building it failed: {exc}")
    size = f"{image.size_bytes() / 2**20:.0f} MiB"
    how = "cached" if cached else f"built in {time.monotonic() - started:.0f}s"
    SUMMARY["qemu guest image"] = f"{image.directory.name}, {size}, {how}"
    return image
