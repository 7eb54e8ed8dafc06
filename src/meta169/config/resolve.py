"""From the file's sections to click's ``default_map``: every value converted and checked.

Each value goes through its option's own click type (a ``click.Path``, a
``click.Choice``, an ``IntRange``...), exactly as the flag would, so the file
accepts what the command line accepts and nothing else. Problems are collected,
not raised one at a time: an operator fixing a file wants every line at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from meta169.config.file import ConfigFile
from meta169.config.schema import (
    COMMAND_SECTIONS,
    METRICS_SECTION,
    SECTIONS,
    TOP_LEVEL_SECTIONS,
    FlagOnly,
    Slot,
    command_keys,
    flag_only_keys,
    is_metrics_key,
    metrics_keys,
    top_level_keys,
)


@dataclass(frozen=True, order=True)
class Issue:
    """One problem in the file, with its line, section and key."""

    path: str
    line: int
    section: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        if self.section is None:
            scope = f"{self.key}: " if self.key else ""
        else:
            scope = f"[{self.section}] {self.key}: " if self.key else f"[{self.section}]: "
        return f"{where}: {scope}{self.message}"


@dataclass(frozen=True)
class Setting:
    """A value written in the file and where: ``section`` is where it was written
    (``metrics`` for a key ``[metrics]`` lends to a command)."""

    value: Any
    section: str
    key: str
    line: int


@dataclass(frozen=True)
class Resolved:
    """What some sections give click: ``default_map`` entries, their origins, the problems.

    ``default_map`` is nested as click nests it, by subcommand name; ``settings`` is
    keyed by (the section the option belongs to, key).
    """

    default_map: dict[str, Any] = field(default_factory=dict)
    settings: dict[tuple[str, str], Setting] = field(default_factory=dict)
    issues: tuple[Issue, ...] = ()


def format_problems(problems: Sequence[str]) -> str:
    """One message for a ConfigError: the problem itself, or a count and one per line."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the configuration:\n  " + "\n  ".join(problems)


