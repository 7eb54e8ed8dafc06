"""What a running server knows about its own readiness: the state behind ``/readyz``.

Each part of a server that can be unready (the registry, the last poll, a listener,
a proxy namespace, a ``--network`` naming nothing) sets a named check; ``/readyz``
answers 200 only when every check is ok and lists what is not. The object is made
once per process at the edge and passed to whoever sets or reads checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    # time.time() of the last change of ``ok``.
    since: float = 0.0


class Health:
    """Named readiness checks; a check never set does not hold readiness back."""

    __slots__ = ("_checks",)

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        old = self._checks.get(name)
        since = old.since if old is not None and old.ok == ok else time.time()
        self._checks[name] = Check(name, ok, detail, since)

    def clear(self, name: str) -> None:
        self._checks.pop(name, None)

    def get(self, name: str) -> Check | None:
        return self._checks.get(name)

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self._checks.values())

    def failing(self) -> list[Check]:
        return [c for c in self._checks.values() if not c.ok]

    def report(self) -> dict[str, Any]:
        """``{"ready": bool, "checks": {name: {"ok", "detail", "since"}}}``, the ``/readyz`` body."""
        return {
            "ready": self.ready,
            "checks": {
                c.name: {"ok": c.ok, "detail": c.detail, "since": round(c.since, 3)}
                for c in sorted(self._checks.values(), key=lambda c: c.name)
            },
        }
