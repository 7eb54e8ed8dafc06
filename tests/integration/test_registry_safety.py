"""No silent misconfiguration: a registry URL naming nothing is an error, never an
empty registry that answers every guest 404; created files are the owner's only;
servers refuse an empty registry unless told, and say when a listener names a
network the registry does not have."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from meta169.api.config import ServeConfig
from meta169.api.server import CHECK_EMPTY, CHECK_NETWORKS, CHECK_REGISTRY, start
from meta169.errors import ConfigError
from meta169.health import Health
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.model import Instance, Network, Port, parse_ip
from meta169.registry import open_registry
from meta169.registry.memory import MemoryRegistry
from tests.capabilities import require
from tests.integration.serving import meta169_argv, run_cli

NETWORKS_ONLY = "networks:\n  - id: net-a\n    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254}]\n"
ONE_INSTANCE = (
    NETWORKS_ONLY
    + "instances:\n  - uuid: 11111111-1111-4111-8111-111111111111\n    name: alpha\n"
    + '    ports: [{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [127.0.0.5]}]\n'
)


def _registry(tmp_path: Path, text: str) -> tuple[str, Path]:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(text)
    path = tmp_path / "registry.db"
    url = f"sqlite://{path}"
    run_cli(url, "import", str(inventory))
    return url, path


@pytest.mark.parametrize(
    "command",
    [
        ("serve", "--listen", "127.0.0.1:0", "--network", "net-a"),
        ("instance", "list"),
        ("export",),
        ("admin", "--listen", "127.0.0.1:0", "--token-file", "/nonexistent-token"),
    ],
)
def test_registry_safety_typo_directory_is_exit_2_and_creates_nothing(tmp_path: Path, command: tuple[str, ...]) -> None:
    typo = tmp_path / "typo"
    url = f"sqlite:///{typo / 'regsitry.db'}"
    if command[0] == "admin":
        token = tmp_path / "token"
        token.write_text("admin-token-0123456789abcdef\n")
        token.chmod(0o600)
        command = (*command[:-1], str(token))
    result = run_cli(url, *command, check=False)
    assert result.returncode == 2, result.stderr
    assert f"directory {typo} does not exist" in result.stderr
    assert not typo.exists()


def test_registry_safety_import_creates_no_directory_but_the_default(tmp_path: Path) -> None:
    (tmp_path / "inventory.yaml").write_text(ONE_INSTANCE)
    elsewhere = tmp_path / "elsewhere"
    result = run_cli(f"sqlite://{elsewhere / 'registry.db'}", "import", str(tmp_path / "inventory.yaml"), check=False)
    assert result.returncode == 2
    assert f"directory {elsewhere} does not exist" in result.stderr
    assert not elsewhere.exists()


@pytest.mark.parametrize(
    "command",
    [("instance", "list"), ("serve", "--listen", "127.0.0.1:0", "--network", "net-a"), ("import", "--dry-run")],
)
def test_registry_safety_missing_file_is_an_error_naming_it(tmp_path: Path, command: tuple[str, ...]) -> None:
    path = tmp_path / "registry.db"
    if command[0] == "import":
        (tmp_path / "inventory.yaml").write_text(ONE_INSTANCE)
        command = (*command, str(tmp_path / "inventory.yaml"))
    result = run_cli(f"sqlite://{path}", *command, check=False)
    assert result.returncode == 2, result.stderr
    assert f"registry {path} does not exist" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["inventory.yaml"] if command[0] == "import" else [])


def test_registry_safety_import_creates_the_file_mode_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)  # what most shells have: SQLite alone would make 0644
    try:
        _, path = _registry(tmp_path, ONE_INSTANCE)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = run_cli(f"sqlite://{path}", "instance", "list")
    assert "chmod" not in result.stderr


def test_registry_safety_open_makes_a_directory_0700_only_when_asked(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'data' / 'meta169' / 'registry.db'}"
    with pytest.raises(ConfigError, match="does not exist"):
        open_registry(url, create=True)
    old = os.umask(0o022)
    try:
        open_registry(url, create=True, create_directory=True).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data" / "meta169").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "meta169" / "registry.db").stat().st_mode) == 0o600


# Inside a private mount namespace, a tmpfs hides the host's /var/lib: root's
# default registry directory, /var/lib/meta169, is made there and nowhere else.
_DEFAULT_DIRECTORY_SCRIPT = """
set -e
mount -t tmpfs -o mode=0755 meta169-test /var/lib
"$1" -m meta169 instance list >/dev/null 2>&1 && echo "list-before=0" || echo "list-before=$?"
test -e /var/lib/meta169 && echo "directory-before=yes" || echo "directory-before=no"
"$1" -m meta169 import "$2" >/dev/null
stat -c 'mode %a %n' /var/lib/meta169 /var/lib/meta169/registry.db
"$1" -m meta169 instance list
"""


def test_registry_safety_import_creates_the_default_directory_0700(tmp_path: Path) -> None:
    require("root", os.geteuid() == 0, "a private mount namespace hides the host's /var/lib")
    unshare = shutil.which("unshare")
    require("unshare", unshare is not None, "util-linux unshare makes the mount namespace")
    assert unshare is not None
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(ONE_INSTANCE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("META169_")}
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", _DEFAULT_DIRECTORY_SCRIPT, "sh",
         meta169_argv()[0], str(inventory)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "list-before=2" in out
    assert "directory-before=no" in out
    assert "mode 700 /var/lib/meta169\n" in out
    assert "mode 600 /var/lib/meta169/registry.db\n" in out
    assert "alpha" in out


def test_registry_safety_open_registry_warns_with_the_chmod(tmp_path: Path) -> None:
    url, path = _registry(tmp_path, ONE_INSTANCE)
    path.chmod(0o644)
    tmp_path.chmod(0o777)
    try:
        result = run_cli(url, "instance", "list")
    finally:
        tmp_path.chmod(0o700)
    assert f"run chmod 600 {path}" in result.stderr
    assert f"run chmod 700 {tmp_path}" in result.stderr
    assert "alpha" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ("serve", "--listen", "127.0.0.1:0", "--network", "net-a"),
        ("proxy", "--upstream", "unix:/nonexistent.sock", "--from-registry"),
        ("admin", "--listen", "127.0.0.1:0", "--token-file", "TOKEN"),
    ],
)
def test_registry_safety_servers_refuse_an_empty_registry(tmp_path: Path, command: tuple[str, ...]) -> None:
    url, _ = _registry(tmp_path, NETWORKS_ONLY)
    token = tmp_path / "token"
    token.write_text("admin-token-0123456789abcdef\n")
    token.chmod(0o600)
    command = tuple(str(token) if part == "TOKEN" else part for part in command)
    result = run_cli(url, *command, check=False)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "holds no instances" in lines[0]
    assert "--allow-empty" in lines[0]


def _config(binding: Binding, **kw: object) -> ServeConfig:
    return ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress(host="127.0.0.1", port=0), binding),),
        poll_interval=0.05,
        **kw,  # type: ignore[arg-type]
    )


async def _until(condition: object, timeout: float = 3.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_registry_safety_empty_registry_fails_readiness_until_an_import(caplog: pytest.LogCaptureFixture) -> None:
    registry = MemoryRegistry()
    registry.put_network(Network("net-a"))
    health = Health()

    async def scenario() -> None:
        running = await start(_config(Binding("network", "net-a"), allow_empty=True), registry=registry, health=health)
        try:
            check = health.get(CHECK_EMPTY)
            assert check is not None and not check.ok
            assert "holds no instances" in check.detail
            assert not health.ready
            registry.put_instance(
                Instance(
                    "11111111-1111-4111-8111-111111111111",
                    "alpha",
                    ports=(Port("net-a", "fa:16:3e:00:00:0a", (parse_ip("127.0.0.5"),)),),
                )
            )
            await _until(lambda: health.ready)
        finally:
            await running.close()

    with caplog.at_level(logging.WARNING, logger="meta169"):
        asyncio.run(scenario())
    assert any("holds no instances" in r.getMessage() for r in caplog.records)
    assert health.get(CHECK_REGISTRY) is not None


def test_registry_safety_unknown_network_warns_and_fails_readiness(caplog: pytest.LogCaptureFixture) -> None:
    registry = MemoryRegistry()
    registry.put_network(Network("net-a"))
    registry.put_instance(
        Instance(
            "11111111-1111-4111-8111-111111111111",
            "alpha",
            ports=(Port("net-a", "fa:16:3e:00:00:0a", (parse_ip("127.0.0.5"),)),),
        )
    )
    health = Health()

    async def scenario() -> None:
        running = await start(_config(Binding("network", "net-typo")), registry=registry, health=health)
        try:
            check = health.get(CHECK_NETWORKS)
            assert check is not None and not check.ok
            assert "network net-typo" in check.detail
            empty = health.get(CHECK_EMPTY)
            assert empty is not None and empty.ok
            registry.put_network(Network("net-typo"))
            await _until(lambda: health.ready)
        finally:
            await running.close()

    with caplog.at_level(logging.WARNING, logger="meta169"):
        asyncio.run(scenario())
    assert any("network net-typo" in r.getMessage() and "not in the registry" in r.getMessage() for r in caplog.records)


def test_registry_safety_serve_allow_empty_starts_with_a_warning(tmp_path: Path) -> None:
    from tests.integration.serving import start_serve

    url, _ = _registry(tmp_path, NETWORKS_ONLY)
    server = start_serve(url, ["127.0.0.1:0=network:net-a"], "--allow-empty")
    log = server.stop()
    assert server.proc.returncode == 0, log
    assert "holds no instances" in log
