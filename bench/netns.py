"""The benchmark's own network namespaces: ``m169b-<tag>-...``, made and removed in batches.

Removal is registered before creation, so a failure half way through still removes
whatever was made. A process still inside a namespace would keep it alive after
``netns del``, so the processes inside (found by namespace inode, as ``ip netns
pids`` does) are stopped by PID first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import BenchError, Cleanup, Settings, pid_alive, stop_pids

PREFIX = "m169b-"
NETNS_DIR = Path("/run/netns")


def new_tag() -> str:
    return PREFIX + secrets.token_hex(3)


def ip_batch(lines: Sequence[str], *, netns: str | None = None, force: bool = False) -> None:
    """One ``ip -batch`` for many commands (1000 namespaces in well under a second)."""
    argv = ["ip", *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]
    done = subprocess.run(argv, input="\n".join(lines) + "\n", text=True, capture_output=True, timeout=120, check=False)
    if done.returncode != 0 and not force:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip()[-1000:]}")


def pids_in(names: Sequence[str]) -> list[int]:
    """PIDs whose network namespace is one of ``names``."""
    inodes = set()
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(NETNS_DIR / name)
            inodes.add((st.st_dev, st.st_ino))
    if not inodes:
        return []
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{entry.name}/ns/net")
            if (st.st_dev, st.st_ino) in inodes:
                out.append(int(entry.name))
    return out


def remove(names: Sequence[str]) -> None:
    names = [n for n in names if n.startswith(PREFIX)]
    survivors = stop_pids(pids_in(names))
    if survivors:
        print(f"cleanup: processes {survivors} would not die", file=sys.stderr)
    ip_batch([f"netns del {n}" for n in names if (NETNS_DIR / n).exists()], force=True)
    left = [n for n in names if (NETNS_DIR / n).exists()]
    if left:
        raise BenchError(f"namespaces left behind: {left[:5]}... ({len(left)})")


def create(names: Sequence[str], cleanup: Cleanup) -> None:
    """Create the namespaces (removed by ``cleanup``, even if creation fails midway)."""
    if any(not n.startswith(PREFIX) for n in names):
        raise BenchError("benchmark namespaces must be named m169b-...")
    cleanup.push(f"remove {len(names)} namespaces", lambda: remove(names))
    ip_batch([f"netns add {n}" for n in names])


def nsctl(settings: Settings, names: Sequence[str], *args: str) -> dict[str, object]:
    """Run ``bench.nsctl`` (setns from namespace to namespace) over ``names``."""
    done = subprocess.run(
        [str(settings.python), "-m", "bench.nsctl", *args],
        input="\n".join(names) + "\n",
        text=True,
        capture_output=True,
        timeout=180,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        raise BenchError(f"bench.nsctl {' '.join(args)}: {done.stderr.strip()[-1000:]}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


def sweep(work_root: Path) -> tuple[list[str], list[int]]:
    """After a run that was SIGKILLed: stop processes started from a benchmark work dir
    (their command line names ``<work_root>/m169b-...``), remove m169b- namespaces and
    the work dirs."""
    names = sorted(p.name for p in NETNS_DIR.glob(PREFIX + "*")) if NETNS_DIR.exists() else []
    marker = str(work_root / PREFIX)
    ours = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            if any(marker.encode() in a for a in args) and pid_alive(int(entry.name)):
                ours.append(int(entry.name))
    stop_pids(ours)
    remove(names)
    for workdir in work_root.glob(PREFIX + "*"):
        # tempfile.mkdtemp(prefix="m169b-") names: 8 more characters of [a-z0-9_].
        if workdir.is_dir() and re.fullmatch(PREFIX + r"[a-z0-9_]{8}", workdir.name):
            shutil.rmtree(workdir, ignore_errors=True)
    return names, ours
