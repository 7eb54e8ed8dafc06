"""vendor_data2.json with a real dynamic target on loopback, a dead one and a slow one."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meta169.api.config import ServeConfig
from meta169.api.vendordata import DynamicTarget
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.model import Instance, Network, Port, Subnet, parse_ip, parse_network
from meta169.registry.memory import MemoryRegistry
from tests.integration.serving import get, in_process

UUID = "8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10"
SEEN: list[dict[str, object]] = []


class Target(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SEEN.append(body)
        if self.path == "/slow":
            time.sleep(3)
        reply = json.dumps({"greeting": f"hello {body['hostname']}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the slow target writes after serve gave up on it: expected


@pytest.fixture
def target() -> Iterator[int]:
    server = QuietServer(("127.0.0.1", 0), Target)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_vendordata_dynamic_served_in_vendor_data2(target: int) -> None:
    reg = MemoryRegistry()
    reg.put_network(Network(id="lo", subnets=(Subnet(cidr=parse_network("127.0.0.0/24")),)))
    reg.put_instance(
        Instance(
            uuid=UUID,
            name="web-1",
            project_id="p",
            ports=(Port(network_id="lo", mac="fa:16:3e:00:00:01", ips=(parse_ip("127.0.0.1"),)),),
        )
    )
    config = ServeConfig(
        registry_url="memory://",
        listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "lo")),),
        static_vendor_data={"cloud-init": "#cloud-config\n"},
        vendordata_targets=(
            DynamicTarget.parse(f"hello=http://127.0.0.1:{target}/hello"),
            DynamicTarget.parse("dead=http://127.0.0.1:1/nothing"),
            DynamicTarget.parse(f"slow=http://127.0.0.1:{target}/slow"),
        ),
        vendordata_timeout=0.5,
    )
    with in_process(config, reg) as addresses:
        addr = (addresses[0].host, addresses[0].port)
        t0 = time.monotonic()
        status, _, body = get(addr, "/openstack/latest/vendor_data2.json")
        assert time.monotonic() - t0 < 3.0  # the slow target was cut off at its timeout
        assert status == 200
        doc = json.loads(body)
        assert doc["static"] == {"cloud-init": "#cloud-config\n"}
        assert doc["hello"] == {"greeting": "hello web-1"}
        assert "dead" not in doc and "slow" not in doc
        assert SEEN[0]["instance-id"] == UUID
