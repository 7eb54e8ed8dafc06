"""Rendering a :class:`Report`: the path with the broken hop marked, then the findings.

Pure text. ``unicode=False`` gives plain ASCII marks for terminals that cannot
print ✓ and ✗.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from meta169.doctor.model import Finding, HopState, Report, Severity

_MARKS: dict[HopState, tuple[str, str]] = {
    "ok": ("✓", "ok"),
    "broken": ("✗", "XX"),
    "warning": ("!", "!!"),
    "unknown": ("·", ".."),
    "n/a": ("-", "--"),
}
_SEVERITY_MARKS: dict[Severity, tuple[str, str]] = {"error": ("✗", "XX"), "warning": ("!", "!!"), "info": ("i", "ii")}
WIDTH = 100


def _mark(state: HopState, unicode: bool) -> str:
    return _MARKS[state][0 if unicode else 1]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False, break_long_words=False) or [indent]  # fmt: skip


def render_finding(index: int, finding: Finding, *, unicode: bool = True) -> list[str]:
    mark = _SEVERITY_MARKS[finding.severity][0 if unicode else 1]
    lines = [f"{index}. {mark} {finding.severity:<7} {finding.id}  [{finding.hop}] {finding.title}"]
    lines += _wrap(finding.summary, "   ")
    if finding.evidence:
        lines.append("   evidence:")
        for item in finding.evidence:
            lines += _wrap(item, "     ")
    if finding.fix:
        lines.append("   fix:")
        for remedy in finding.fix:
            lines += _wrap(f"{remedy.when + ':':<9}{remedy.text}", "     ")
    return lines


def render_human(report: Report, *, unicode: bool = True) -> str:
    """The report as a person reads it: path first, findings most important first."""
    arrow = " → " if unicode else " -> "
    out = [f"meta169 doctor ({report.kind}): {report.source}", ""]
    if report.discovered:
        out.append("Checked, and where it was found:")
        for line in report.discovered:
            out += textwrap.wrap(line, WIDTH, initial_indent="  - ", subsequent_indent="    ",
                                 break_on_hyphens=False, break_long_words=False)  # fmt: skip
        out.append("")
    out.append("  " + arrow.join(f"{h.label.split()[0]} {_mark(h.state, unicode)}" for h in report.path))
    out.append("")
    target = "169.254.169.254" if report.kind == "guest" else "the metadata service"
    out.append(f"Path to {target}:")
    width = max(len(h.label) for h in report.path) if report.path else 0
    broken = report.broken_hop
    for h in report.path:
        text = f"  {_mark(h.state, unicode)} {h.label:<{width}}  {h.detail}"
        out += textwrap.wrap(text, WIDTH, subsequent_indent=" " * (width + 6), break_on_hyphens=False,
                             break_long_words=False) or [text]  # fmt: skip
        if h.hop == broken:
            out.append(" " * (width + 6) + ("└─ the path breaks here" if unicode else "^-- the path breaks here"))
    out.append("")
    counts = [_plural(report.count(s), s) for s in ("error", "warning", "info") if report.count(s)]
    if not report.findings:
        out.append("No findings: nothing on the path looks wrong.")
    else:
        out.append(f"Findings ({', '.join(counts)}), most important first:")
        for i, finding in enumerate(report.findings, 1):
            out.append("")
            out += render_finding(i, finding, unicode=unicode)
    if report.notes:
        out += ["", "Notes:"]
        for note in report.notes:
            out += textwrap.wrap(note, WIDTH, initial_indent="  - ", subsequent_indent="    ",
                                 break_on_hyphens=False, break_long_words=False)  # fmt: skip
    return "\n".join(out) + "\n"


def render_json(report: Report, *, exit_code: int | None = None) -> str:
    doc: dict[str, Any] = report.to_json()
    if exit_code is not None:
        doc["exit_code"] = exit_code
    return json.dumps(doc, indent=2) + "\n"
