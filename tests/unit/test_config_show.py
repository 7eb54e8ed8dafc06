"""Writing the effective configuration: valid TOML, origins as comments, secrets masked."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.core import ParameterSource

from meta169.config.resolve import Setting
from meta169.config.show import Entry, Section, origin_of, render, toml_value


def test_config_show_render_is_toml_with_origins() -> None:
    text = render(
        [
            Section("registry", (Entry("url", "postgresql://meta169:hunter2@db/meta169", "flag"),)),
            Section(
                "serve",
                (
                    Entry("listen", ("127.0.0.1:8775=network:net-a",), "/etc/meta169/meta169.toml:12"),
                    Entry("network", None, "default"),
                    Entry("poll-interval", 0.5, "env META169_SERVE_POLL_INTERVAL"),
                    Entry("proxy", False, "default"),
                    Entry("vendor-data", Path("/etc/v.json"), "default"),
                    Entry("neutron-secret", "abc", "default"),
                ),
            ),
        ],
        header=("effective",),
    )
    assert text.splitlines() == [
        "# effective",
        "",
        "[registry]",
        'url = "postgresql://meta169:***@db/meta169"  # flag',
        "",
        "[serve]",
        'listen = ["127.0.0.1:8775=network:net-a"]  # /etc/meta169/meta169.toml:12',
        "# network is not set  # default",
        "poll-interval = 0.5  # env META169_SERVE_POLL_INTERVAL",
        "proxy = false  # default",
        'vendor-data = "/etc/v.json"  # default',
        'neutron-secret = "***"  # default',
    ]
    assert tomllib.loads(text)["serve"]["poll-interval"] == 0.5
    assert "hunter2" not in text


@pytest.mark.parametrize(
    "value",
    [0, -3, 1.0, 2.5e-07, 1e300, True, "plain", 'quote " and \\ and \n and \x7f and é', [], [1, "a"], ("x",)],
)
def test_config_show_toml_values_read_back(value: object) -> None:
    expected = list(value) if isinstance(value, tuple) else value
    assert tomllib.loads(f"k = {toml_value(value)}")["k"] == expected


@pytest.mark.parametrize(
    ("source", "setting", "origin"),
    [
        (ParameterSource.COMMANDLINE, None, "flag"),
        (ParameterSource.ENVIRONMENT, None, "env META169_SERVE_WORKERS"),
        (ParameterSource.DEFAULT_MAP, Setting(2, "serve", "workers", 7), "/etc/m.toml:7"),
        (ParameterSource.DEFAULT_MAP, Setting("x", "metrics", "metrics-listen", 3), "/etc/m.toml:3 [metrics]"),
        (ParameterSource.DEFAULT, None, "default"),
        (None, None, "default"),
    ],
)
def test_config_show_origins(source: ParameterSource | None, setting: Setting | None, origin: str) -> None:
    assert origin_of(source, "META169_SERVE_WORKERS", setting, "/etc/m.toml") == origin
