"""``meta169 doctor --host`` against a proxy's several upstreams: two real ``meta169 serve``
processes on Unix sockets, stopped one after the other.

One down while the other answers is the warning ``upstream-degraded`` naming the one down
(the proxy fails over: guests are still served); both down is ``server-unreachable`` for
each (guests get 502). Only Unix sockets in a temporary directory; nothing is sent
anywhere else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.serving import ServeProcess, imported_registry, run_cli, start_serve

INVENTORY = """
networks:
  - id: net-d
    subnets: [{cidr: 127.0.0.0/24}]
instances:
  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    ports: [{network: net-d, mac: "fa:16:3e:00:00:01", ips: [127.0.0.1]}]
"""


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return imported_registry(tmp_path_factory.mktemp("doctor-upstreams"), INVENTORY)


@pytest.fixture
def two_serves(registry_url: str, tmp_path: Path) -> Iterator[tuple[list[ServeProcess], str, str]]:
    """Two serve nodes, each with a proxy listener on a Unix socket of its own."""
    socks = [tmp_path / "serve-a.sock", tmp_path / "serve-b.sock"]
    started: list[ServeProcess] = []
    try:
        for sock in socks:
            started.append(start_serve(registry_url, [f"unix:{sock}=proxy"]))
        yield started, f"unix:{socks[0]}", f"unix:{socks[1]}"
    finally:
        for srv in started:
            srv.stop()


def host_doctor(registry_url: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(registry_url, "doctor", "--json", "--host", *args, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def findings(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f["id"], f["severity"]) for f in report["findings"]]


def server_hop(report: dict[str, Any]) -> str:
    return str(next(h["state"] for h in report["path"] if h["hop"] == "server"))


def test_doctor_host_upstreams_one_down_then_both(
    two_serves: tuple[list[ServeProcess], str, str], registry_url: str
) -> None:
    (serve_a, serve_b), a, b = two_serves
    both = ("--upstream", a, "--upstream", b)
    code, report = host_doctor(registry_url, *both)
    assert (code, findings(report), server_hop(report)) == (0, [], "ok")

    serve_b.stop()
    code, report = host_doctor(registry_url, *both)
    assert (code, findings(report), server_hop(report)) == (0, [("upstream-degraded", "warning")], "warning")
    (finding,) = report["findings"]
    assert finding["summary"].startswith(f"meta169 serve does not answer at {b}: the proxy fails over to {a}")
    assert any(b in fix["text"] for fix in finding["fix"]) and not any(a in fix["text"] for fix in finding["fix"])

    serve_a.stop()
    code, report = host_doctor(registry_url, *both)
    assert (code, report["broken_hop"]) == (1, "server")
    assert findings(report) == [("server-unreachable", "error"), ("server-unreachable", "error")]
    first, second = report["findings"]
    assert first["summary"].startswith(
        f"meta169 serve does not answer at {a}, nor at the proxy's other upstreams ({b})"
    )
    assert second["summary"].startswith(
        f"meta169 serve does not answer at {b}, nor at the proxy's other upstreams ({a})"
    )


def test_doctor_host_discovers_the_config_files_upstream_list(
    two_serves: tuple[list[ServeProcess], str, str], registry_url: str, tmp_path: Path
) -> None:
    # [proxy] upstream as a list, and a listener file naming a namespace absent here, so
    # that --only keeps this config's proxy and leaves out whatever else runs on the host.
    (_, serve_b), a, b = two_serves
    namespace = f"qrouter-m169t-{os.getpid()}-absent"
    listeners = tmp_path / "listeners.json"
    listeners.write_text(json.dumps({"listeners": [{"netns": namespace, "address": "0.0.0.0", "router": "r1"}]}))
    config = tmp_path / "meta169.toml"
    config.write_text(f'[proxy]\nupstream = ["{a}", "{b}"]\nlisteners = "{listeners}"\n')
    serve_b.stop()
    result = run_cli(registry_url, "--config", str(config), "doctor", "--json", "--host",
                     "--state-root", str(tmp_path), "--only", namespace, check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr  # the namespace is missing
    report = json.loads(result.stdout)
    assert findings(report) == [("netns-missing", "error"), ("upstream-degraded", "warning")]
    assert report["discovered"] == [
        f"config {config} [proxy]: namespaces {namespace}; listener file {listeners}; upstreams {a}, {b}"
    ]
    degraded = report["findings"][1]
    assert degraded["summary"].startswith(f"meta169 serve does not answer at {b}: the proxy fails over to {a}")
    assert f"upstreams of the proxy (config {config} [proxy]): {a}, {b}" in degraded["evidence"]
