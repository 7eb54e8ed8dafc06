"""What the doctor reports: findings, the hops they break, and the check table type.

Pure data. A :class:`Check` is one row of a declarative table (``guest.CHECKS``,
``host.CHECKS``): a stable id, the hop it concerns, its severity and a pure
function from collected facts to :class:`Hit` objects. :func:`evaluate` runs a
table and turns hits into :class:`Finding` objects, most important first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from meta169.errors import ValidationError

Severity: TypeAlias = Literal["error", "warning", "info"]
HopId: TypeAlias = Literal["guest", "route", "next-hop", "redirect", "proxy", "server", "registry"]
HopState: TypeAlias = Literal["ok", "broken", "warning", "unknown", "n/a"]
When: TypeAlias = Literal["now", "persist", "cloud", "host", "check"]

SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
# The hops of the metadata path, guest first: the path the doctor draws, and the
# order its findings are sorted in.
HOPS: tuple[HopId, ...] = ("guest", "route", "next-hop", "redirect", "proxy", "server", "registry")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")

F = TypeVar("F")


@dataclass(frozen=True, slots=True)
class Remedy:
    """One way to fix a finding: a command (``argv`` set) or a file line / action.

    ``when``: ``now`` acts at once but may not survive a restart; ``persist``
    survives it; ``cloud`` is for the operator of the cloud (DHCP, proxy, rules);
    ``host`` runs on the network node; ``check`` verifies rather than fixes.
    """

    when: When
    text: str
    argv: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"when": self.when, "text": self.text, "command": list(self.argv) or None}


@dataclass(frozen=True, slots=True)
class Hit:
    """What a check returns; :func:`evaluate` adds the check's id, hop and title."""

    summary: str
    evidence: tuple[str, ...] = ()
    fix: tuple[Remedy, ...] = ()
    severity: Severity | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """One diagnosed problem: stable ``id``, severity, hop, evidence and fix."""

    id: str
    severity: Severity
    hop: HopId
    title: str
    summary: str
    evidence: tuple[str, ...] = ()
    fix: tuple[Remedy, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "hop": self.hop,
            "title": self.title,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "fix": [r.to_json() for r in self.fix],
        }


@dataclass(frozen=True, slots=True)
class Check(Generic[F]):
    """One row of a check table.

    ``folds_into``: this check reports a symptom of those findings (an ARP entry
    that failed because of the zeroconf route); when one of them fired, this
    finding is dropped and its evidence appended to theirs.
    """

    id: str
    hop: HopId
    severity: Severity
    title: str
    run: Callable[[F], Iterable[Hit]] = field(repr=False)
    folds_into: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.id or not set(self.id) <= _ID_CHARS:
            raise ValidationError(f"check id {self.id!r} must be lower-case words joined by '-'")
        if self.hop not in HOPS:
            raise ValidationError(f"check {self.id}: unknown hop {self.hop!r}")
        if self.severity not in SEVERITIES:
            raise ValidationError(f"check {self.id}: unknown severity {self.severity!r}")


def check_table(checks: Sequence[Check[F]]) -> tuple[Check[F], ...]:
    """Validate a table: unique ids, folds only into ids of the same table."""
    ids = [c.id for c in checks]
    if len(set(ids)) != len(ids):
        raise ValidationError(f"duplicate check ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    for c in checks:
        unknown = set(c.folds_into) - set(ids)
        if unknown:
            raise ValidationError(f"check {c.id} folds into unknown checks {sorted(unknown)}")
    return tuple(checks)


def sort_key(finding: Finding, order: Mapping[str, int]) -> tuple[int, int, int]:
    """Most important first: severity, then the earliest hop on the path, then table order."""
    return (SEVERITIES.index(finding.severity), HOPS.index(finding.hop), order.get(finding.id, len(order)))


def evaluate(checks: Sequence[Check[F]], facts: F) -> tuple[Finding, ...]:
    """Run every check over ``facts``; fold symptoms into causes; sort."""
    found: list[Finding] = []
    for check in checks:
        for hit in check.run(facts):
            found.append(
                Finding(
                    id=check.id,
                    severity=hit.severity or check.severity,
                    hop=check.hop,
                    title=check.title,
                    summary=hit.summary,
                    evidence=hit.evidence,
                    fix=hit.fix,
                )
            )
    by_check = {c.id: c for c in checks}
    # A symptom folds only into a cause at least as severe: a warning never hides an error.
    fired: dict[str, int] = {}
    for f in found:
        fired[f.id] = min(fired.get(f.id, len(SEVERITIES)), SEVERITIES.index(f.severity))
    kept: list[Finding] = []
    folded: dict[str, list[str]] = {}
    for finding in found:
        rank = SEVERITIES.index(finding.severity)
        causes = [c for c in by_check[finding.id].folds_into if fired.get(c, len(SEVERITIES)) <= rank]
        if causes:
            folded.setdefault(causes[0], []).extend(finding.evidence)
            continue
        kept.append(finding)
    out = []
    for finding in kept:
        extra = [e for e in folded.pop(finding.id, []) if e not in finding.evidence]
        # Only the first finding of a cause gets the symptom's evidence.
        out.append(replace(finding, evidence=finding.evidence + tuple(extra)) if extra else finding)
    order = {c.id: i for i, c in enumerate(checks)}
    return tuple(sorted(out, key=lambda f: sort_key(f, order)))


@dataclass(frozen=True, slots=True)
class HopStatus:
    """One hop of the drawn path: its label ("gateway 10.0.0.1"), state and what was seen."""

    hop: HopId
    label: str
    state: HopState
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"hop": self.hop, "label": self.label, "state": self.state, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one doctor run found, ready for rendering."""

    kind: Literal["guest", "host"]
    source: str
    path: tuple[HopStatus, ...]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = ()
    # What the host doctor checked and where it learnt of each (config, process, lab, ip netns).
    discovered: tuple[str, ...] = ()

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def has_errors(self) -> bool:
        return self.count("error") > 0

    @property
    def broken_hop(self) -> HopId | None:
        """The first hop on the path marked broken, if any."""
        for status in self.path:
            if status.state == "broken":
                return status.hop
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "path": [h.to_json() for h in self.path],
            "broken_hop": self.broken_hop,
            "findings": [f.to_json() for f in self.findings],
            "summary": {s: self.count(s) for s in SEVERITIES},
            "notes": list(self.notes),
            "discovered": list(self.discovered),
        }


def hop_state_from_findings(findings: Iterable[Finding], hop: HopId) -> HopState | None:
    """broken/warning when a finding of that severity sits on ``hop``; None when none does."""
    severities = {f.severity for f in findings if f.hop == hop}
    if "error" in severities:
        return "broken"
    if "warning" in severities:
        return "warning"
    return None
