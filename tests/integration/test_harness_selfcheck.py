"""Self-check of the cloud-init harness against a tiny stub tree on 127.0.0.1.

The stub is not meta169: it is the smallest tree cloud-init 22.4.2 accepts, so
these tests pin what the harness reports (request order, token use, retries,
the network guard), not what meta169 serves.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.harness.ci_driver import destination_allowed, parse_networks
from tests.harness.cloudinit import run_datasource

pytestmark = pytest.mark.cloudinit

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHarnessSelfCheckKey harness@stub"
UUID = "0b5e3c1e-0000-4000-8000-000000000001"
MAC = "fa:16:3e:12:34:56"
TOKEN = "stub-token"


def stub_tree(*, missing_leaf: bool = False) -> dict[str, bytes]:
    tree: dict[str, str] = {
        "/openstack": "2018-08-27\nlatest",
        "/openstack/2018-08-27/meta_data.json": json.dumps(
            {
                "uuid": UUID,
                "hostname": "vm1.example",
                "name": "vm1",
                "availability_zone": "az1",
                "public_keys": {"k1": KEY},
            }
        ),
        "/openstack/2018-08-27/user_data": "#cloud-config\n",
        "/openstack/2018-08-27/network_data.json": json.dumps(
            {
                "links": [{"id": "tap1", "type": "ovs", "ethernet_mac_address": MAC}],
                "networks": [{"id": "n0", "type": "ipv4_dhcp", "link": "tap1"}],
                "services": [],
            }
        ),
    }
    for version in ("latest", "2009-04-04", "2021-03-23"):
        base = f"/{version}/meta-data/"
        tree[base] = "instance-id\nlocal-hostname\nplacement/\npublic-keys/"
        if missing_leaf:
            tree[base] += "\nmissing-leaf"
        tree[base + "instance-id"] = "i-0001"
        tree[base + "local-hostname"] = "vm1.example"
        tree[base + "placement/"] = "availability-zone"
        tree[base + "placement/availability-zone"] = "az1a"
        tree[base + "public-keys/"] = "0=k1"
        tree[base + "public-keys/0/openssh-key"] = KEY
        tree[f"/{version}/user-data"] = "#cloud-config\n"
        # cloud-init asks for the identity directory without its slash.
        tree[f"/{version}/dynamic/instance-identity"] = "document"
        tree[f"/{version}/dynamic/instance-identity/document"] = json.dumps(
            {"instanceId": "i-0001", "region": "r1", "availabilityZone": "az1a"}
        )
    return {path: body.encode() for path, body in tree.items()}


@dataclass
class Stub:
    url: str
    tree: dict[str, bytes]
    seen: list[tuple[str, str, bool]] = field(default_factory=list)


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"") -> None:
            stub.seen.append((self.command, self.path, bool(self.headers.get("X-aws-ec2-metadata-token"))))
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            body = stub.tree.get(self.path)
            self._reply(404) if body is None else self._reply(200, body)

        def do_PUT(self) -> None:
            if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                self._reply(200, TOKEN.encode())
            else:
                self._reply(400)

    return Handler


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[Stub]:
    missing_leaf = bool(getattr(request, "param", False))
    stub = Stub(url="", tree=stub_tree(missing_leaf=missing_leaf))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def paths(report: dict[str, Any], url: str) -> list[str]:
    return [f"{r['method']} {r['url'].removeprefix(url)}" for r in report["requests"]]


def test_harness_openstack_crawl_order_and_fields(stub: Stub) -> None:
    report = run_datasource("openstack", stub.url)
    assert report["ok"] is True
    assert report["cloudinit_version"] == "22.4.2"
    assert report["instance_id"] == UUID
    assert report["public_ssh_keys"] == [KEY]
    assert report["userdata_raw"] == "#cloud-config\n"
    assert report["network_config"]["config"][0]["mac_address"] == MAC
    assert report["network_config"]["config"][0]["name"] == "eth0"
    assert report["ec2_metadata"]["instance-id"] == "i-0001"
    assert report["ec2_crawl_address"] == stub.url
    assert report["retries"]["count"] == 0
    assert paths(report, stub.url) == [
        "GET /openstack",
        "GET /openstack",
        "GET /openstack/2018-08-27/meta_data.json",
        "GET /openstack/2018-08-27/user_data",
        "GET /openstack/2018-08-27/vendor_data.json",
        "GET /openstack/2018-08-27/vendor_data2.json",
        "GET /openstack/2018-08-27/network_data.json",
        "GET /latest/meta-data/",
        "GET /latest/meta-data/placement/",
        "GET /latest/meta-data/placement/availability-zone",
        "GET /latest/meta-data/public-keys/",
        "GET /latest/meta-data/public-keys/0/openssh-key",
        "GET /latest/meta-data/instance-id",
        "GET /latest/meta-data/local-hostname",
    ]
    # The driver's record and the server's log agree.
    assert [f"{m} {p}" for m, p, _ in stub.seen] == paths(report, stub.url)


def test_harness_ec2_imdsv1_sends_no_token(stub: Stub) -> None:
    report = run_datasource("ec2", stub.url)
    assert report["ok"] is True
    assert report["instance_id"] == "i-0001"
    assert report["ec2_api_version"] == "2021-03-23"
    assert paths(report, stub.url)[:3] == [
        "GET /2009-04-04/meta-data/instance-id",
        "GET /2021-03-23/meta-data/instance-id",
        "GET /2021-03-23/user-data",
    ]
    assert not any(r["token_sent"] or r["method"] == "PUT" for r in report["requests"])


def test_harness_ec2_imdsv2_takes_token_path(stub: Stub) -> None:
    report = run_datasource("ec2", stub.url, imdsv2=True)
    assert report["ok"] is True
    assert report["imds_token_obtained"] is True
    first, *rest = report["requests"]
    assert (first["method"], first["url"], first["token_ttl"]) == (
        "PUT",
        f"{stub.url}/latest/api/token",
        "21600",
    )
    assert rest and all(r["token_sent"] for r in rest)
    assert report["region"] == "r1"  # from the identity document, as on AWS
    assert all(token for _, _, token in stub.seen[1:])


@pytest.mark.parametrize("stub", [True], indirect=True)
def test_harness_counts_retries_of_missing_listed_leaf(stub: Stub) -> None:
    report = run_datasource("openstack", stub.url, retries=2)
    # One listed leaf that 404s: cloud-init retries it, then drops the EC2 dict.
    assert report["ok"] is True
    assert report["ec2_metadata"] == {}
    assert report["retries"]["count"] == 2
    assert report["retries"]["by_request"] == {f"GET {stub.url}/latest/meta-data/missing-leaf": 2}
    assert sum("Please wait" in line for line in report["retries"]["log_lines"]) == 2


def test_harness_failed_crawl_is_reported_with_check_false() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    report = run_datasource("openstack", closed, check=False)
    assert report["ok"] is False
    assert report["errors"]["get_data"] == "get_data() returned False"
    with pytest.raises(AssertionError, match="datasource failed"):
        run_datasource("openstack", closed)


def test_harness_guard_refuses_destination_outside_allow_list(stub: Stub) -> None:
    with pytest.raises(AssertionError, match="NETWORK GUARD refused a connection"):
        run_datasource("openstack", stub.url, allow_net=("127.0.0.2/32",))
    assert stub.seen == []


@pytest.mark.parametrize(
    ("host", "allowed", "expected"),
    [
        ("127.0.0.1", ("127.0.0.0/8", "::1"), True),
        ("::1", ("127.0.0.0/8", "::1"), True),
        ("::ffff:127.0.0.1", ("127.0.0.0/8",), True),
        ("169.254.169.254", ("127.0.0.0/8", "::1"), False),
        ("169.254.169.254", ("169.254.169.254/32",), True),
        ("169.254.169.253", ("169.254.169.254/32",), False),
        ("fe80::a9fe:a9fe%eth0", ("fe80::/10",), True),
        ("fd00:ec2::254", ("fe80::/10", "127.0.0.0/8"), False),
        ("10.0.0.1", ("127.0.0.0/8",), False),
        ("localhost", ("127.0.0.0/8",), False),  # names never pass: only literals
        ("", ("0.0.0.0/0",), False),
    ],
)
def test_harness_destination_allowed_table(host: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert destination_allowed(host, parse_networks(allowed)) is expected
