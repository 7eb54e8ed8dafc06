"""From sections to click's default_map: each value through its option's type, every problem
with its file, line, key and the closest valid key."""

from __future__ import annotations

from pathlib import Path

import click

from meta169.config.file import parse_config_text
from meta169.config.resolve import check_config, check_sections, format_problems, resolve_section, resolve_top_level

FILE = Path("/etc/meta169/meta169.toml")


def _serve() -> click.Command:
    @click.command("serve")
    @click.option("--listen", "listens", multiple=True)
    @click.option("--poll-interval", default=0.5)
    @click.option("--hop-limit", type=click.IntRange(1, 64), default=1)
    @click.option("--http-tokens", type=click.Choice(["optional", "required"]), default="optional")
    @click.option("--vendor-data", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--proxy", "proxy_mode", is_flag=True)
    @click.option("--metrics-listen")
    def serve(**_: object) -> None: ...

    return serve


def _proxy() -> click.Command:
    @click.command("proxy")
    @click.option("--upstream", required=True)
    @click.option("--metrics-listen")
    def proxy(**_: object) -> None: ...

    return proxy


def _root() -> click.Group:
    @click.group()
    @click.option("--registry", "registry_url")
    @click.option("-v", "--verbose", count=True)
    def root(**_: object) -> None: ...

    return root


def test_config_resolve_values_become_click_default_map() -> None:
    cfg = parse_config_text(
        '[serve]\nlisten = ["127.0.0.1:8775=network:net-a"]\npoll-interval = 2\nproxy = true\n'
        'vendor-data = "/etc/meta169/vendor.json"\n',
        FILE,
    )
    resolved = resolve_section(cfg, "serve", _serve())
    assert resolved.issues == ()
    assert resolved.default_map == {
        "listens": ["127.0.0.1:8775=network:net-a"],
        "poll_interval": 2,
        "proxy_mode": True,
        "vendor_data": "/etc/meta169/vendor.json",
    }
    assert resolved.settings[("serve", "poll-interval")].line == 3


def test_config_resolve_one_string_for_a_repeatable_option_is_a_list_of_one() -> None:
    cfg = parse_config_text('[serve]\nlisten = "unix:/run/meta169/serve.sock=proxy"\n', FILE)
    assert resolve_section(cfg, "serve", _serve()).default_map == {"listens": ["unix:/run/meta169/serve.sock=proxy"]}


def test_config_resolve_every_problem_with_line_key_and_suggestion() -> None:
    text = (
        "[serve]\n"  # 1
        "poll-intervall = 0.5\n"  # 2
        "hop-limit = 99\n"  # 3
        'http-tokens = "sometimes"\n'  # 4
        "poll-interval = [1, 2]\n"  # 5
        "workers = { n = 2 }\n"  # 6
        'upstream = "unix:/x"\n'  # 7
        "poll_interval = 1\n"  # 8
    )
    issues = [
        str(i) for i in check_config(parse_config_text(text, FILE), _root(), {"serve": _serve(), "proxy": _proxy()})
    ]
    assert issues == [
        f"{FILE}:2: [serve] poll-intervall: unknown key; did you mean poll-interval?",
        f"{FILE}:3: [serve] hop-limit: 99 is not in the range 1<=x<=64.",
        f"{FILE}:4: [serve] http-tokens: 'sometimes' is not one of 'optional', 'required'.",
        f"{FILE}:5: [serve] poll-interval: takes one value, not a list",
        f"{FILE}:6: [serve] workers: unknown key; valid keys are hop-limit, http-tokens, listen, "
        "metrics-listen, poll-interval, proxy, vendor-data",
        f"{FILE}:7: [serve] upstream: unknown key here; it belongs in [proxy]",
        f"{FILE}:8: [serve] poll_interval: unknown key; did you mean poll-interval?",
    ]


def test_config_resolve_a_table_where_a_value_belongs() -> None:
    cfg = parse_config_text("[serve]\n[serve.listen]\na = 1\n", FILE)
    assert [str(i) for i in resolve_section(cfg, "serve", _serve()).issues] == [
        f"{FILE}:2: [serve] listen: expected a value, not a table"
    ]


def test_config_resolve_unknown_and_misshapen_sections() -> None:
    cfg = parse_config_text('serve = 1\n[serv]\n[doctor]\nurl = "x"\n', FILE)
    assert [str(i) for i in check_sections(cfg)] == [
        f"{FILE}:1: [serve]: must be a table: write [serve] on a line",
        f"{FILE}:2: unknown section [serv]; did you mean [serve]?",
        f"{FILE}:3: unknown section [doctor]; sections are [registry], [logging], [metrics], [serve], [proxy], "
        "[admin], [identity], [sync]",
    ]


def test_config_resolve_top_level_sections() -> None:
    cfg = parse_config_text('[registry]\nurl = "sqlite:///x.db"\nuser = "x"\n[logging]\nverbose = -1\n', FILE)
    resolved = resolve_top_level(cfg, _root())
    assert resolved.default_map == {"registry_url": "sqlite:///x.db"}
    assert [str(i) for i in resolved.issues] == [
        f"{FILE}:3: [registry] user: unknown key; valid keys are url",
        f"{FILE}:5: [logging] verbose: -1 is not in the range x>=0.",
    ]


def test_config_resolve_metrics_lends_to_each_command_and_its_own_section_wins() -> None:
    cfg = parse_config_text(
        '[metrics]\nmetrics-listen = "127.0.0.1:9169"\n[proxy]\nmetrics-listen = "127.0.0.1:9170"\n', FILE
    )
    serve = resolve_section(cfg, "serve", _serve())
    proxy = resolve_section(cfg, "proxy", _proxy())
    assert serve.default_map == {"metrics_listen": "127.0.0.1:9169"}
    assert serve.settings[("serve", "metrics-listen")].section == "metrics"
    assert proxy.default_map == {"metrics_listen": "127.0.0.1:9170"}
    assert proxy.settings[("proxy", "metrics-listen")].line == 4


def test_config_resolve_metrics_keys_must_belong_to_a_command() -> None:
    cfg = parse_config_text('[metrics]\nmetrics-listn = "x"\nlisten = "y"\n', FILE)
    issues = [str(i) for i in check_config(cfg, _root(), {"serve": _serve(), "proxy": _proxy()})]
    assert issues == [
        f"{FILE}:2: [metrics] metrics-listn: unknown key; did you mean metrics-listen?",
        f"{FILE}:3: [metrics] listen: unknown key; did you mean metrics-listen? (it belongs in [serve])",
    ]


def test_config_resolve_problems_formatted_one_per_line() -> None:
    assert format_problems(["a:1: x"]) == "a:1: x"
    assert format_problems(["a:1: x", "a:2: y"]) == "2 problems in the configuration:\n  a:1: x\n  a:2: y"


def test_config_resolve_a_flag_only_key_is_a_problem_that_says_why() -> None:
    from meta169.config.schema import FlagOnly

    @click.command("sync")
    @click.option("--cloud")
    @click.option("--dry-run", cls=FlagOnly, is_flag=True, why="a service left in it writes nothing")
    def sync(**_: object) -> None: ...

    cfg = parse_config_text('[sync]\ncloud = "prod"\ndry-run = true\n', FILE)
    resolved = resolve_section(cfg, "sync", sync)
    assert resolved.default_map == {"cloud": "prod"}
    assert [str(i) for i in resolved.issues] == [
        f"{FILE}:3: [sync] dry-run: not a setting: only the flag --dry-run sets it, on the command line; "
        "a service left in it writes nothing"
    ]
