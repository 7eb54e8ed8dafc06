"""Which keys the configuration file has: read off the click commands themselves.

No list of keys is kept by hand. A command's section holds one key per option, named
as the long flag without its dashes (``--poll-interval`` is ``poll-interval``); a
group's section (``[identity]``) holds the options of all its subcommands, a key
feeding every subcommand that has that flag. The top-level group's own options go to
``[registry]`` (``--registry`` is ``url``, ``--registry-X`` is ``X``) or, all the
others, to ``[logging]``. ``[metrics]`` holds every ``metrics*`` key of the command
sections, as a default for each command that has it.

What is kept here as data is only which commands have a section, and the three
sections that are not commands. An option declared with :class:`FlagOnly` has no
key and no variable: only its flag sets it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import click

# Commands of the top-level group that have a section of their own: the daemons and
# the operator's tools that read the same files on every run. One-off tools (doctor,
# query, lab, plumb) take flags only.
COMMAND_SECTIONS: tuple[str, ...] = ("serve", "proxy", "admin", "identity", "sync")
REGISTRY_SECTION = "registry"
LOGGING_SECTION = "logging"
METRICS_SECTION = "metrics"
TOP_LEVEL_SECTIONS: tuple[str, ...] = (REGISTRY_SECTION, LOGGING_SECTION)
SECTIONS: tuple[str, ...] = (REGISTRY_SECTION, LOGGING_SECTION, METRICS_SECTION, *COMMAND_SECTIONS)

# Options of the top-level group that are not settings: which file to read.
CONFIG_OPTION = "config"
ENV_PREFIX = "META169"


@dataclass(frozen=True)
class Slot:
    """One click option a configuration key feeds.

    ``path`` is the chain of subcommand names from the section's command down to the
    command that has the option: ``()`` for the command itself, ``("init",)`` for
    ``meta169 identity init``.
    """

    path: tuple[str, ...]
    option: click.Option

    @property
    def name(self) -> str:
        """The option's parameter name: its key in click's ``default_map``."""
        assert self.option.name is not None
        return self.option.name


def option_key(option: click.Option) -> str:
    """The key of ``option`` in the file: its first long flag without the dashes."""
    for flag in option.opts:
        if flag.startswith("--"):
            return flag[2:]
    assert option.name is not None
    return option.name.replace("_", "-")


class FlagOnly(click.Option):
    """An option only its flag sets: no key in the file, no META169_* variable.

    For a switch that, written once in a file or a unit's environment and forgotten,
    would be a misconfiguration nobody notices; ``why`` says so to whoever writes
    the key anyway (``config check`` and a start report it as a problem).
    """

    def __init__(self, *args: Any, why: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.why = why


def _settable(param: click.Parameter) -> bool:
    # --help and --version are eager and expose no value; hidden options are test seams.
    return (
        isinstance(param, click.Option) and param.expose_value and not param.hidden and not isinstance(param, FlagOnly)
    )


def command_keys(command: click.Command) -> dict[str, tuple[Slot, ...]]:
    """Every key of ``command``'s section, with the options it feeds (several in a group)."""
    out: dict[str, list[Slot]] = {}
    for path, cmd in _walk(command, ()):
        for param in cmd.params:
            if _settable(param):
                assert isinstance(param, click.Option)
                out.setdefault(option_key(param), []).append(Slot(path, param))
    return {key: tuple(slots) for key, slots in out.items()}


def flag_only_keys(command: click.Command) -> dict[str, FlagOnly]:
    """The keys ``command``'s section must not hold: its :class:`FlagOnly` options (and their subcommands')."""
    return {
        option_key(param): param
        for _path, cmd in _walk(command, ())
        for param in cmd.params
        if isinstance(param, FlagOnly)
    }


def _walk(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


def top_level_keys(group: click.Command) -> dict[str, dict[str, Slot]]:
    """The top-level group's own options by section: ``{"registry": {...}, "logging": {...}}``."""
    out: dict[str, dict[str, Slot]] = {section: {} for section in TOP_LEVEL_SECTIONS}
    for param in group.params:
        if not _settable(param):
            continue
        assert isinstance(param, click.Option)
        flag = option_key(param)
        if flag == CONFIG_OPTION:
            continue
        section, key = top_level_place(flag)
        out[section][key] = Slot((), param)
    return out


def top_level_place(flag: str) -> tuple[str, str]:
    """The section and key of the top-level option ``--flag``."""
    if flag == REGISTRY_SECTION:
        return REGISTRY_SECTION, "url"
    if flag.startswith(REGISTRY_SECTION + "-"):
        return REGISTRY_SECTION, flag[len(REGISTRY_SECTION) + 1 :]
    return LOGGING_SECTION, flag


def is_metrics_key(key: str) -> bool:
    return key == METRICS_SECTION or key.startswith(METRICS_SECTION + "-")


def metrics_keys(sections: Mapping[str, Mapping[str, tuple[Slot, ...]]]) -> dict[str, list[tuple[str, Slot]]]:
    """The keys ``[metrics]`` may hold, each with the (section, option) pairs it feeds."""
    out: dict[str, list[tuple[str, Slot]]] = {}
    for section, keys in sections.items():
        for key, slots in keys.items():
            if is_metrics_key(key):
                out.setdefault(key, []).extend((section, slot) for slot in slots)
    return dict(sorted(out.items()))


def env_name(section: str | None, flag: str) -> str:
    """The environment variable of an option: META169_[SECTION_]FLAG, upper case, ``-`` as ``_``.

    Top-level options have no section (``--verbose`` is META169_VERBOSE), a command's
    options are prefixed with its section (``serve --poll-interval`` is
    META169_SERVE_POLL_INTERVAL).
    """
    parts = [ENV_PREFIX, *([section] if section else []), flag]
    return "_".join(parts).upper().replace("-", "_")


def assign_envvars(section: str | None, command: click.Command) -> None:
    """Give every option of ``command`` (and its subcommands) its META169_* variable.

    Click reads a variable only through ``Option.envvar``; an option that already
    names one (``--registry``: META169_REGISTRY) keeps it.
    """
    keys = top_level_flags(command) if section is None else command_keys(command)
    for flag, slots in keys.items():
        for slot in slots:
            if slot.option.envvar is None:
                slot.option.envvar = env_name(section, flag)


def top_level_flags(group: click.Command) -> dict[str, tuple[Slot, ...]]:
    """The top-level group's own options by flag (not by section key), ``--config`` included."""
    return {option_key(p): (Slot((), p),) for p in group.params if _settable(p) and isinstance(p, click.Option)}
