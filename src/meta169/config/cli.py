"""``meta169 config``: show the configuration in effect, check a file. Thin over
:mod:`meta169.config`.

Both may import every configured subcommand (their options are the file's keys);
a normal start never does.
"""

from __future__ import annotations

from pathlib import Path

import click

from meta169.config.file import read_config_file
from meta169.config.invocation import STATE_KEY, LoadedConfig
from meta169.config.resolve import Resolved, check_config, format_problems, resolve_section
from meta169.config.schema import COMMAND_SECTIONS, REGISTRY_SECTION, assign_envvars, command_keys, top_level_keys
from meta169.config.show import Entry, Section, origin_of, render
from meta169.errors import ConfigError
from meta169.exits import cli_errors


@click.group("config")
def config() -> None:
    """Show the configuration in effect; check a configuration file."""


@config.command("show")
@click.option(
    "--command",
    "command_name",
    type=click.Choice(COMMAND_SECTIONS),
    help="Only this command's section (with [registry] and [logging]).",
)
@click.pass_context
def show(ctx: click.Context, command_name: str | None) -> None:
    """Print the configuration in effect as TOML, each value with where it came from.

    Precedence: flag > environment (META169_*) > file > default. [metrics] keys are
    shown in each command that takes them; secrets are masked.
    """
    with cli_errors():
        root, state = _state(ctx)
        if state.problems:
            raise ConfigError(format_problems(state.problems))
        group = root.command
        assert isinstance(group, click.Group)
        sections = _top_level_sections(root, state)
        for name in [command_name] if command_name else COMMAND_SECTIONS:
            command = group.get_command(root, name)
            if command is not None:
                sections.append(_command_section(root, state, name, command))
        where = f"{state.path} ({state.named_by})" if state.file else f"none ({state.path} does not exist)"
        header = (
            "meta169 configuration in effect: flag > environment (META169_*) > file > default",
            f"file: {where}",
        )
    click.echo(render(sections, header), nl=False)


@config.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def check(ctx: click.Context, file: Path | None) -> None:
    """Validate FILE (default: the file in effect) without starting anything.

    Every section, key and value is checked, each value through its option's own
    type; every problem is listed with its line. Exit 0 if valid, 2 if not.
    """
    with cli_errors():
        root, state = _state(ctx)
        if file is None and state.file is None and not state.problems:
            raise ConfigError(
                f"no configuration file: {state.path} does not exist; name one: meta169 config check FILE"
            )
        path = file if file is not None else state.path
        cfg = read_config_file(path, what="configuration file")
        group = root.command
        assert isinstance(group, click.Group)
        commands = {}
        for name in COMMAND_SECTIONS:
            command = group.get_command(root, name)
            if command is not None:
                commands[name] = command
        issues = check_config(cfg, group, commands)
        if issues:
            raise ConfigError(format_problems([str(i) for i in issues]))
    click.echo(f"{path}: ok")


def _state(ctx: click.Context) -> tuple[click.Context, LoadedConfig]:
    root = ctx.find_root()
    state = root.meta.get(STATE_KEY)
    if not isinstance(state, LoadedConfig):
        raise ConfigError("meta169 config runs under the meta169 command, which reads the file")
    return root, state


def _top_level_sections(root: click.Context, state: LoadedConfig) -> list[Section]:
    from meta169.cli import Ctx

    file = str(state.file.path) if state.file is not None else None
    sections = []
    for section, keys in top_level_keys(root.command).items():
        entries = []
        for key, slot in keys.items():
            value = root.params.get(slot.name)
            if section == REGISTRY_SECTION and key == "url" and value is None and isinstance(root.obj, Ctx):
                value = root.obj.configured_registry_url
            source = root.get_parameter_source(slot.name)
            setting = state.top.settings.get((section, key))
            entries.append(Entry(key, value, origin_of(source, slot.option.envvar, setting, file)))
        sections.append(Section(section, tuple(entries)))
    return sections


def _command_section(root: click.Context, state: LoadedConfig, name: str, command: click.Command) -> Section:
    # The same steps as a start of the command: its variables, its section as
    # default_map, then click's parsing of an empty command line.
    assign_envvars(name, command)
    resolved = resolve_section(state.file, name, command) if state.file is not None else Resolved()
    if resolved.issues:
        raise ConfigError(format_problems([str(i) for i in resolved.issues]))
    root.default_map = {**(root.default_map or {}), name: resolved.default_map}
    contexts: dict[tuple[str, ...], click.Context] = {}
    file = str(state.file.path) if state.file is not None else None
    entries = []
    for key, slots in command_keys(command).items():
        slot = slots[0]
        sub = _context(contexts, root, name, command, slot.path)
        value = sub.params.get(slot.name)
        source = sub.get_parameter_source(slot.name)
        setting = resolved.settings.get((name, key))
        entries.append(Entry(key, value, origin_of(source, slot.option.envvar, setting, file)))
    return Section(name, tuple(entries))


def _context(
    contexts: dict[tuple[str, ...], click.Context],
    root: click.Context,
    name: str,
    command: click.Command,
    path: tuple[str, ...],
) -> click.Context:
    found = contexts.get(path)
    if found is not None:
        return found
    if not path:
        made = command.make_context(name, [], parent=root, resilient_parsing=True)
    else:
        parent = _context(contexts, root, name, command, path[:-1])
        group = parent.command
        assert isinstance(group, click.Group)
        made = group.commands[path[-1]].make_context(path[-1], [], parent=parent, resilient_parsing=True)
    contexts[path] = made
    return made
