"""``meta169 sync openstack``: the real openstacksdk and keystoneauth, end to end,
against a loopback server answering with the API references' own samples
(tests/fixtures/openstack/README.md says where each comes from).

The server answers keystone's token request with the token sample (its catalog
pointed at itself), version discovery with Nova's and Neutron's version samples, and
each list with its sample. It picks the servers sample by the microversion the SDK
asks for, as Nova would: the SDK negotiates the newest microversion both know, from
the maximum this server advertises. This has not run against a live cloud.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from meta169.cli import main
from meta169.errors import Conflict, SourceError
from meta169.model import Caller, Instance, parse_ip
from meta169.registry.memory import MemoryRegistry
from meta169.sources.openstack import sync_openstack

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "openstack"
PROJECT = "a6944d763bf64ee6a275f1263fae0352"  # the token sample's project
# Ids from the samples.
NET1, NET2 = "d32019d3-bc6e-4319-9c1d-6722fc136a22", "db193ab3-96e3-4cb3-8fc5-05f4296d0324"
SUBNET2 = "08eae331-0402-425a-923c-34f7cfe39c1b"
ROUTER1, ROUTER2 = "f8a44de0-fc8e-45df-93c7-f79bf3b01c95", "915a14a6-867b-4af7-83d1-70efceb146f9"
COMPUTE_PORT = "43c831e0-19ce-4a76-9a49-57b57e69428b"
# Nova's servers samples by the microversion they were made with.
SERVER_SAMPLES = {(2, 16): "servers_v2.16", (2, 52): "servers_v2.52", (2, 100): "servers_v2.100"}


def _sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor)


class FakeCloud:
    """The samples, linked to each other and to this server's address."""

    def __init__(self, max_microversion: str | None) -> None:
        self.max_microversion = max_microversion
        self.requests: list[tuple[str, str, str]] = []  # method, path?query, microversion
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def rewrite(self, document: Any) -> Any:
        # Every host the samples name is this server, under one prefix per service.
        text = json.dumps(document)
        for old, new in (
            ("http://example.com/identity", "/identity"),
            ("http://23.253.248.171:8774", "/compute"),
            ("http://openstack.example.com", "/compute"),
            ("http://23.253.228.211:9696", "/network"),
            ("http://23.253.248.171:9696", "/network"),
        ):
            text = text.replace(old, self.base + new)
        return json.loads(text)

    def servers(self, microversion: tuple[int, int]) -> dict[str, Any]:
        chosen = max(v for v in SERVER_SAMPLES if v <= microversion)
        document = copy.deepcopy(_sample(f"nova/{SERVER_SAMPLES[chosen]}_servers-details-resp.json"))
        server = document["servers"][0]
        # Link: the server was booted with the key pair of the key pair sample.
        server["key_name"] = _sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")["keypair"]["name"]
        return dict(document)

    def ports(self, server_id: str) -> dict[str, Any]:
        ports = copy.deepcopy(_sample("neutron/ports_ports-list-response.json")["ports"])
        # Link: the list's router interface is router1's, on net2's subnet (its IP,
        # 10.0.0.1, is already net2's gateway).
        interface = next(p for p in ports if p["device_owner"] == "network:router_interface")
        interface.update(device_id=ROUTER1, network_id=NET2)
        interface["fixed_ips"][0]["subnet_id"] = SUBNET2
        # Link: the one compute:nova port of the samples is the server's, on net2.
        port = copy.deepcopy(_sample("neutron/ports_port-update-response.json")["port"])
        port.update(device_id=server_id, network_id=NET2, fixed_ips=[{"ip_address": "10.0.0.5", "subnet_id": SUBNET2}])
        return {"ports": [*ports, port]}

    def subnets(self) -> dict[str, Any]:
        document = copy.deepcopy(_sample("neutron/subnets_subnets-list-response.json"))
        # Not from the API reference (no sample has host routes or IPv6): made here,
        # in the same fields, for net1.
        document["subnets"].append(
            {
                "id": "6e2b1f0c-1c2d-4c1e-9a7d-3d2a1b0c9f8e",
                "name": "made-for-this-test-v6",
                "network_id": NET1,
                "ip_version": 6,
                "cidr": "2001:db8:1::/64",
                "gateway_ip": "2001:db8:1::1",
                "enable_dhcp": True,
                "dns_nameservers": ["2001:db8::53"],
                "host_routes": [{"destination": "2001:db8:2::/64", "nexthop": "2001:db8:1::fe"}],
                "ipv6_address_mode": "dhcpv6-stateless",
                "ipv6_ra_mode": "dhcpv6-stateless",
                "allocation_pools": [],
            }
        )
        return dict(document)

    def answer(self, method: str, url: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(url)
        path, query = parts.path.rstrip("/"), parse_qs(parts.query)
        asked = headers.get("OpenStack-API-Version", "").removeprefix("compute ").strip()
        asked = asked or headers.get("X-OpenStack-Nova-API-Version", "")
        self.requests.append((method, url, asked))
        if path in ("/identity", "/identity/v3"):
            return (
                300 if path == "/identity" else 200,
                {},
                self.rewrite(_sample("keystone/identity-versions-response.json")),
            )
        if path == "/identity/v3/auth/tokens" and method == "POST":
            token = self.rewrite(_sample("keystone/auth-password-project-scoped-response.json"))
            # The sample's token expired in 2015; keystoneauth would ask again each call.
            token["token"]["expires_at"] = datetime(2099, 1, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")
            return 201, {"X-Subject-Token": "sample-token"}, token
        if headers.get("X-Auth-Token") != "sample-token":
            return 401, {}, {"error": {"code": 401, "message": "no token"}}
        if path == "/compute":
            return 300, {}, self.rewrite(_sample("nova/versions_versions-get-resp.json"))
        if path in ("/compute/v2.1", f"/compute/v2.1/{PROJECT}"):
            version = self.rewrite(_sample("nova/versions_v21-version-get-resp.json"))
            if self.max_microversion is not None:  # the test's knob: what this "Nova" supports
                version["version"]["version"] = self.max_microversion
            return 200, {}, version
        # Nova's URLs may carry a project id (the samples' links name another project).
        api = re.sub(r"^/compute/v2\.1(/[0-9a-f]{32})?", "", path)
        if api == "/servers/detail":
            if "marker" in query:  # the sample's "next" link: the second page is empty
                return 200, {}, {"servers": []}
            return 200, {}, self.rewrite(self.servers(_version(asked or "2.1")))
        if api == "/flavors/detail":
            return 200, {}, self.rewrite(_sample("nova/flavors_flavors-detail-resp.json"))
        if api.startswith("/os-keypairs/"):
            sample = _sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")
            if api.rpartition("/")[2] == sample["keypair"]["name"]:
                return 200, {}, sample
            return 404, {}, {"itemNotFound": {"code": 404, "message": "Keypair not found"}}
        if path == "/network":
            return 200, {}, self.rewrite(_sample("neutron/networks_versions-list-response.json"))
        lists = {
            "/network/v2.0/networks": lambda: _sample("neutron/networks_networks-list-response.json"),
            "/network/v2.0/subnets": self.subnets,
            "/network/v2.0/ports": lambda: self.ports(self.server_id),
            "/network/v2.0/routers": lambda: _sample("neutron/routers_routers-list-response.json"),
        }
        if path in lists:
            return 200, {}, lists[path]()
        return 404, {}, {"error": f"no sample for {method} {url}"}

    @property
    def server_id(self) -> str:
        chosen = max(v for v in SERVER_SAMPLES if v <= _version(self.max_microversion or "2.104"))
        return str(_sample(f"nova/{SERVER_SAMPLES[chosen]}_servers-details-resp.json")["servers"][0]["id"])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status, headers, document = cloud.answer(self.command, self.path, self.headers, self.rfile.read(length))
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler

    def clouds_yaml(self, folder: Path) -> Path:
        path = folder / "clouds.yaml"
        path.write_text(
            "clouds:\n"
            "  samples:\n"
            "    auth:\n"
            f"      auth_url: {self.base}/identity/v3\n"
            "      username: admin\n"
            "      password: secret\n"
            "      project_name: admin\n"
            "      user_domain_name: Default\n"
            "      project_domain_name: Default\n"
            "    region_name: RegionOne\n"
            "    identity_api_version: 3\n"
        )
        return path


@pytest.fixture
def cloud(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    fake = FakeCloud(getattr(request, "param", "2.52"))
    fake.thread.start()
    for name in [n for n in __import__("os").environ if n.startswith("OS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fake.clouds_yaml(tmp_path)))
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


SERVER_252 = "764e369e-a874-4401-b7ce-43e4760888da"


def test_sync_openstack_builds_networks_routers_and_servers_from_the_samples(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    result = sync_openstack(registry, "samples")
    assert result.source == "openstack:samples"
    # The SDK asked for the microversion this "Nova" advertised, for the servers.
    assert any(url.startswith(("/compute/v2.1/servers/detail", f"/compute/v2.1/{PROJECT}/servers/detail"))
               and asked == "2.52" for _m, url, asked in cloud.requests)  # fmt: skip
    assert any("os-keypairs" in url and "user_id=admin" in url for _m, url, _a in cloud.requests)

    net1, net2 = registry.get_network(NET1), registry.get_network(NET2)
    assert (net1.name, net1.project_id, net1.mtu, net1.source) == (
        "net1",
        "4fd44f30292945e481c7b8a0c8908869",
        1500,
        "openstack:samples",
    )
    v4, v6 = net1.subnets
    assert (str(v4.cidr), str(v4.gateway), v4.dhcp) == ("192.0.0.0/8", "192.0.0.1", True)
    assert (str(v6.cidr), v6.ipv6_mode, [str(d) for d in v6.dns]) == (
        "2001:db8:1::/64",
        "dhcpv6-stateless",
        ["2001:db8::53"],
    )
    assert [(str(r.destination), str(r.nexthop)) for r in v6.host_routes] == [("2001:db8:2::/64", "2001:db8:1::fe")]
    assert [str(s.cidr) for s in net2.subnets] == ["10.0.0.0/24"]
    assert registry.get_router(ROUTER1).network_ids == (NET2,)
    assert registry.get_router(ROUTER2).network_ids == ()

    server = registry.resolve(Caller(parse_ip("10.0.0.5"), router_id=ROUTER1))
    keypair = _sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")["keypair"]
    assert server.uuid == SERVER_252
    assert (server.name, server.hostname, server.project_id, server.availability_zone, server.region) == (
        "new-server-test",
        "new-server-test",
        "6f70656e737461636b20342065766572",
        "us-west",
        "RegionOne",
    )
    assert (server.instance_type, server.image_id) == ("m1.tiny", "70a599e0-31e7-49b7-b260-868f441e862b")
    assert server.metadata == {"My Server Name": "Apache1"}
    assert server.user_data == base64.b64decode("IyEvYmluL2Jhc2gKL2Jpbi9zdQplY2hvICJJIGFtIGluIHlvdSEiCg==")
    assert server.tags == {"tag1": "", "tag2": ""}
    assert server.security_groups == ("default",)
    assert [(k.name, k.type, k.data) for k in server.keys] == [(keypair["name"], "ssh", keypair["public_key"])]
    assert server.created_at == datetime(2017, 2, 14, 19, 24, 42, tzinfo=UTC)
    assert [(p.id, p.network_id, p.mac, [str(i) for i in p.ips]) for p in server.ports] == [
        (COMPUTE_PORT, NET2, "fa:16:3e:11:11:5e", ["10.0.0.5"])
    ]
    assert server.source == "openstack:samples"

    revision = registry.revision()
    assert sync_openstack(registry, "samples").plan.changes == ()
    assert registry.revision() == revision


@pytest.mark.parametrize("cloud", ["2.16"], indirect=True)
def test_sync_openstack_before_2_47_looks_the_flavor_up(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    assert any("/flavors/detail" in url for _m, url, _a in cloud.requests)
    (server,) = registry.list_instances()
    assert server.instance_type == "m1.tiny"  # flavor "1" in the flavor list
    assert server.tags == {}  # tags came with 2.26
    assert server.user_data is not None


@pytest.mark.parametrize("cloud", [None], indirect=True)
def test_sync_openstack_negotiates_the_sdk_maximum_and_takes_the_non_admin_view(cloud: FakeCloud) -> None:
    # Nova's version sample advertises 2.104; the SDK asks for its own maximum, and
    # the sample made with 2.100 is a view without OS-EXT-SRV-ATTR:user_data.
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    (server,) = registry.list_instances()
    assert server.user_data is None
    assert server.hostname == "new-server-test"
    assert server.instance_type == "m1.tiny"


def test_sync_openstack_refuses_a_server_another_source_owns(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    registry.delete_instance(SERVER_252)
    registry.put_instance(Instance(uuid=SERVER_252, name="by-hand", source="admin"))
    revision = registry.revision()
    with pytest.raises(
        Conflict, match=rf"instance {SERVER_252} \(new-server-test\) from openstack:samples .* from admin"
    ):
        sync_openstack(registry, "samples")
    assert registry.revision() == revision


def test_sync_openstack_cli_dry_run_and_sync(cloud: FakeCloud, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    runner = CliRunner()
    dry = runner.invoke(main, ["--registry", url, "sync", "openstack", "--cloud", "samples", "--dry-run"])
    assert dry.exit_code == 2, dry.output  # a dry run creates no registry file
    done = runner.invoke(main, ["--registry", url, "sync", "openstack", "--cloud", "samples"])
    assert done.exit_code == 0, done.output
    assert f"openstack:samples: add instance {SERVER_252} (new-server-test)" in done.output
    dry = runner.invoke(main, ["--registry", url, "sync", "openstack", "--cloud", "samples", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: 0 to add, 0 to change, 0 to remove" in dry.output


def test_sync_openstack_unreachable_cloud_is_a_source_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCloud("2.52")  # never started: its port refuses
    fake.server.server_close()
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fake.clouds_yaml(tmp_path)))
    with pytest.raises(SourceError, match="openstack:samples: cannot"):
        sync_openstack(MemoryRegistry(), "samples")
    result = CliRunner().invoke(main, ["--registry", "memory://", "sync", "openstack", "--cloud", "samples"])
    assert result.exit_code == 5, result.output
