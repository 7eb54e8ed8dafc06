"""examples/meta169.toml, shipped as /etc/meta169/meta169.toml: valid, and complete.

Complete means every key of every section appears in it, set or as a ``# key = value``
line; a new option without its line here fails this test, which names the line to add.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from meta169.cli import main
from meta169.config.file import parse_config_text
from meta169.config.resolve import check_config
from meta169.config.schema import COMMAND_SECTIONS, METRICS_SECTION, command_keys, is_metrics_key, top_level_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "meta169.toml"
_HEADER = re.compile(r"^\[([a-z]+)\]$")
_KEY = re.compile(r"^(#\s)?([a-z][a-z0-9-]*) = (.+)$")


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    found = {name: main.get_command(ctx, name) for name in COMMAND_SECTIONS}
    return {name: command for name, command in found.items() if command is not None}


def _example_lines() -> list[tuple[str, str, str, bool]]:
    """(section, key, value, commented) of every key line of the example."""
    out = []
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        header = _HEADER.match(line)
        if header:
            section = header.group(1)
            continue
        pair = _KEY.match(line)
        if pair:
            out.append((section, pair.group(2), pair.group(3), pair.group(1) is not None))
    return out


def test_config_example_passes_config_check() -> None:
    result = CliRunner().invoke(main, ["--config", str(EXAMPLE), "config", "check"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{EXAMPLE}: ok\n"


def test_config_example_names_every_key() -> None:
    present = {(section, key) for section, key, _, _ in _example_lines()}
    expected = {(section, key) for section, keys in top_level_keys(main).items() for key in keys}
    for name, command in _commands().items():
        for key in command_keys(command):
            expected.add((METRICS_SECTION, key) if is_metrics_key(key) else (name, key))
    missing = sorted(expected - present)
    assert missing == [], f"add a '# key = value' line to {EXAMPLE} for each (section, key): {missing}"


@pytest.mark.parametrize(
    ("section", "key", "value"), [(s, k, v) for s, k, v, commented in _example_lines() if commented]
)
def test_config_example_commented_values_are_valid(section: str, key: str, value: str) -> None:
    # Each "# key = value" line, uncommented on its own, must pass the check too.
    cfg = parse_config_text(f"[{section}]\n{key} = {value}\n", EXAMPLE)
    assert [str(i) for i in check_config(cfg, main, _commands())] == []
