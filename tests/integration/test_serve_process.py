"""``meta169 serve`` as a real process over real sockets and a real SQLite registry."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serving import ServeProcess, get, imported_registry, run_cli, start_serve

TWO_TENANTS = """
networks:
  - id: net-a
    project_id: proj-a
    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254, dhcp: true, dns: [127.0.0.53]}]
  - id: net-b
    project_id: proj-b
    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254, dhcp: false}]
instances:
  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    project_id: proj-a
    keys: [{name: ops, type: ssh, data: "ssh-ed25519 AAAAalpha ops@a"}]
    user_data: "#cloud-config\\nhostname: alpha\\n"
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [127.0.0.5]}]
  - uuid: 22222222-2222-4222-8222-222222222222
    name: beta
    project_id: proj-b
    ports: [{network: net-b, mac: "fa:16:3e:00:00:0b", ips: [127.0.0.5]}]
  - uuid: 33333333-3333-4333-8333-333333333333
    name: gamma
    project_id: proj-a
    ports: [{network: net-a, mac: "fa:16:3e:00:00:0c", ips: [127.0.0.6]}]
"""


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    url = imported_registry(tmp_path, TWO_TENANTS)
    return url


@pytest.fixture
def server(registry_url: str) -> Iterator[ServeProcess]:
    srv = start_serve(
        registry_url, ["127.0.0.1:0=network:net-a", "127.0.0.1:0=network:net-b"], "--poll-interval", "0.2"
    )
    try:
        yield srv
    finally:
        srv.stop()


def _uuid(address: tuple[str, int], source: str) -> str:
    status, _, body = get(address, "/openstack/latest/meta_data.json", source=source)
    assert status == 200, body
    return str(json.loads(body)["uuid"])


def test_serve_overlapping_ips_answer_per_network(server: ServeProcess) -> None:
    net_a, net_b = server.addresses
    assert _uuid(net_a, "127.0.0.5") == "11111111-1111-4111-8111-111111111111"
    assert _uuid(net_b, "127.0.0.5") == "22222222-2222-4222-8222-222222222222"
    assert _uuid(net_a, "127.0.0.6") == "33333333-3333-4333-8333-333333333333"


def test_serve_unknown_caller_is_404_and_logged(server: ServeProcess) -> None:
    net_b = server.addresses[1]
    status, _, _ = get(net_b, "/openstack/latest/meta_data.json", source="127.0.0.6")
    assert status == 404
    log = server.stop()
    assert "no instance for caller 127.0.0.6 on network net-b" in log


def test_serve_import_change_visible_within_a_second(server: ServeProcess, tmp_path: Path) -> None:
    net_a = server.addresses[0]
    status, _, body = get(net_a, "/latest/meta-data/hostname", source="127.0.0.5")
    assert (status, body) == (200, b"alpha")
    changed = tmp_path / "rename.yaml"
    changed.write_text(TWO_TENANTS.replace("name: alpha", "name: alpha\n    hostname: alpha-renamed"))
    run_cli(server.registry_url, "import", str(changed))
    t0 = time.monotonic()
    while True:
        status, _, body = get(net_a, "/latest/meta-data/hostname", source="127.0.0.5")
        if body == b"alpha-renamed":
            break
        assert time.monotonic() - t0 < 1.0, f"change not visible after {time.monotonic() - t0:.2f}s"
        time.sleep(0.05)


def test_serve_new_instance_takes_unknown_ip(server: ServeProcess, tmp_path: Path) -> None:
    net_b = server.addresses[1]
    assert get(net_b, "/latest/meta-data/instance-id", source="127.0.0.7")[0] == 404
    extra = tmp_path / "more.yaml"
    extra.write_text(
        TWO_TENANTS
        + """  - uuid: 44444444-4444-4444-8444-444444444444
    name: delta
    ports: [{network: net-b, mac: "fa:16:3e:00:00:0d", ips: [127.0.0.7]}]
"""
    )
    run_cli(server.registry_url, "import", str(extra))
    t0 = time.monotonic()
    while get(net_b, "/openstack/latest/meta_data.json", source="127.0.0.7")[0] != 200:
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.05)
    assert _uuid(net_b, "127.0.0.7") == "44444444-4444-4444-8444-444444444444"


def test_serve_removed_instance_stops_answering(server: ServeProcess) -> None:
    net_a = server.addresses[0]
    assert get(net_a, "/latest/meta-data/", source="127.0.0.6")[0] == 200
    run_cli(server.registry_url, "instance", "rm", "33333333-3333-4333-8333-333333333333")
    t0 = time.monotonic()
    while get(net_a, "/latest/meta-data/", source="127.0.0.6")[0] != 404:
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.05)


def test_serve_cli_bad_listen_is_usage_error(registry_url: str) -> None:
    result = run_cli(registry_url, "serve", "--listen", "nonsense", "--network", "net-a", check=False)
    assert result.returncode == 2
    assert "--listen 'nonsense'" in result.stderr


def test_serve_cli_port_in_use_names_address(server: ServeProcess, registry_url: str) -> None:
    host, port = server.addresses[0]
    result = run_cli(registry_url, "serve", "--listen", f"{host}:{port}", "--network", "net-a", check=False)
    assert result.returncode == 2
    assert f"cannot listen on {host}:{port}" in result.stderr


def test_serve_json_log_holds_only_json_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --log-format json (here from the environment, as a unit's Environment= sets
    it) even the "listening on" line a supervisor waits for is a JSON object."""
    monkeypatch.setenv("META169_LOG_FORMAT", "json")
    srv = start_serve(imported_registry(tmp_path, TWO_TENANTS), ["127.0.0.1:0=network:net-a"])
    try:
        assert _uuid(srv.addresses[0], "127.0.0.5") == "11111111-1111-4111-8111-111111111111"
    finally:
        log = srv.stop()
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    ready = [r for r in records if r["message"].startswith("meta169 serve: listening on 127.0.0.1:")]
    assert [(r["logger"], r["level"]) for r in ready] == [("meta169.lifecycle", "info")]
