"""``meta169 query`` against a real ``meta169 serve`` on loopback: both trees, recursive crawls,
IMDSv2 (auto, required, off), IPv6 with a zone, and the documented exit codes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meta169.client import ClientConfig, Endpoint, HTTPTransport, IMDSv2Mode, MetadataClient, parse_url
from tests.integration.serving import ServeProcess, imported_registry, run_cli, start_serve
from tests.processes import free_port

ALPHA = "11111111-1111-4111-8111-111111111111"
STRICT = "22222222-2222-4222-8222-222222222222"
INVENTORY = f"""
networks:
  - id: net-q
    subnets: [{{cidr: 127.0.0.0/24}}]
  - id: net-v6
    subnets: [{{cidr: "::1/128"}}]
instances:
  - uuid: {ALPHA}
    name: alpha
    user_data: "#cloud-config\\nhostname: alpha\\n"
    keys: [{{name: alice, data: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@test"}}]
    ports:
      - {{network: net-q, mac: "fa:16:3e:00:00:01", ips: [127.0.0.1]}}
      - {{network: net-v6, mac: "fa:16:3e:00:00:02", ips: ["::1"]}}
  - uuid: {STRICT}
    name: strict
    metadata_options: {{http_tokens: required}}
    ports: [{{network: net-q, mac: "fa:16:3e:00:00:03", ips: [127.0.0.3]}}]
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str]]:
    tmp: Path = tmp_path_factory.mktemp("query")
    url = imported_registry(tmp, INVENTORY)
    srv = start_serve(url, ["127.0.0.1:0=network:net-q", "[::1]:0=network:net-v6"])
    try:
        yield srv, url
    finally:
        srv.stop()


def base(served: tuple[ServeProcess, str], index: int = 0) -> str:
    host, port = served[0].addresses[index]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def query(served: tuple[ServeProcess, str], *args: str, check: bool = False):  # type: ignore[no-untyped-def]
    return run_cli(served[1], "query", *args, check=check)


def test_query_leaf_prints_the_raw_value(served: tuple[ServeProcess, str]) -> None:
    result = query(served, "--url", base(served), "/latest/meta-data/instance-id")
    assert (result.returncode, result.stdout) == (0, ALPHA)


def test_query_recursive_ec2_crawl_lists_every_leaf(served: tuple[ServeProcess, str]) -> None:
    result = query(served, "--url", base(served), "-r", "/latest/meta-data/")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"/latest/meta-data/instance-id: {ALPHA}" in lines
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@test"
    assert f"/latest/meta-data/public-keys/0/openssh-key: {key}" in lines
    assert "/latest/meta-data/placement/availability-zone: nova" in lines


def test_query_recursive_openstack_json(served: tuple[ServeProcess, str]) -> None:
    result = query(served, "--url", base(served), "--json", "--recursive", "/openstack/latest")
    doc = json.loads(result.stdout)
    assert doc["url"].endswith("/openstack/latest/") and doc["imdsv2"] is True
    assert doc["data"]["meta_data.json"]["uuid"] == ALPHA
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@test"
    assert doc["data"]["meta_data.json"]["public_keys"] == {"alice": key}
    assert doc["data"]["user_data"] == "#cloud-config\nhostname: alpha\n"


def test_query_json_of_one_leaf(served: tuple[ServeProcess, str]) -> None:
    doc = json.loads(query(served, "--url", base(served), "--json", "/latest/meta-data/public-keys/").stdout)
    assert doc["data"] == "0=alice"


def test_query_ipv6_with_a_zone(served: tuple[ServeProcess, str]) -> None:
    host, port = served[0].addresses[1]
    assert host == "::1"
    result = query(served, "--url", f"http://[::1%lo]:{port}/", "/latest/meta-data/instance-id")
    assert (result.returncode, result.stdout) == (0, ALPHA), result.stderr


def test_query_not_found_exits_1(served: tuple[ServeProcess, str]) -> None:
    result = query(served, "--url", base(served), "/latest/meta-data/no-such-key")
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr


def test_query_refused_exits_4(served: tuple[ServeProcess, str]) -> None:
    result = query(served, "--url", f"http://127.0.0.1:{free_port()}", "--retries", "0", "/")
    assert result.returncode == 4
    assert "refused" in result.stderr.lower()


def test_query_bad_url_exits_2(served: tuple[ServeProcess, str]) -> None:
    assert query(served, "--url", "https://127.0.0.1:1", "/").returncode == 2


def test_query_imdsv2_required_instance(served: tuple[ServeProcess, str]) -> None:
    """An instance with http_tokens=required: auto and --imdsv2 work, --no-imdsv2 gets 401."""
    port = served[0].addresses[0][1]
    endpoint = parse_url(f"http://127.0.0.1:{port}")

    def connect(ep: Endpoint, timeout: float) -> socket.socket:
        # The strict instance is 127.0.0.3: bind that source address before connecting.
        sock = socket.socket()
        sock.settimeout(timeout)
        sock.bind(("127.0.0.3", 0))
        sock.connect(("127.0.0.1", port))
        return sock

    def client(mode: IMDSv2Mode) -> MetadataClient:
        return MetadataClient(endpoint, ClientConfig(imdsv2=mode), transport=HTTPTransport(endpoint, connect=connect))

    for mode in ("auto", "required"):
        strict = client(mode)
        assert strict.fetch("/latest/meta-data/instance-id") == STRICT.encode()
        assert strict.token_in_use
    assert client("off").get("/latest/meta-data/instance-id").status == 401


def test_query_no_imdsv2_on_an_optional_instance(served: tuple[ServeProcess, str]) -> None:
    result = query(served, "--url", base(served), "--no-imdsv2", "--json", "/latest/meta-data/instance-id")
    doc = json.loads(result.stdout)
    assert (doc["data"], doc["imdsv2"]) == (ALPHA, False)