def check_sections(cfg: ConfigFile) -> list[Issue]:
    """Unknown sections, and sections that are not tables."""
    issues = []
    for name, value in cfg.data.items():
        line = cfg.line_of(name)
        if name not in SECTIONS:
            hint = _closest(name, SECTIONS)
            message = f"unknown section [{name}]; " + (
                f"did you mean [{hint}]?" if hint else f"sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
            issues.append(Issue(str(cfg.path), line, None, None, message))
        elif not isinstance(value, dict):
            issues.append(Issue(str(cfg.path), line, name, None, "must be a table: write [" + name + "] on a line"))
    return issues


def resolve_top_level(
    cfg: ConfigFile, group: click.Command, *, elsewhere: Mapping[str, Sequence[str]] | None = None
) -> Resolved:
    """``[registry]`` and ``[logging]``: defaults for the top-level group's own options."""
    places = top_level_keys(group)
    ctx = click.Context(group)
    out = _Collected()
    issues: list[Issue] = []
    for section in TOP_LEVEL_SECTIONS:
        table = cfg.data.get(section)
        if not isinstance(table, dict):
            continue
        keys = {key: (slot,) for key, slot in places[section].items()}
        issues += _resolve_table(cfg, section, section, table, keys, ctx, out, elsewhere or {})
    return Resolved(out.default_map, out.settings, tuple(sorted(issues)))


def resolve_section(
    cfg: ConfigFile,
    section: str,
    command: click.Command,
    *,
    elsewhere: Mapping[str, Sequence[str]] | None = None,
) -> Resolved:
    """A command's section, over the ``[metrics]`` keys the command has."""
    keys = command_keys(command)
    ctx = click.Context(command, info_name=section)
    out = _Collected()
    issues: list[Issue] = []
    metrics = cfg.data.get(METRICS_SECTION)
    if isinstance(metrics, dict):
        lent = {k: v for k, v in metrics.items() if is_metrics_key(k) and k in keys}
        issues += _resolve_table(cfg, METRICS_SECTION, section, lent, keys, ctx, out, {})
    table = cfg.data.get(section)
    if isinstance(table, dict):
        issues += _resolve_table(cfg, section, section, table, keys, ctx, out, elsewhere or {}, flag_only_keys(command))
    return Resolved(out.default_map, out.settings, tuple(sorted(issues)))


def check_config(cfg: ConfigFile, group: click.Command, commands: Mapping[str, click.Command]) -> tuple[Issue, ...]:
    """Every problem in the file: sections, the top-level keys, each command's section
    and the keys of ``[metrics]`` (which must belong to at least one command)."""
    keys_by_section = {name: command_keys(cmd) for name, cmd in commands.items()}
    elsewhere: dict[str, list[str]] = {}
    for section, keys in keys_by_section.items():
        for key in keys:
            elsewhere.setdefault(key, []).append(section)
    for section, places in top_level_keys(group).items():
        for key in places:
            elsewhere.setdefault(key, []).append(section)
    issues = set(check_sections(cfg))
    issues.update(resolve_top_level(cfg, group, elsewhere=elsewhere).issues)
    for name in COMMAND_SECTIONS:
        if name in commands:
            issues.update(resolve_section(cfg, name, commands[name], elsewhere=elsewhere).issues)
    metrics = cfg.data.get(METRICS_SECTION)
    if isinstance(metrics, dict):
        valid = metrics_keys(keys_by_section)
        for key in metrics:
            if key not in valid:
                message = _unknown_key(key, list(valid), elsewhere, METRICS_SECTION)
                issues.add(Issue(str(cfg.path), cfg.line_of(METRICS_SECTION, key), METRICS_SECTION, key, message))
    return tuple(sorted(issues))


@dataclass
class _Collected:
    default_map: dict[str, Any] = field(default_factory=dict)
    settings: dict[tuple[str, str], Setting] = field(default_factory=dict)


def _resolve_table(
    cfg: ConfigFile,
    written_in: str,
    section: str,
    table: Mapping[str, Any],
    keys: Mapping[str, tuple[Slot, ...]],
    ctx: click.Context,
    out: _Collected,
    elsewhere: Mapping[str, Sequence[str]],
    flag_only: Mapping[str, FlagOnly] | None = None,
) -> list[Issue]:
    issues = []
    for key, raw in table.items():
        line = cfg.line_of(written_in, key)
        slots = keys.get(key)
        only = (flag_only or {}).get(key)
        if only is not None:
            message = f"not a setting: only the flag --{key} sets it, on the command line; {only.why}"
            issues.append(Issue(str(cfg.path), line, written_in, key, message))
            continue
        if slots is None:
            message = _unknown_key(key, list(keys), elsewhere, written_in)
            issues.append(Issue(str(cfg.path), line, written_in, key, message))
            continue
        converted: list[tuple[Slot, Any]] = []
        for slot in slots:
            problem, value = convert(slot.option, raw, ctx)
            if problem is not None:
                issues.append(Issue(str(cfg.path), line, written_in, key, problem))
                break
            converted.append((slot, value))
        else:
            out.settings[(section, key)] = Setting(converted[0][1], written_in, key, line)
            for slot, value in converted:
                target = out.default_map
                for name in slot.path:
                    target = target.setdefault(name, {})
                target[slot.name] = value
    return issues


def convert(option: click.Option, raw: Any, ctx: click.Context) -> tuple[str | None, Any]:
    """Check ``raw`` against ``option``'s type: (problem, None) or (None, the value for click).

    The value returned is the file's value in the shape click expects from a
    ``default_map`` (a list for a repeatable option); click converts it again when
    it fills the parameter, to the same result.
    """
    if isinstance(raw, dict):
        return "expected a value, not a table", None
    value: Any = raw
    if option.multiple:
        value = list(raw) if isinstance(raw, list) else [raw]
    elif option.nargs == 1 and isinstance(raw, list):
        return "takes one value, not a list", None
    try:
        option.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        return exc.message, None
    except (TypeError, ValueError) as exc:
        return str(exc), None
    return None, value


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    import difflib

    pool = list(candidates)
    for attempt in (word, word.replace("_", "-").lower()):
        found = difflib.get_close_matches(attempt, pool, n=1, cutoff=0.6)
        if found:
            return found[0]
    return None


def _unknown_key(key: str, valid: Sequence[str], elsewhere: Mapping[str, Sequence[str]], here: str) -> str:
    hint = _closest(key, valid)
    owners = [s for s in elsewhere.get(key) or elsewhere.get(key.replace("_", "-").lower()) or () if s != here]
    belongs = f"it belongs in {', '.join(f'[{s}]' for s in owners)}" if owners else ""
    if hint is not None:
        return f"unknown key; did you mean {hint}?" + (f" ({belongs})" if belongs else "")
    if belongs:
        return f"unknown key here; {belongs}"
    if not valid:
        return "unknown key; this section has no keys"
    return f"unknown key; valid keys are {', '.join(sorted(valid))}"
