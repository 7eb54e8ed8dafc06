"""A loopback OpenStack for the tests: Keystone, Nova and Neutron answering with the
API references' own samples (tests/fixtures/openstack/README.md says where each comes
from), for the real openstacksdk and keystoneauth to talk to end to end.

The server answers keystone's token request with the token sample (its catalog
pointed at itself), version discovery with Nova's and Neutron's version samples, and
each list with its sample. It picks the servers sample by the microversion the SDK
asks for, as Nova would: the SDK negotiates the newest microversion both know, from
the maximum this server advertises. This has not run against a live cloud.

Knobs a test turns while the SDK talks to it (:class:`FakeCloud` attributes):
``failing`` answers chosen paths with an error status, ``servers_gone`` lists no
server, ``fail_second_page`` fails the servers list after its first page (a read
that breaks partway), ``cell_down`` lists the server as Nova does when its cell does
not answer, ``stalled`` holds the replies to chosen paths (a service that accepted
the request and never answers) until ``release`` is set. ``requests`` records every
request.
"""

from __future__ import annotations

import contextlib
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

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "openstack"
PROJECT = "a6944d763bf64ee6a275f1263fae0352"  # the token sample's project
# Ids from the samples.
NET1, NET2 = "d32019d3-bc6e-4319-9c1d-6722fc136a22", "db193ab3-96e3-4cb3-8fc5-05f4296d0324"
SUBNET2 = "08eae331-0402-425a-923c-34f7cfe39c1b"
ROUTER1, ROUTER2 = "f8a44de0-fc8e-45df-93c7-f79bf3b01c95", "915a14a6-867b-4af7-83d1-70efceb146f9"
COMPUTE_PORT = "43c831e0-19ce-4a76-9a49-57b57e69428b"
# Nova's servers samples by the microversion they were made with.
SERVER_SAMPLES = {(2, 16): "servers_v2.16", (2, 52): "servers_v2.52", (2, 100): "servers_v2.100"}


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor)


