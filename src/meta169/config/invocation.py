"""The configuration file in one ``meta169`` invocation: read once at the top, each
section handed to click as the ``default_map`` of the command that runs.

Click's own precedence then decides every value: a flag, else the option's
environment variable, else ``default_map`` (the file), else the option's default;
``ctx.get_parameter_source`` says which one won. Only the section of the command
that runs is resolved, so a normal start imports no other subcommand's module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
from click.core import ParameterSource

from meta169.config.file import DEFAULT_CONFIG_PATH, ConfigFile, read_config_file
from meta169.config.resolve import Resolved, check_sections, format_problems, resolve_section, resolve_top_level
from meta169.config.schema import COMMAND_SECTIONS, assign_envvars
from meta169.config.secrets import url_has_password
from meta169.errors import ConfigError

# Where the loaded file waits in the top-level context's ``meta`` for the subcommand.
STATE_KEY = "meta169.config"
# The command that reports problems in the file itself instead of refusing to run.
CONFIG_COMMAND = "config"


@dataclass(frozen=True)
class LoadedConfig:
    """The file of this invocation (None: the default path does not exist), how it was
    named (``--config``, ``META169_CONFIG`` or ``default``), what the top-level group
    took from it and the problems found so far."""

    path: Path
    named_by: str
    file: ConfigFile | None
    top: Resolved = field(default_factory=Resolved)
    problems: tuple[str, ...] = ()


def load_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """The eager ``--config`` callback: read the file before the other top-level options
    are parsed, so that ``[registry]`` and ``[logging]`` become their defaults.

    Problems are kept, not raised: they stop the subcommand (exit 2), except
    ``meta169 config check``, which is there to list them.
    """
    state = read_for(ctx, param, value)
    ctx.meta[STATE_KEY] = state
    defaults = dict(state.top.default_map)
    if ctx.default_map:
        defaults.update(ctx.default_map)  # a caller's own default_map wins over the file
    ctx.default_map = defaults


def read_for(ctx: click.Context, param: click.Parameter, value: Path | None) -> LoadedConfig:
    source = ctx.get_parameter_source(param.name) if param.name else None
    if value is None:
        path, named_by = DEFAULT_CONFIG_PATH, "default"
        if not path.exists():
            return LoadedConfig(path, named_by, None)
    else:
        path = value
        named_by = "--config" if source == ParameterSource.COMMANDLINE else str(param.envvar or "--config")
    try:
        cfg = read_config_file(path, what=f"configuration file ({named_by})")
    except ConfigError as exc:
        return LoadedConfig(path, named_by, None, problems=(str(exc),))
    issues = [*check_sections(cfg)]
    top = resolve_top_level(cfg, ctx.command)
    issues += top.issues
    return LoadedConfig(path, named_by, cfg, top, tuple(str(i) for i in sorted(issues)))


def apply_to_command(ctx: click.Context, name: str, command: click.Command) -> None:
    """Before ``command`` parses its flags: give its options their environment variables
    and the file's section as ``default_map``; ConfigError if the file has problems."""
    state = ctx.meta.get(STATE_KEY)
    if not isinstance(state, LoadedConfig) or name == CONFIG_COMMAND:
        return
    problems = list(state.problems)
    if name in COMMAND_SECTIONS:
        assign_envvars(name, command)
        if state.file is not None:
            resolved = resolve_section(state.file, name, command)
            problems += [str(i) for i in resolved.issues]
            if ctx.default_map is None:
                ctx.default_map = {}
            ctx.default_map[name] = resolved.default_map
    if problems:
        raise ConfigError(format_problems(problems))


def exposed_password_warning(ctx: click.Context, param_name: str) -> str | None:
    """A warning when the registry URL carries a password from where others can read it."""
    url = ctx.params.get(param_name)
    if not isinstance(url, str) or not url_has_password(url):
        return None
    source = ctx.get_parameter_source(param_name)
    state = ctx.meta.get(STATE_KEY)
    if source == ParameterSource.COMMANDLINE:
        where = "on the command line, where every local user can read it (ps, /proc/PID/cmdline)"
    elif source == ParameterSource.ENVIRONMENT:
        where = "in the environment, readable in /proc/PID/environ and often logged by supervisors"
    elif source == ParameterSource.DEFAULT_MAP and isinstance(state, LoadedConfig) and state.file is not None:
        if not state.file.shared:
            return None
        where = f"in {state.file.path}, which every local user can read"
    else:
        return None
    return (
        f"the registry URL carries a password {where}; put the password in a file of mode 0600 "
        "named by [registry] password-file (or --registry-password-file), in ~/.pgpass or PGPASSFILE, "
        "or use a libpq service file (postgresql:///?service=NAME)"
    )
