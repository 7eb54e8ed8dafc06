"""The configuration file as text: parsed with :mod:`tomllib`, every key's line found.

tomllib gives values but no positions, and an error that cannot name its line is
one an operator has to hunt for; so the text is scanned once more for the line of
every table header and key (TOML 1.0: bare, quoted and dotted keys, values spanning
lines inside arrays, inline tables and multi-line strings).
"""

from __future__ import annotations

import json
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meta169.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/meta169/meta169.toml")

KeyPath = tuple[str, ...]

_SIMPLE_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PATH = rf"{_SIMPLE_KEY}(?:\s*\.\s*{_SIMPLE_KEY})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_KEY_PATH})\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE = re.compile(rf"^\s*({_KEY_PATH})\s*=(.*)$")
_ONE_KEY = re.compile(_SIMPLE_KEY)
_DECODE_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


@dataclass(frozen=True)
class ConfigFile:
    """A parsed configuration file: its values and the line of every key."""

    path: Path
    data: Mapping[str, Any]
    lines: Mapping[KeyPath, int] = field(default_factory=dict)
    # Readable by others: a password written into it is not a secret. (The group is
    # the services' own: the Debian package installs the file root:meta169 0640.)
    shared: bool = False

    def line_of(self, *path: str) -> int:
        """The line of ``path``, else of its nearest enclosing table, else 1."""
        for n in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                return line
        return 1

    def where(self, *path: str) -> str:
        return f"{self.path}:{self.line_of(*path)}"


def parse_config_text(text: str, path: Path, *, shared: bool = False) -> ConfigFile:
    """Parse TOML ``text`` read from ``path``; ConfigError names the line of a syntax error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = _DECODE_POSITION.search(message)
        if found is None:
            raise ConfigError(f"{path}: invalid TOML: {message}") from None
        line, column = found.groups()
        raise ConfigError(f"{path}:{line}: invalid TOML: {message[: found.start()]} (column {column})") from None
    return ConfigFile(path=path, data=data, lines=key_lines(text), shared=shared)


def read_config_file(path: Path, *, what: str) -> ConfigFile:
    """Read and parse the file at ``path``; ``what`` names where the path came from."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (TOML files are): {exc.reason} at byte {exc.start}") from None
    return parse_config_text(text, path, shared=bool(mode & stat.S_IRWXO))


def key_lines(text: str) -> dict[KeyPath, int]:
    """The first line of every table header and key in TOML ``text``, by full key path.

    A dotted key also records each of its prefixes; lines inside a value that spans
    several lines (an array, an inline table, a multi-line string) are not keys.
    """
    out: dict[KeyPath, int] = {}
    table: KeyPath = ()
    depth = 0
    open_string: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if open_string is not None:
            end = line.find(open_string)
            if end < 0:
                continue
            depth, open_string = _scan(line[end + 3 :], depth)
            continue
        if depth > 0:
            depth, open_string = _scan(line, depth)
            continue
        header = _HEADER.match(line)
        if header is not None:
            table = _split_key(header.group(1))
            _record(out, table, number)
            continue
        pair = _KEY_LINE.match(line)
        if pair is not None:
            _record(out, table + _split_key(pair.group(1)), number)
            depth, open_string = _scan(pair.group(2), 0)
    return out


def _record(out: dict[KeyPath, int], path: KeyPath, line: int) -> None:
    for n in range(1, len(path) + 1):
        out.setdefault(path[:n], line)


def _split_key(text: str) -> KeyPath:
    parts = []
    for match in _ONE_KEY.finditer(text):
        part = match.group(0)
        if part.startswith('"'):
            try:
                part = json.loads(part)  # TOML's basic-string escapes are JSON's, plus \U and \e
            except ValueError:
                part = part[1:-1]
        elif part.startswith("'"):
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def _scan(text: str, depth: int) -> tuple[int, str | None]:
    """Bracket depth after ``text``, and the delimiter of a multi-line string left open."""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "#":
            break
        if text.startswith(('"""', "'''"), i):
            delimiter = text[i : i + 3]
            end = text.find(delimiter, i + 3)
            if end < 0:
                return depth, delimiter
            i = end + 3
            continue
        if ch in "\"'":
            i += 1
            while i < len(text) and text[i] != ch:
                i += 2 if ch == '"' and text[i] == "\\" else 1
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        i += 1
    return depth, None
