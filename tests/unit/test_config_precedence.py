"""Precedence through the real top-level group class: flag > META169_* > file > default.

A stand-in ``serve`` under ``MainGroup`` and the real ``--config`` callback: what the
command receives, and the source click records for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.core import ParameterSource
from click.testing import CliRunner

from meta169.cli import MainGroup
from meta169.config import load_config

ENV = "META169_SERVE_POLL_INTERVAL"


def _group(seen: dict[str, Any]) -> click.Group:
    @click.group(cls=MainGroup)
    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="META169_CONFIG",
        is_eager=True,
        expose_value=False,
        callback=load_config,
    )
    @click.option("--registry", "registry_url", envvar="META169_REGISTRY")
    @click.option("-v", "--verbose", count=True)
    @click.pass_context
    def root(ctx: click.Context, registry_url: str | None, verbose: int) -> None:
        seen["registry"] = (registry_url, ctx.get_parameter_source("registry_url"))
        seen["verbose"] = (verbose, ctx.get_parameter_source("verbose"))

    @root.command("serve")
    @click.option("--poll-interval", default=0.5)
    @click.option("--listen", "listens", multiple=True)
    @click.pass_context
    def serve(ctx: click.Context, poll_interval: float, listens: tuple[str, ...]) -> None:
        seen["poll"] = (poll_interval, ctx.get_parameter_source("poll_interval"))
        seen["listens"] = listens

    return root


@pytest.mark.parametrize(
    ("flag", "env", "file", "value", "source"),
    [
        (None, None, None, 0.5, ParameterSource.DEFAULT),
        (None, None, 2.0, 2.0, ParameterSource.DEFAULT_MAP),
        (None, "3", 2.0, 3.0, ParameterSource.ENVIRONMENT),
        ("4", "3", 2.0, 4.0, ParameterSource.COMMANDLINE),
        ("4", None, None, 4.0, ParameterSource.COMMANDLINE),
        (None, "3", None, 3.0, ParameterSource.ENVIRONMENT),
    ],
)
def test_config_precedence_flag_env_file_default(
    tmp_path: Path, flag: str | None, env: str | None, file: float | None, value: float, source: ParameterSource
) -> None:
    config = tmp_path / "meta169.toml"
    config.write_text("[serve]\n" + (f"poll-interval = {file}\n" if file is not None else ""))
    seen: dict[str, Any] = {}
    args = ["--config", str(config), "serve", *(["--poll-interval", flag] if flag else [])]
    result = CliRunner().invoke(_group(seen), args, env={ENV: env})
    assert result.exit_code == 0, result.output
    assert seen["poll"] == (value, source)


def test_config_precedence_top_level_sections(tmp_path: Path) -> None:
    config = tmp_path / "meta169.toml"
    config.write_text('[registry]\nurl = "sqlite:///from/file.db"\n[logging]\nverbose = 2\n')
    seen: dict[str, Any] = {}
    result = CliRunner().invoke(
        _group(seen), ["--config", str(config), "-v", "serve"], env={"META169_REGISTRY": "memory://"}
    )
    assert result.exit_code == 0, result.output
    assert seen["registry"] == ("memory://", ParameterSource.ENVIRONMENT)
    assert seen["verbose"] == (1, ParameterSource.COMMANDLINE)
    result = CliRunner().invoke(_group(seen), ["serve"], env={"META169_CONFIG": str(config), "META169_REGISTRY": None})
    assert result.exit_code == 0, result.output
    assert seen["registry"] == ("sqlite:///from/file.db", ParameterSource.DEFAULT_MAP)
    assert seen["verbose"] == (2, ParameterSource.DEFAULT_MAP)


def test_config_precedence_repeatable_option_from_env_splits_on_spaces(tmp_path: Path) -> None:
    config = tmp_path / "meta169.toml"
    config.write_text('[serve]\nlisten = ["from-file"]\n')
    seen: dict[str, Any] = {}
    result = CliRunner().invoke(
        _group(seen), ["--config", str(config), "serve"], env={"META169_SERVE_LISTEN": "a=network:x b=proxy"}
    )
    assert result.exit_code == 0, result.output
    assert seen["listens"] == ("a=network:x", "b=proxy")


def test_config_precedence_problems_stop_the_command_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "meta169.toml"
    config.write_text('[serve]\npoll-interval = "soon"\nlisten = 5\npol-interval = 1\n')
    seen: dict[str, Any] = {}
    result = CliRunner().invoke(_group(seen), ["--config", str(config), "serve"])
    assert result.exit_code == 2
    assert "poll" not in seen
    assert f"{config}:2: [serve] poll-interval: 'soon' is not a valid float." in result.output
    assert f"{config}:4: [serve] pol-interval: unknown key; did you mean poll-interval?" in result.output
    assert "2 problems in the configuration" in result.output


def test_config_precedence_missing_named_file_is_an_error(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    missing = tmp_path / "nope.toml"
    result = CliRunner().invoke(_group(seen), ["--config", str(missing), "serve"])
    assert result.exit_code == 2
    assert f"--config) {missing}: cannot read: No such file or directory" in result.output
    result = CliRunner().invoke(_group(seen), ["serve"], env={"META169_CONFIG": str(missing)})
    assert result.exit_code == 2
    assert "META169_CONFIG" in result.output
