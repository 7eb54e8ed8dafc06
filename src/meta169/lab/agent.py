"""A client of qemu-guest-agent: run commands and write files inside a QEMU guest.

QEMU connects the guest's virtio-serial port ``org.qemu.guest_agent.0`` to a Unix
socket the lab owns (``-chardev socket,server=on``). The protocol is QMP's JSON
[qemu ``qga/qapi-schema.json``]: a command is ``{"execute": NAME, "arguments":
{...}}``, its answer ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``.
A reply can be left in the channel by an earlier client that gave up, so every
session starts with ``guest-sync-delimited``: we send 0xFF (which resets the
agent's JSON parser) and the command with a fresh id; the agent answers 0xFF and
then that id, and everything before it is discarded.

``guest-exec`` starts a process (argv, optional stdin, output captured) and returns
its PID; ``guest-exec-status`` is polled until it says the process exited, with
its exit code and base64 output. Files are written with ``guest-file-open``,
``-write`` and ``-close``.

The framing (:func:`encode`, :class:`ReplyBuffer`) and the mapping of replies onto
results are pure; :class:`GuestAgent` is the socket around them. QEMU's chardev
serves one client at a time, so each :class:`GuestAgent` session is short: connect,
sync, a few commands, close. Knows nothing of the lab.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meta169.errors import CommandFailed, LabError
from meta169.plumbing.command import CommandResult

SYNC_DELIMITER = 0xFF
DEFAULT_TIMEOUT = 60.0  # seconds for one command in a guest (TCG is slow)
_POLL = 0.2  # seconds between guest-exec-status polls
_WRITE_CHUNK = 48 * 1024  # bytes per guest-file-write (64 KiB of base64)
_MAX_BUFFER = 64 * 2**20  # a reply larger than this is not the agent's


def encode(command: str, arguments: Mapping[str, Any] | None = None) -> bytes:
    """One command as the agent reads it: a JSON object and a newline."""
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = dict(arguments)
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class ReplyBuffer:
    """Bytes from the agent in, JSON replies out (the agent separates them with whitespace)."""

    def __init__(self) -> None:
        self._data = b""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > _MAX_BUFFER:
            raise LabError(f"the guest agent sent more than {_MAX_BUFFER} bytes without a complete reply")

    def after_delimiter(self) -> bool:
        """Drop everything up to and including the last 0xFF; False when none has come yet."""
        at = self._data.rfind(bytes([SYNC_DELIMITER]))
        if at < 0:
            return False
        self._data = self._data[at + 1 :]
        return True

    def replies(self) -> Iterator[Any]:
        """The complete JSON values received so far, in order (consumed as they are yielded)."""
        while True:
            data = self._data.lstrip(b" \t\r\n\xff")
            if not data:
                self._data = b""
                return
            # surrogateescape keeps a character split across reads (and any stray
            # byte) one code point per byte, so the offset maps back exactly.
            text = data.decode("utf-8", errors="surrogateescape")
            try:
                value, end = self._decoder.raw_decode(text)
            except ValueError:
                self._data = data
                if b"\n" in data:
                    raise LabError(f"the guest agent sent something that is not JSON: {data[:200]!r}") from None
                return  # the rest of the reply is still on its way
            self._data = data[len(text[:end].encode("utf-8", errors="surrogateescape")) :]
            yield value


def result_of(reply: Any, command: str) -> Any:
    """The ``return`` value of ``reply``; LabError for an ``error`` reply or a malformed one."""
    if not isinstance(reply, dict):
        raise LabError(f"guest agent: {command}: reply is not an object: {reply!r}")
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc", err) if isinstance(err, dict) else err
        raise LabError(f"guest agent: {command}: {desc}")
    if "return" not in reply:
        raise LabError(f"guest agent: {command}: reply has no return value: {reply!r}")
    return reply["return"]


def exec_arguments(
    argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``guest-exec``'s arguments: the program (found on the agent's PATH), its arguments,
    stdin, environment, and captured output."""
    if not argv:
        raise LabError("guest-exec needs a command")
    args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if input is not None:
        args["input-data"] = base64.b64encode(input).decode()
    if env:
        args["env"] = [f"{k}={v}" for k, v in env.items()]
    return args


def exec_status(status: Any, argv: Sequence[str]) -> CommandResult | None:
    """The finished command ``guest-exec-status`` describes; None while it still runs.

    A process killed by a signal gets return code -SIGNAL, as :mod:`subprocess` does.
    """
    if not isinstance(status, dict):
        raise LabError(f"guest-exec-status: not an object: {status!r}")
    if not status.get("exited"):
        return None
    if "exitcode" in status:
        code = int(status["exitcode"])
    elif "signal" in status:
        code = -int(status["signal"])
    else:
        code = -1

    def text(key: str) -> str:
        return base64.b64decode(status.get(key, "")).decode(errors="replace")

    return CommandResult(tuple(argv), code, text("out-data"), text("err-data"))


