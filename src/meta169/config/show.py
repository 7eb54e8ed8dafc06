"""The effective configuration as TOML, each value with where it came from.

Pure: the entries are gathered by ``meta169 config show`` from click's own parsing
(``ctx.params`` and ``ctx.get_parameter_source``); this module only writes them.
The output is itself a valid configuration file: unset options are comments.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from click.core import ParameterSource

from meta169.config.resolve import Setting
from meta169.config.schema import METRICS_SECTION
from meta169.config.secrets import redact


@dataclass(frozen=True)
class Entry:
    """One key's effective value (None: not set) and its origin, as printed after ``#``."""

    key: str
    value: Any
    origin: str


@dataclass(frozen=True)
class Section:
    name: str
    entries: tuple[Entry, ...]


def origin_of(
    source: ParameterSource | None, envvar: str | Iterable[str] | None, setting: Setting | None, file: str | None
) -> str:
    """``flag``, ``env NAME``, ``FILE:LINE`` or ``default``, from click's parameter source."""
    if source == ParameterSource.COMMANDLINE:
        return "flag"
    if source == ParameterSource.ENVIRONMENT:
        names = [envvar] if isinstance(envvar, str) else list(envvar or ())
        found = next((n for n in names if os.environ.get(n)), names[0] if names else "?")
        return f"env {found}"
    if source == ParameterSource.DEFAULT_MAP and setting is not None and file is not None:
        # A key [metrics] lends to a command says so: the line is in another section.
        lent = f" [{METRICS_SECTION}]" if setting.section == METRICS_SECTION else ""
        return f"{file}:{setting.line}{lent}"
    if source == ParameterSource.PROMPT:
        return "prompt"
    return "default"


def render(sections: Iterable[Section], header: Iterable[str] = ()) -> str:
    """TOML text: a header of comments, then one table per section."""
    lines = [f"# {h}" if h else "#" for h in header]
    for section in sections:
        if lines:
            lines.append("")
        lines.append(f"[{section.name}]")
        for entry in section.entries:
            shown = redact(entry.key, _plain(entry.value))
            key = _key(entry.key)
            if shown is None:
                lines.append(f"# {key} is not set  # {entry.origin}")
            else:
                lines.append(f"{key} = {toml_value(shown)}  # {entry.origin}")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii():
        return key
    return _string(key)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value; what TOML cannot hold is written as its string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return _string(str(value))


def _string(text: str) -> str:
    # JSON's escapes are TOML's basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
