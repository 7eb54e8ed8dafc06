"""The lab's state file: what ``lab up`` created, written as it goes.

``lab up`` records every namespace right after creating it and every process right
after starting it, rewriting ``lab.json`` atomically each time, so ``lab down``
removes exactly that even when ``lab up`` was killed halfway. ``lab break``
records a fault before inflicting it and ``lab heal`` removes the record, so
``lab status`` shows what is broken and ``heal`` knows what to undo. (It also sweeps by
the lab's namespace prefix and process markers, which covers the instant between
creating something and recording it.) :class:`Ledger` holds the current state of
one lab and writes the file at every change. Knows nothing of how things are created.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast, get_args

from meta169.errors import ConfigError, LabError
from meta169.lab.names import STATE_FILE
from meta169.lab.plan import LabConfig

Status: TypeAlias = Literal["building", "up", "failed", "down"]
STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process the lab started: ``role`` is serve, proxy, dnsmasq-<tenant> or dhclient-<vm>."""

    role: str
    pid: int
    netns: str | None = None


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """An active ``lab break``: the fault and its target.

    ``target`` is a VM name, a tenant key (router faults) or "" (the whole lab);
    ``vm`` is the VM named on the command line, if any.
    """

    fault: str
    target: str
    vm: str | None = None
    since: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.fault, self.target)

    def to_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "target": self.target, "vm": self.vm, "since": self.since}

    @classmethod
    def from_json(cls, data: Any) -> FaultRecord:
        if not isinstance(data, dict):
            raise TypeError("a fault record is not an object")
        vm = data.get("vm")
        return cls(str(data["fault"]), str(data.get("target", "")), None if vm is None else str(vm),
                   float(data.get("since", 0.0)))  # fmt: skip


@dataclass(frozen=True, slots=True)
class LabState:
    config: LabConfig
    status: Status = "building"
    namespaces: tuple[str, ...] = ()
    processes: tuple[ProcessRecord, ...] = ()
    created_at: float = field(default_factory=time.time)
    error: str = ""
    faults: tuple[FaultRecord, ...] = ()
    # serve's loopback TCP proxy listener, when the lab runs the proxy-to-serve hop
    # over TCP with HMAC instead of the Unix socket (the secret-mismatch fault).
    tcp_port: int | None = None

    def with_namespace(self, name: str) -> LabState:
        return replace(self, namespaces=(*self.namespaces, name))

    def without_namespace(self, name: str) -> LabState:
        return replace(self, namespaces=tuple(n for n in self.namespaces if n != name))

    def with_process(self, record: ProcessRecord) -> LabState:
        others = tuple(p for p in self.processes if p.role != record.role)
        return replace(self, processes=(*others, record))

    def without_process(self, role: str) -> LabState:
        return replace(self, processes=tuple(p for p in self.processes if p.role != role))

    def with_fault(self, record: FaultRecord) -> LabState:
        return replace(self, faults=(*self.without_fault(record).faults, record))

    def without_fault(self, record: FaultRecord) -> LabState:
        return replace(self, faults=tuple(f for f in self.faults if f.key != record.key))

    def process(self, role: str) -> ProcessRecord | None:
        for record in self.processes:
            if record.role == role:
                return record
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": self.config.to_json(),
            "status": self.status,
            "namespaces": list(self.namespaces),
            "processes": [{"role": p.role, "pid": p.pid, "netns": p.netns} for p in self.processes],
            "created_at": self.created_at,
            "error": self.error,
            "faults": [f.to_json() for f in self.faults],
            "tcp_port": self.tcp_port,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> LabState:
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise LabError(f"{source}: not a version {STATE_VERSION} lab state file")
        status = data.get("status")
        if status not in get_args(Status):
            raise LabError(f"{source}: unknown lab status {status!r}")
        assert isinstance(status, str)
        try:
            return cls(
                config=LabConfig.from_json(data["config"]),
                status=cast(Status, status),
                namespaces=tuple(str(n) for n in data.get("namespaces", ())),
                processes=tuple(
                    ProcessRecord(str(p["role"]), int(p["pid"]), p.get("netns")) for p in data.get("processes", ())
                ),
                created_at=float(data.get("created_at", 0.0)),
                error=str(data.get("error", "")),
                faults=tuple(FaultRecord.from_json(f) for f in data.get("faults", ())),
                tcp_port=None if data.get("tcp_port") is None else int(data["tcp_port"]),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise LabError(f"{source}: malformed lab state: {exc}") from exc


def save(state: LabState, path: Path) -> None:
    """Write ``state`` to ``path`` in one rename (never a half-written file)."""
    text = json.dumps(state.to_json(), indent=2) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise LabError(f"cannot write lab state {path}: {exc}") from exc


def load(path: Path) -> LabState | None:
    """The state in ``path``; None when there is no such file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LabError(f"cannot read lab state {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LabError(f"{path}: lab state is not JSON: {exc}") from exc
    return LabState.from_json(data, source=str(path))


class Ledger:
    """One lab's current :class:`LabState`, written to ``path`` at every :meth:`update`.

    Nothing is written while ``persist`` is false (a ``lab down`` without a state
    file; a lab whose files were removed on purpose) or while the state directory
    does not exist. The constructor does no IO.
    """

    def __init__(self, state: LabState, path: Path, *, persist: bool = True) -> None:
        self._state = state
        self.path = path
        self.persist = persist

    @property
    def state(self) -> LabState:
        return self._state

    def update(self, state: LabState) -> None:
        """Make ``state`` the current one and write it."""
        self._state = state
        self.save()

    def save(self) -> None:
        if self.persist and self.path.parent.is_dir():
            save(self._state, self.path)

    def reload(self) -> bool:
        """Adopt what another process (``meta169 lab break``/``heal``) recorded since.

        False, keeping the current state, when there is nothing to adopt: no file,
        not persisting, or the file records another lab.
        """
        found = load(self.path) if self.persist else None
        if found is None or found.config.name != self._state.config.name:
            return False
        self._state = found
        return True


def labs_under(root: Path) -> tuple[tuple[LabState, ...], tuple[str, ...]]:
    """The labs recorded under ``root``, and one problem per state file that could not be read.

    ``root`` is a state root (``/run/meta169-lab``, holding ``NAME/lab.json``) or one
    lab's own state directory. Whatever their status: the caller picks the ones up.
    """
    if (root / STATE_FILE).is_file():
        paths = [root / STATE_FILE]
    else:
        try:
            paths = sorted(d / STATE_FILE for d in root.iterdir() if (d / STATE_FILE).is_file())
        except OSError:
            return (), ()  # no state root: no lab was ever up here
    found: list[LabState] = []
    problems: list[str] = []
    for path in paths:
        try:
            state = load(path)
        except LabError as exc:
            problems.append(str(exc))
            continue
        if state is not None:
            found.append(state)
    return tuple(found), tuple(problems)
