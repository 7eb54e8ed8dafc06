"""``meta169 proxy --workers 2`` with its listener in a router namespace: each process
opens its own socket there (SO_REUSEPORT) and a guest behind the router's REDIRECT is
answered whichever process the kernel hands its connection to.

Everything happens in namespaces this test creates; none is linked to the host.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest

from meta169.plumbing import iptables
from meta169.plumbing import netns as nsmod
from tests.e2e.conftest import RoutedGuest
from tests.integration.serving import meta169_argv, run_cli
from tests.integration.test_serve_signals import Daemon
from tests.procfs import TCP_LISTEN, children, socket_inodes, tcp_inodes

pytestmark = pytest.mark.e2e

UUID = "11111111-1111-4111-8111-111111111111"
INVENTORY = f"""
networks:
  - id: net-a
    subnets: [{{cidr: 10.0.0.0/24, gateway: 10.0.0.1}}]
instances:
  - uuid: {UUID}
    name: alpha
    ports: [{{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [10.0.0.5]}}]
"""


def _listening(ns: str, port: int) -> set[int]:
    table = nsmod.call_in_netns(ns, lambda: Path("/proc/thread-self/net/tcp").read_text())
    return tcp_inodes(table, port, TCP_LISTEN)


def _ask(vm: str) -> tuple[int, bytes]:
    def go() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
        try:
            conn.request("GET", "/openstack/latest/meta_data.json")
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    return nsmod.call_in_netns(vm, go)


def test_proxy_workers_each_listen_in_the_router_namespace(routed_guest: RoutedGuest, tmp_path: Path) -> None:
    router, vm = routed_guest.router, routed_guest.vm
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    registry = f"sqlite://{tmp_path / 'registry.db'}"
    run_cli(registry, "import", str(tmp_path / "inventory.yaml"))
    sock = tmp_path / "serve.sock"
    serve = Daemon.start(meta169_argv("-v", "--registry", registry, "serve", "--listen", f"unix:{sock}=proxy"))
    proxy: Daemon | None = None
    try:
        serve.wait_for("listening on")
        port = iptables.DEFAULT_PROXY_PORT
        proxy = Daemon.start(
            meta169_argv(
                "-v", "proxy", "--upstream", f"unix:{sock}", "--workers", "2",
                "--listen", f"{router}/0.0.0.0:{port}=network:net-a",
            )
        )  # fmt: skip
        proxy.wait_for("1 listeners up", timeout=20)
        processes = [proxy.proc.pid, *children(proxy.proc.pid)]
        assert len(processes) == 2, proxy.log
        listening = _listening(router, port)
        assert len(listening) == 2, f"two sockets on port {port} in {router}: {listening}"
        held = [socket_inodes(pid) & listening for pid in processes]
        assert all(len(h) == 1 for h in held), f"each process holds one of them: {held}"
        started = time.monotonic()
        for _ in range(30):
            status, body = _ask(vm)
            assert status == 200
            assert UUID.encode() in body
        assert time.monotonic() - started < 20
    finally:
        if proxy is not None:
            assert proxy.stop() == 0, proxy.log
        assert serve.stop() == 0, serve.log
    assert not _listening(router, iptables.DEFAULT_PROXY_PORT), "a listener outlived the proxy"
