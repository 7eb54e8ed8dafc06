"""Reading the configuration file: values by tomllib, the line of every key by our scan."""

from __future__ import annotations

from pathlib import Path

import pytest

from meta169.config.file import key_lines, parse_config_text, read_config_file
from meta169.errors import ConfigError

TEXT = """\
# a comment with key = value in it
[registry]
url = "sqlite:///var/lib/meta169/registry.db"

[serve]
listen = [
    "127.0.0.1:8775=network:net-a",   # not a key = here
    "unix:/run/x.sock=proxy",
]
"poll-interval" = 0.5
note = '''
fake = 1
'''
rate-limit = "0"   # trailing comment [not a table]

[ identity ]
dir.sub = "x"
inline = { a = 1, b = [2,
  3] }
after = true
proxy.upstream = "unix:/x"
"""


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("registry",), 2),
        (("registry", "url"), 3),
        (("serve",), 5),
        (("serve", "listen"), 6),
        (("serve", "poll-interval"), 10),
        (("serve", "note"), 11),
        (("serve", "rate-limit"), 14),
        (("identity",), 16),
        (("identity", "dir"), 17),
        (("identity", "dir", "sub"), 17),
        (("identity", "inline"), 18),
        (("identity", "after"), 20),
        (("identity", "proxy", "upstream"), 21),
    ],
)
def test_config_file_finds_the_line_of_each_key(path: tuple[str, ...], line: int) -> None:
    assert key_lines(TEXT)[path] == line


def test_config_file_lines_inside_values_are_not_keys() -> None:
    lines = key_lines(TEXT)
    assert ("serve", "fake") not in lines
    assert ("serve", "not a key") not in lines
    assert ("identity", "b") not in lines
    assert ("identity", "inline", "a") not in lines


def test_config_file_line_of_falls_back_to_the_enclosing_table() -> None:
    cfg = parse_config_text(TEXT, Path("/etc/meta169/meta169.toml"))
    assert cfg.line_of("serve", "nonexistent") == 5
    assert cfg.where("serve", "listen") == "/etc/meta169/meta169.toml:6"
    assert cfg.line_of("nowhere") == 1


def test_config_file_syntax_error_names_file_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text("[serve]\nworkers = 2\nlisten = [\n  'a',\n  oops\n]\n", Path("/x/meta169.toml"))
    assert str(caught.value).startswith("/x/meta169.toml:5: invalid TOML: ")
    assert "column" in str(caught.value)


def test_config_file_unreadable_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .*missing\.toml: cannot read: No such file"):
        read_config_file(tmp_path / "missing.toml", what="--config")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[serve]\nnetwork = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config_file(bad, what="--config")


def test_config_file_shared_means_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "meta169.toml"
    path.write_text("[registry]\n")
    path.chmod(0o640)
    assert read_config_file(path, what="--config").shared is False
    path.chmod(0o644)
    assert read_config_file(path, what="--config").shared is True