@dataclass(frozen=True, slots=True)
class AgentSocket:
    """Where a guest's agent is reached, and how long one command may take by default."""

    path: Path
    timeout: float = DEFAULT_TIMEOUT


class GuestAgent:
    """One session with a guest's agent; use as a context manager (connects and syncs).

    LabError when the socket cannot be reached, the agent does not answer the sync
    within ``sync_timeout`` (not booted yet, or not running), or a command fails.
    """

    def __init__(self, where: AgentSocket, *, sync_timeout: float = 10.0) -> None:
        self.where = where
        self._sync_timeout = sync_timeout
        self._sock: socket.socket | None = None
        self._buffer = ReplyBuffer()

    def __enter__(self) -> GuestAgent:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._sync_timeout)
            sock.connect(str(self.where.path))
        except OSError as exc:
            sock.close()
            raise LabError(f"guest agent socket {self.where.path}: {exc}") from exc
        self._sock = sock
        try:
            self._sync()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- commands ----------------------------------------------------------------------------

    def call(self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Send one command and return its ``return`` value."""
        self._send(encode(command, arguments))
        return result_of(self._next_reply(timeout if timeout is not None else self.where.timeout, command), command)

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run ``argv`` in the guest and wait for it; LabError when it outlives ``timeout``
        (it is then killed)."""
        limit = timeout if timeout is not None else self.where.timeout
        started = self.call("guest-exec", exec_arguments(argv, input=input, env=env))
        pid = int(started["pid"])
        deadline = time.monotonic() + limit
        while True:
            done = exec_status(self.call("guest-exec-status", {"pid": pid}), argv)
            if done is not None:
                return done
            if time.monotonic() > deadline:
                self._kill(pid)
                raise LabError(f"guest command {' '.join(argv)} did not finish in {limit:g}s (killed)")
            time.sleep(_POLL)

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace the guest file ``path`` with ``data``."""
        handle = self.call("guest-file-open", {"path": path, "mode": "w"})
        try:
            for at in range(0, len(data), _WRITE_CHUNK) or (0,):
                chunk = base64.b64encode(data[at : at + _WRITE_CHUNK]).decode()
                self.call("guest-file-write", {"handle": handle, "buf-b64": chunk})
        finally:
            self.call("guest-file-close", {"handle": handle})

    # -- the wire ------------------------------------------------------------------------------

    def _sync(self) -> None:
        token = secrets.randbelow(2**31)
        self._send(bytes([SYNC_DELIMITER]) + encode("guest-sync-delimited", {"id": token}))
        deadline = time.monotonic() + self._sync_timeout
        delimited = False
        while True:
            self._read(deadline, "guest-sync-delimited")
            # Whatever came before the agent's 0xFF is an earlier client's.
            delimited = self._buffer.after_delimiter() or delimited
            if not delimited:
                continue
            for reply in self._buffer.replies():
                if isinstance(reply, dict) and reply.get("return") == token:
                    return

    def _next_reply(self, timeout: float, command: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._buffer.replies():
                return reply
            self._read(deadline, command)

    def _read(self, deadline: float, command: str) -> None:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise LabError(f"guest agent {self.where.path}: no answer to {command}")
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise LabError(f"guest agent {self.where.path}: no answer to {command}") from None
        except OSError as exc:
            raise LabError(f"guest agent {self.where.path}: {exc}") from exc
        if not data:
            raise LabError(f"guest agent {self.where.path}: closed while waiting for {command}")
        self._buffer.feed(data)

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise LabError(f"guest agent {self.where.path}: {exc}") from exc

    def _kill(self, pid: int) -> None:
        # The agent has no command to signal a process it started; kill(1) in the guest does.
        with contextlib.suppress(LabError):
            self.call("guest-exec", exec_arguments(["kill", "-KILL", str(pid)]), timeout=10)


def ping(where: AgentSocket, *, timeout: float = 5.0) -> bool:
    """Whether the guest's agent answers now (it starts once the guest has booted)."""
    try:
        with GuestAgent(where, sync_timeout=timeout) as agent:
            agent.call("guest-ping", timeout=timeout)
    except LabError:
        return False
    return True


class AgentRunner:
    """A :class:`~meta169.plumbing.command.Runner` that runs each argv inside the guest."""

    def __init__(self, where: AgentSocket, *, env: Mapping[str, str] | None = None) -> None:
        self.where = where
        self.env = dict(env or {})

    def __call__(
        self, argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float | None = None
    ) -> CommandResult:
        with GuestAgent(self.where) as agent:
            result = agent.exec(
                argv, input=None if input is None else input.encode(), env=self.env or None, timeout=timeout
            )
        if check and result.returncode != 0:
            raise CommandFailed(result.argv, result.returncode, result.stderr)
        return result
