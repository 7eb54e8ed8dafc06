"""The real ``meta169`` process reading its configuration file: ``config show``, ``config
check``, and ``serve`` started from the file alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.integration.serving import get, meta169_argv, one_instance_inventory, run_cli
from tests.processes import stop

LISTENING = re.compile(r"listening on (\S+):(\d+) ")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("META169_") or k == "META169_REQUIRE_E2E"}
    environ.update(env or {})
    return subprocess.run(meta169_argv(*args), capture_output=True, text=True, timeout=60, check=False, env=environ)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_config_show_values_with_their_origins(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "meta169.toml",
        '[registry]\nurl = "sqlite:///var/lib/meta169/registry.db"\n\n'
        '[serve]\nlisten = ["127.0.0.1:8775=network:net-a"]\npoll-interval = 2.0\nhop-limit = 2\n',
    )
    result = _run(
        "--config",
        str(config),
        "--registry",
        "postgresql://meta169:hunter2@db.example.org/meta169",
        "config",
        "show",
        "--command",
        "serve",
        env={"META169_SERVE_POLL_INTERVAL": "3", "META169_VERBOSE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'url = "postgresql://meta169:***@db.example.org/meta169"  # flag' in lines
    assert "verbose = 1  # env META169_VERBOSE" in lines
    assert f'listen = ["127.0.0.1:8775=network:net-a"]  # {config}:5' in lines
    assert "poll-interval = 3.0  # env META169_SERVE_POLL_INTERVAL" in lines
    assert f"hop-limit = 2  # {config}:7" in lines
    assert 'http-tokens = "optional"  # default' in lines
    assert "# network is not set  # default" in lines
    assert "[proxy]" not in lines
    assert "hunter2" not in result.stdout + result.stderr
    # A password in argv is readable by every local user: the warning says where it goes instead.
    assert "warning: the registry URL carries a password on the command line" in result.stderr
    assert "password-file" in result.stderr
    # The output is itself a configuration file.
    assert tomllib.loads(result.stdout)["serve"]["hop-limit"] == 2


def test_config_show_without_a_file_shows_defaults(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.toml", "")
    result = _run("--config", str(empty), "config", "show")
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert set(shown) == {"registry", "logging", "serve", "proxy", "admin", "identity", "sync"}
    assert shown["admin"]["listen"] == "127.0.0.1:8776"
    assert "# upstream is not set  # default" in result.stdout.splitlines()


def test_config_check_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "meta169.toml",
        '[serve]\npoll-intervall = 0.5\nhop-limit = 99\n[proxy]\nupstream-timeout = "soon"\n[doctr]\n',
    )
    result = _run("config", "check", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "meta169: error: 4 problems in the configuration:",
        f"  {config}:2: [serve] poll-intervall: unknown key; did you mean poll-interval?",
        f"  {config}:3: [serve] hop-limit: 99 is not in the range 1<=x<=64.",
        f"  {config}:5: [proxy] upstream-timeout: 'soon' is not a valid float.",
        f"  {config}:6: unknown section [doctr]; sections are [registry], [logging], [metrics], [serve], [proxy], "
        "[admin], [identity], [sync]",
    ]


def test_config_check_syntax_error_and_missing_file(tmp_path: Path) -> None:
    broken = _write(tmp_path / "broken.toml", '[serve]\nlisten = ["a",\n')
    result = _run("config", "check", str(broken))
    assert result.returncode == 2
    assert f"meta169: error: {broken}:" in result.stderr and "invalid TOML" in result.stderr
    # The file in effect is broken: every command but config check refuses to run.
    result = _run("--config", str(broken), "instance", "list")
    assert result.returncode == 2 and "invalid TOML" in result.stderr
    result = _run("--config", str(tmp_path / "missing.toml"), "instance", "list")
    assert result.returncode == 2 and "cannot read: No such file or directory" in result.stderr
    good = _write(tmp_path / "good.toml", "[serve]\nworkers = 2\n")
    result = _run("--config", str(broken), "config", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{good}: ok\n"


def test_config_serve_from_the_file_alone_answers(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(one_instance_inventory("127.0.0.5"))
    registry = f"sqlite://{tmp_path / 'registry.db'}"
    run_cli(registry, "import", str(inventory))
    config = _write(
        tmp_path / "meta169.toml",
        f'[registry]\nurl = "{registry}"\n\n[logging]\nverbose = 1\n\n'
        '[serve]\nlisten = ["127.0.0.1:0=network:net-a"]\npoll-interval = 0.2\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("META169_") or k == "META169_REQUIRE_E2E"}
    proc = subprocess.Popen(
        meta169_argv("--config", str(config), "serve"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        address = None
        deadline = time.monotonic() + 15
        while address is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
            lines.append(line)
            match = LISTENING.search(line)
            if match:
                address = (match.group(1), int(match.group(2)))
        assert address is not None, "".join(lines)
        status, _, body = get(address, "/openstack/latest/meta_data.json", source="127.0.0.5")
        assert status == 200, body
        assert b'"name": "alpha"' in body
    finally:
        stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def test_config_normal_start_imports_no_other_subcommand(tmp_path: Path) -> None:
    # The proxy runs in 1000 namespaces' worth of memory budget: resolving its section
    # must not import the other commands (doctor, lab, identity and cryptography).
    config = _write(tmp_path / "meta169.toml", '[proxy]\nupstream = "unix:/run/meta169/serve.sock"\n')
    code = (
        "import sys\n"
        "from meta169.cli import main\n"
        f"main(['--config', {str(config)!r}, 'proxy', '--help'], standalone_mode=False)\n"
        "heavy = ('meta169.doctor', 'meta169.lab', 'meta169.identity', 'meta169.config.cli', 'cryptography')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography' or m.startswith(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_config_sync_section_shows_and_checks_like_the_others(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "meta169.toml",
        '[metrics]\nmetrics-listen = "127.0.0.1:9172"\n\n'
        '[sync]\nuri = "qemu:///session"\ncloud = "prod"\nwatch = true\ninterval = 60\nadopt = ["inventory"]\n',
    )
    result = _run("--config", str(config), "config", "show", "--command", "sync", env={"META169_SYNC_INTERVAL": "90"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f'uri = "qemu:///session"  # {config}:5' in lines
    assert f'cloud = "prod"  # {config}:6' in lines
    assert f"watch = true  # {config}:7" in lines
    assert "interval = 90.0  # env META169_SYNC_INTERVAL" in lines
    assert f'adopt = ["inventory"]  # {config}:9' in lines
    assert f'metrics-listen = "127.0.0.1:9172"  # {config}:2 [metrics]' in lines
    assert "poll-interval = 1.0  # default" in lines
    assert not [line for line in lines if "dry-run" in line]
    assert tomllib.loads(result.stdout)["sync"]["interval"] == 90.0
    assert _run("config", "check", str(config)).stdout == f"{config}: ok\n"

    bad = _write(tmp_path / "bad.toml", "[sync]\ndry-run = true\ninterval = 1\n")
    result = _run("config", "check", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "meta169: error: 2 problems in the configuration:",
        f"  {bad}:2: [sync] dry-run: not a setting: only the flag --dry-run sets it, on the command line; "
        "a dry run writes nothing, and a service left in it would look healthy while the registry goes stale",
        f"  {bad}:3: [sync] interval: 1.0 is not in the range 5<=x<=3600.",
    ]
