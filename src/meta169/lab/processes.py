"""The lab's background processes: start detached, wait for a log line, stop by checked PID.

``meta169 serve`` and ``meta169 proxy`` run in a session of their own
(``start_new_session``) so they outlive ``meta169 lab up``; their output goes to a
log file in the state directory and their PID to a pid file next to it. A PID is
only ever signalled after ``/proc/PID/cmdline`` shows the lab's marker argument (a
path inside its state directory), so a recycled PID is never hit. Knows nothing of
namespaces or of what the processes do.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meta169.errors import LabError
from meta169.plumbing.command import stop_ours

_TAIL = 3000


@dataclass(frozen=True, slots=True)
class Background:
    """A detached process we started; ``marker`` is an argument only it carries."""

    role: str
    pid: int
    marker: str
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` ([] when it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_ours(pid: int, marker: str) -> bool:
    return marker in cmdline(pid)


def tail(path: Path, limit: int = _TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def start(role: str, argv: Sequence[str], *, log: Path, pid_file: Path, marker: str) -> Background:
    """Start ``argv`` in a new session, output to ``log``; write its PID to ``pid_file``."""
    if marker not in argv:
        raise LabError(f"{role}: marker {marker!r} is not among its arguments")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
    except OSError as exc:
        raise LabError(f"cannot start {role} ({argv[0]}): {exc}") from exc
    bg = Background(role, proc.pid, marker, log, proc)
    try:
        pid_file.write_text(f"{proc.pid}\n")
    except OSError as exc:
        stop(bg)
        raise LabError(f"cannot write {pid_file}: {exc}") from exc
    return bg


def wait_for_line(bg: Background, pattern: re.Pattern[str], *, timeout: float, offset: int = 0) -> re.Match[str]:
    """Wait until ``bg``'s log (from byte ``offset``) matches ``pattern``; LabError on exit or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(bg.log, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            text = ""
        match = pattern.search(text)
        if match:
            return match
        if bg.process is not None and bg.process.poll() is not None:
            raise LabError(f"{bg.role} exited with status {bg.process.returncode}; its log:\n{text[-_TAIL:]}")
        if bg.process is None and not is_ours(bg.pid, bg.marker):
            raise LabError(f"{bg.role} (PID {bg.pid}) is gone; its log:\n{text[-_TAIL:]}")
        if time.monotonic() > deadline:
            raise LabError(f"{bg.role} not ready after {timeout:g}s; its log:\n{text[-_TAIL:]}")
        time.sleep(0.02)


def stop(bg: Background, *, timeout: float = 5.0) -> None:
    """SIGTERM (then SIGKILL) ``bg`` if it is still ours; reap it when it is our child."""
    stop_ours(bg.process, bg.pid, lambda pid: is_ours(pid, bg.marker), timeout=timeout)


def find_marked(markers: Collection[str], *, exclude: Collection[int] = ()) -> list[int]:
    """PIDs of live processes one of whose arguments is one of ``markers``."""
    wanted = set(markers)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in exclude:
            continue
        if wanted.intersection(cmdline(pid)):
            found.append(pid)
    return found
