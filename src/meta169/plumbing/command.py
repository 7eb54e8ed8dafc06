"""Running external commands: argv lists in, :class:`CommandResult` or ``CommandFailed`` out.

The only place in ``plumbing`` that calls :mod:`subprocess` for short-lived
commands. Callers receive a ``Runner`` so tests and the doctor can inject their
own; no command is ever built by string formatting or run through a shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meta169.errors import CommandFailed

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command printed and returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs ``argv``; with ``check`` a non-zero exit raises ``CommandFailed``."""

    def __call__(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult: ...


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult:
    """Run ``argv`` (no shell), feed ``input`` on stdin, capture text output.

    A missing executable or a timeout is reported as ``CommandFailed`` too, with
    return code 127 (the shell's "not found") or -1, so callers have one error to catch.
    """
    args = tuple(argv)
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            timeout=DEFAULT_TIMEOUT,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(args, 127, str(exc)) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(args, -1, f"timed out after {DEFAULT_TIMEOUT:g}s") from exc
    result = CommandResult(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, proc.stderr)
    return result


def kill_checked(pids: Iterable[int], still_ours: Callable[[int], bool], *, timeout: float = 5.0) -> None:
    """SIGTERM every PID that ``still_ours``, wait, then SIGKILL the ones left.

    ``still_ours`` is checked before every signal (by command line, lease or pid
    file), so a PID reused by someone else's process is never signalled.
    """
    pending = [p for p in pids if still_ours(p)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if still_ours(p)]
        time.sleep(0.02)
    for pid in pending:
        if still_ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_ours(
    process: subprocess.Popen[Any] | None, pid: int, still_ours: Callable[[int], bool], *, timeout: float = 5.0
) -> None:
    """Stop a daemon we started: terminate and reap it when it is our child, else by
    PID while it is still ours; SIGKILL after ``timeout``. A no-op when it is gone."""
    if process is not None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return
    kill_checked([pid], still_ours, timeout=timeout)
