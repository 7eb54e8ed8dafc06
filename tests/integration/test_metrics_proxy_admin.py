"""The proxy's and the admin API's metrics over real loopback sockets: a dead upstream
moves the 502 counter, admin writes are counted by kind and status."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meta169.admin.api import start_admin
from meta169.http import wire
from meta169.http.listen import Binding, ListenAddress
from meta169.metrics.endpoint import Exporter, OpsServer, start_ops
from meta169.metrics.instruments import AdminMetrics, ProxyMetrics
from meta169.model import Network, Subnet, parse_ip, parse_network
from meta169.proxy.server import ProxyListener, ProxyServer
from meta169.proxy.upstream import Upstream, UpstreamSpec
from meta169.registry.memory import MemoryRegistry
from tests.integration.serving import get
from tests.processes import free_port
from tests.scrape import scrape, value

T = TypeVar("T")
TOKEN = b"admin-token-0123456789abcdef"


class Loop:
    """An event loop in a thread, for servers the test talks to with blocking clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        running.stop()


def test_metrics_proxy_counts_upstream_errors_of_a_dead_upstream(loop: Loop, tmp_path: Path) -> None:
    metrics = ProxyMetrics()
    dead = UpstreamSpec(unix_path=tmp_path / "nobody.sock", connect_timeout=0.5)
    server = ProxyServer(Upstream(dead, metrics=metrics), metrics=metrics)
    listener = ProxyListener(Binding("network", "net-a"), parse_ip("127.0.0.1"), free_port())
    assert loop.run(server.reconcile([listener])) == []
    ops: OpsServer = loop.run(start_ops(ListenAddress("127.0.0.1", 0), Exporter("proxy", metrics)))
    try:
        addr = ("127.0.0.1", listener.port)
        assert get(addr, "/latest/meta-data/")[0] == 502  # a simple GET: stamped by the compiled path
        assert (
            get(addr, "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "5"})[0]
            == 502
        )
        samples = scrape(ops.address.port)
    finally:
        loop.run(ops.close())
        loop.run(server.close())
    assert value(samples, "meta169_proxy_upstream_errors_total", code="502") == 2
    assert value(samples, "meta169_proxy_upstream_errors_total", code="504") == 0
    assert value(samples, "meta169_proxy_connections_total") == 2
    assert value(samples, "meta169_proxy_requests_total", path="fast") == (1 if wire.compiled() else 0)
    assert value(samples, "meta169_proxy_requests_total", path="python") == (1 if wire.compiled() else 2)
    assert value(samples, "meta169_proxy_listeners_open", netns="") == 1
    assert value(samples, "meta169_proxy_listeners_expected", netns="") == 1
    assert value(samples, "meta169_proxy_upstream_duration_seconds_count") == 0  # no reply ever came
    assert value(samples, "meta169_info", role="proxy", version=_version(samples)) == 1


def test_metrics_admin_counts_network_and_router_writes(loop: Loop) -> None:
    """PUT and DELETE of /v1/networks/ID and /v1/routers/ID count as the instance ones do;
    a network still in use is a 409, counted too."""
    registry = MemoryRegistry()
    metrics = AdminMetrics()
    server, app, ticker = loop.run(start_admin(registry, TOKEN, ("127.0.0.1", 0), metrics=metrics))
    ops: OpsServer = loop.run(start_ops(ListenAddress("127.0.0.1", 0), Exporter("admin", metrics)))
    addr = ("127.0.0.1", server.sockets[0].getsockname()[1])
    auth = {"Authorization": f"Bearer {TOKEN.decode()}"}
    network = json.dumps({"subnets": [{"cidr": "10.0.0.0/24"}]}).encode()
    router = json.dumps({"networks": ["net-a"]}).encode()
    try:
        assert get(addr, "/v1/networks/net-a", method="PUT", headers=auth, body=network)[0] == 201
        assert get(addr, "/v1/networks/net-a", method="PUT", headers=auth, body=network)[0] == 200
        assert get(addr, "/v1/routers/r1", method="PUT", headers=auth, body=router)[0] == 201
        assert get(addr, "/v1/networks/net-a", headers=auth)[0] == 200  # a read: not counted
        assert get(addr, "/v1/networks/net-a", method="DELETE", headers=auth)[0] == 409
        assert get(addr, "/v1/routers/r1", method="DELETE", headers=auth)[0] == 204
        assert get(addr, "/v1/networks/net-a", method="DELETE", headers=auth)[0] == 204
        samples = scrape(ops.address.port)
    finally:
        loop.run(ops.close())
        server.close()
        ticker.close()
        app.close()
    writes = {
        (dict(labels)["kind"], dict(labels)["code"]): v
        for (name, labels), v in samples.items()
        if name == "meta169_admin_writes_total"
    }
    assert writes == {("put", "201"): 2, ("put", "200"): 1, ("delete", "409"): 1, ("delete", "204"): 2}


def _version(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> str:
    return next(dict(labels)["version"] for name, labels in samples if name == "meta169_info")


def test_metrics_admin_counts_writes_by_kind_and_status(loop: Loop) -> None:
    registry = MemoryRegistry()
    registry.put_network(Network(id="net-a", subnets=(Subnet(cidr=parse_network("10.0.0.0/24")),)))
    metrics = AdminMetrics()
    server, app, ticker = loop.run(start_admin(registry, TOKEN, ("127.0.0.1", 0), metrics=metrics))
    ops: OpsServer = loop.run(start_ops(ListenAddress("127.0.0.1", 0), Exporter("admin", metrics)))
    addr = ("127.0.0.1", server.sockets[0].getsockname()[1])
    auth = {"Authorization": f"Bearer {TOKEN.decode()}"}
    uuid = "51515151-5151-4151-8151-515151515151"
    body = json.dumps(
        {"name": "api-1", "ports": [{"network": "net-a", "mac": "fa:16:3e:00:00:51", "ips": ["10.0.0.51"]}]}
    )
    try:
        assert get(addr, f"/v1/instances/{uuid}", method="PUT", headers=auth, body=body.encode())[0] == 201
        assert get(addr, f"/v1/instances/{uuid}", method="PUT", headers=auth, body=body.encode())[0] == 200
        assert get(addr, f"/v1/instances/{uuid}", method="PUT", headers=auth, body=b"{")[0] == 400
        assert get(addr, "/v1/instances", headers=auth)[0] == 200  # a read: not counted
        assert get(addr, f"/v1/instances/{uuid}", method="DELETE", headers=auth)[0] == 204
        assert get(addr, "/v1/import", method="POST", headers=auth, body=b"networks: []\n")[0] == 200
        samples = scrape(ops.address.port)
    finally:
        loop.run(ops.close())
        server.close()
        ticker.close()
        app.close()
    writes = {
        (dict(labels)["kind"], dict(labels)["code"]): v
        for (name, labels), v in samples.items()
        if name == "meta169_admin_writes_total"
    }
    assert writes == {
        ("put", "201"): 1,
        ("put", "200"): 1,
        ("put", "400"): 1,
        ("delete", "204"): 1,
        ("import", "200"): 1,
    }