class FakeCloud:
    """The samples, linked to each other and to this server's address."""

    def __init__(self, max_microversion: str | None) -> None:
        self.max_microversion = max_microversion
        self.requests: list[tuple[str, str, str]] = []  # method, path?query, microversion
        # The knobs (module docstring): path suffix -> status; and three states of Nova.
        self.failing: dict[str, int] = {}
        self.servers_gone = False
        self.fail_second_page = False
        self.cell_down = False
        self.stalled: set[str] = set()  # path suffixes
        self.release = threading.Event()
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
        if self.servers_gone:
            return {"servers": []}
        if self.cell_down:
            # Link: the server's cell stops answering; Nova lists it as the sample's
            # minimal construct (microversion 2.69 and later).
            document = copy.deepcopy(sample("nova/servers_v2.69_servers-details-resp.json"))
            text = json.dumps(document).replace(document["servers"][0]["id"], self.server_id)
            return dict(json.loads(text))
        chosen = max(v for v in SERVER_SAMPLES if v <= microversion)
        document = copy.deepcopy(sample(f"nova/{SERVER_SAMPLES[chosen]}_servers-details-resp.json"))
        server = document["servers"][0]
        # Link: the server was booted with the key pair of the key pair sample.
        server["key_name"] = sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")["keypair"]["name"]
        return dict(document)

    def ports(self, server_id: str) -> dict[str, Any]:
        ports = copy.deepcopy(sample("neutron/ports_ports-list-response.json")["ports"])
        # Link: the list's router interface is router1's, on net2's subnet (its IP,
        # 10.0.0.1, is already net2's gateway).
        interface = next(p for p in ports if p["device_owner"] == "network:router_interface")
        interface.update(device_id=ROUTER1, network_id=NET2)
        interface["fixed_ips"][0]["subnet_id"] = SUBNET2
        # Link: the one compute:nova port of the samples is the server's, on net2.
        port = copy.deepcopy(sample("neutron/ports_port-update-response.json")["port"])
        port.update(device_id=server_id, network_id=NET2, fixed_ips=[{"ip_address": "10.0.0.5", "subnet_id": SUBNET2}])
        return {"ports": [*ports, port]}

    def subnets(self) -> dict[str, Any]:
        document = copy.deepcopy(sample("neutron/subnets_subnets-list-response.json"))
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
                self.rewrite(sample("keystone/identity-versions-response.json")),
            )
        if path == "/identity/v3/auth/tokens" and method == "POST":
            token = self.rewrite(sample("keystone/auth-password-project-scoped-response.json"))
            # The sample's token expired in 2015; keystoneauth would ask again each call.
            token["token"]["expires_at"] = datetime(2099, 1, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")
            return 201, {"X-Subject-Token": "sample-token"}, token
        if headers.get("X-Auth-Token") != "sample-token":
            return 401, {}, {"error": {"code": 401, "message": "no token"}}
        if any(path.endswith(suffix) for suffix in self.stalled):
            # Bounded, so that a test that forgets to release leaves no thread behind.
            self.release.wait(30)
        for suffix, status in self.failing.items():
            if path.endswith(suffix):
                return status, {}, {"error": {"code": status, "message": f"made to fail: {suffix}"}}
        if path == "/compute":
            return 300, {}, self.rewrite(sample("nova/versions_versions-get-resp.json"))
        if path in ("/compute/v2.1", f"/compute/v2.1/{PROJECT}"):
            version = self.rewrite(sample("nova/versions_v21-version-get-resp.json"))
            if self.max_microversion is not None:  # the test's knob: what this "Nova" supports
                version["version"]["version"] = self.max_microversion
            return 200, {}, version
        # Nova's URLs may carry a project id (the samples' links name another project).
        api = re.sub(r"^/compute/v2\.1(/[0-9a-f]{32})?", "", path)
        if api == "/servers/detail":
            if "marker" in query:  # the sample's "next" link: the second page is empty
                if self.fail_second_page:
                    return 500, {}, {"computeFault": {"code": 500, "message": "made to fail: page 2"}}
                return 200, {}, {"servers": []}
            return 200, {}, self.rewrite(self.servers(_version(asked or "2.1")))
        if api == "/flavors/detail":
            return 200, {}, self.rewrite(sample("nova/flavors_flavors-detail-resp.json"))
        if api.startswith("/os-keypairs/"):
            keypair = sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")
            if api.rpartition("/")[2] == keypair["keypair"]["name"]:
                return 200, {}, keypair
            return 404, {}, {"itemNotFound": {"code": 404, "message": "Keypair not found"}}
        if path == "/network":
            return 200, {}, self.rewrite(sample("neutron/networks_versions-list-response.json"))
        lists = {
            "/network/v2.0/networks": lambda: sample("neutron/networks_networks-list-response.json"),
            "/network/v2.0/subnets": self.subnets,
            "/network/v2.0/ports": lambda: self.ports(self.server_id),
            "/network/v2.0/routers": lambda: sample("neutron/routers_routers-list-response.json"),
        }
        if path in lists:
            return 200, {}, lists[path]()
        return 404, {}, {"error": f"no sample for {method} {url}"}

    @property
    def server_id(self) -> str:
        chosen = max(v for v in SERVER_SAMPLES if v <= _version(self.max_microversion or "2.104"))
        return str(sample(f"nova/{SERVER_SAMPLES[chosen]}_servers-details-resp.json")["servers"][0]["id"])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status, headers, document = cloud.answer(self.command, self.path, self.headers, self.rfile.read(length))
                body = json.dumps(document).encode()
                # A stalled reply's client may have given up and gone.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
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


@contextlib.contextmanager
def running_cloud(folder: Path, max_microversion: str | None = "2.52") -> Iterator[FakeCloud]:
    """A started FakeCloud, its clouds.yaml (cloud ``samples``) written in ``folder``."""
    fake = FakeCloud(max_microversion)
    fake.clouds_yaml(folder)
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        fake.server.shutdown()
        fake.server.server_close()
