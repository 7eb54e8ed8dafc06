"""The file's keys are read off the click commands: one per option, named as the long flag."""

from __future__ import annotations

import click
import pytest

from meta169.cli import main
from meta169.config.schema import (
    COMMAND_SECTIONS,
    FlagOnly,
    assign_envvars,
    command_keys,
    env_name,
    flag_only_keys,
    metrics_keys,
    option_key,
    top_level_keys,
    top_level_place,
)


def _command() -> click.Command:
    @click.command("serve")
    @click.option("--listen", "listens", multiple=True)
    @click.option("--poll-interval", default=0.5)
    @click.option("-w", "--workers", default=1)
    @click.option("--proxy/--no-proxy", "proxy_mode", default=False)
    @click.option("--metrics-listen")
    @click.option("--seam", hidden=True)
    @click.option("-q", "quiet_mode", is_flag=True)
    @click.argument("extra", required=False)
    def serve(**_: object) -> None:
        """A stand-in with the shapes real options have."""

    return serve


def test_config_schema_key_is_the_long_flag_without_dashes() -> None:
    keys = command_keys(_command())
    assert sorted(keys) == ["listen", "metrics-listen", "poll-interval", "proxy", "quiet-mode", "workers"]
    assert keys["listen"][0].name == "listens"  # click's default_map speaks parameter names
    assert keys["proxy"][0].name == "proxy_mode"


def test_config_schema_hidden_options_help_and_arguments_have_no_key() -> None:
    keys = command_keys(_command())
    assert "seam" not in keys and "help" not in keys and "extra" not in keys


def test_config_schema_a_group_section_holds_every_subcommand_option() -> None:
    @click.group("identity")
    def group() -> None: ...

    @group.command("init")
    @click.option("--dir", "directory")
    @click.option("--bits", default="2048")
    def init(directory: str | None, bits: str) -> None: ...

    @group.command("cert")
    @click.option("--dir", "directory")
    def cert(directory: str | None) -> None: ...

    keys = command_keys(group)
    assert sorted(keys) == ["bits", "dir"]
    assert [slot.path for slot in keys["dir"]] == [("cert",), ("init",)]


@pytest.mark.parametrize(
    ("flag", "place"),
    [
        ("registry", ("registry", "url")),
        ("registry-password-file", ("registry", "password-file")),
        ("verbose", ("logging", "verbose")),
        ("log-format", ("logging", "log-format")),
    ],
)
def test_config_schema_top_level_options_go_to_registry_or_logging(flag: str, place: tuple[str, str]) -> None:
    assert top_level_place(flag) == place


def test_config_schema_real_top_level_group() -> None:
    places = top_level_keys(main)
    assert places["registry"]["url"].name == "registry_url"
    assert places["registry"]["password-file"].name == "registry_password_file"
    assert "verbose" in places["logging"]
    assert all("config" not in keys for keys in places.values())


@pytest.mark.parametrize(("section", "key"), [("serve", "poll-interval"), ("serve", "listen"), ("proxy", "upstream")])
def test_config_schema_real_commands_have_keys_for_their_flags(section: str, key: str) -> None:
    command = main.get_command(click.Context(main), section)
    assert command is not None
    assert key in command_keys(command)


def test_config_schema_every_section_command_exists() -> None:
    ctx = click.Context(main)
    assert [name for name in COMMAND_SECTIONS if main.get_command(ctx, name) is None] == []


def test_config_schema_metrics_section_collects_metrics_keys() -> None:
    keys = {"serve": command_keys(_command()), "proxy": {}}
    assert list(metrics_keys(keys)) == ["metrics-listen"]


@pytest.mark.parametrize(
    ("section", "flag", "name"),
    [
        ("serve", "poll-interval", "META169_SERVE_POLL_INTERVAL"),
        ("identity", "dir", "META169_IDENTITY_DIR"),
        (None, "verbose", "META169_VERBOSE"),
        (None, "registry-password-file", "META169_REGISTRY_PASSWORD_FILE"),
    ],
)
def test_config_schema_env_names(section: str | None, flag: str, name: str) -> None:
    assert env_name(section, flag) == name


def test_config_schema_assign_envvars_keeps_an_explicit_one() -> None:
    command = _command()
    explicit = click.Option(["--network"], envvar="NET_FROM_ELSEWHERE")
    command.params.append(explicit)
    assign_envvars("serve", command)
    by_key = {option_key(p): p for p in command.params if isinstance(p, click.Option)}
    assert by_key["poll-interval"].envvar == "META169_SERVE_POLL_INTERVAL"
    assert by_key["network"].envvar == "NET_FROM_ELSEWHERE"


def test_config_schema_flag_only_option_has_no_key_and_no_variable() -> None:
    @click.group("sync")
    def group() -> None: ...

    @group.command("libvirt")
    @click.option("--uri", default="qemu:///system")
    @click.option("--dry-run", cls=FlagOnly, is_flag=True, why="a service left in it writes nothing")
    def libvirt(uri: str, dry_run: bool) -> None: ...

    @group.command("file")
    @click.option("--dry-run", cls=FlagOnly, is_flag=True, why="a service left in it writes nothing")
    def file(dry_run: bool) -> None: ...

    assert sorted(command_keys(group)) == ["uri"]
    assert sorted(flag_only_keys(group)) == ["dry-run"]
    assign_envvars("sync", group)
    dry_runs = [p for cmd in (libvirt, file) for p in cmd.params if p.name == "dry_run"]
    assert [p.envvar for p in dry_runs] == [None, None]


def test_config_schema_real_sync_section_holds_every_subcommand_option_but_dry_run() -> None:
    command = main.get_command(click.Context(main), "sync")
    assert command is not None
    keys = command_keys(command)
    assert sorted(keys) == [
        "adopt",
        "all-projects",
        "cloud",
        "interval",
        "metrics-listen",
        "poll-interval",
        "uri",
        "watch",
    ]
    assert [slot.path for slot in keys["adopt"]] == [("file",), ("libvirt",), ("openstack",)]
    assert [slot.path for slot in keys["watch"]] == [("libvirt",), ("openstack",)]
    assert list(flag_only_keys(command)) == ["dry-run"]
