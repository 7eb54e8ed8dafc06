"""``meta169 proxy --workers 2`` as real processes in front of a real serve: each
worker holds every listener (SO_REUSEPORT) and takes part of the guests'
connections; one scrape and one READY=1 cover both; SIGTERM stops them all."""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serving import meta169_argv
from tests.integration.test_serve_signals import Daemon, notify, registry_url  # noqa: F401 (fixtures)
from tests.procfs import TCP_ESTABLISHED, children, socket_inodes, tcp_inodes
from tests.scrape import scrape, value

UUID_ALPHA = "11111111-1111-4111-8111-111111111111"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def serve_socket(tmp_path: Path, registry_url: str) -> Iterator[Path]:  # noqa: F811
    sock = tmp_path / "serve.sock"
    serve = Daemon.start(
        meta169_argv("-v", "--registry", registry_url, "serve", "--listen", f"unix:{sock}=proxy", "--rate-limit", "0")
    )
    try:
        serve.wait_for("listening on")
        yield sock
    finally:
        assert serve.stop() == 0, serve.log


def _proxy(sock: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    return Daemon.start(
        meta169_argv(
            "-v", "proxy", "--upstream", f"unix:{sock}", "--listen", f"127.0.0.1:{port}=network:net-a",
            "--workers", "2", *extra,
        ),
        env=env,
    )  # fmt: skip


def test_proxy_workers_each_take_guests_and_one_scrape_counts_both(serve_socket: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    proxy = _proxy(serve_socket, port, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    try:
        proxy.wait_for("1 listeners up")
        workers = children(proxy.proc.pid)
        assert len(workers) == 1, proxy.log
        # Connections held open: the kernel has put each in one process's accept
        # queue, and the process that took it holds its socket.
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(24)]
        try:
            deadline = time.monotonic() + 10
            while True:
                accepted = tcp_inodes(Path("/proc/net/tcp").read_text(), port, TCP_ESTABLISHED)
                owners = {pid: len(socket_inodes(pid) & accepted) for pid in (proxy.proc.pid, *workers)}
                if sum(owners.values()) == len(held) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert sum(owners.values()) == len(held), owners
            assert all(count > 0 for count in owners.values()), f"a process took no connection: {owners}"
        finally:
            for conn in held:
                conn.close()
        for _ in range(40):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.5", 0))
            try:
                conn.request("GET", "/openstack/latest/meta_data.json")
                reply = conn.getresponse()
                assert reply.status == 200
                assert UUID_ALPHA.encode() in reply.read()
            finally:
                conn.close()
        samples = scrape(metrics_port)
        assert value(samples, "meta169_metrics_processes") == 2
        assert value(samples, "meta169_proxy_connections_total") == len(held) + 40
        # Every process has the listener: the fewest open is 1, not the sum.
        assert value(samples, "meta169_proxy_listeners_open", netns="") == 1
        assert value(samples, "meta169_proxy_listeners_expected", netns="") == 1
        assert value(samples, "meta169_proxy_upstream_up", upstream=f"unix:{serve_socket}") == 1
        assert value(samples, "meta169_proxy_upstream_replies_total", upstream=f"unix:{serve_socket}") == 40
    finally:
        assert proxy.stop() == 0, proxy.log
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived the proxy"
    assert sum("draining connections" in line or "stopped after" in line for line in proxy.lines) >= 2, proxy.log


def test_proxy_workers_ready_once_every_worker_listens(
    serve_socket: Path,
    tmp_path: Path,
    notify: tuple[str, list[str]],  # noqa: F811
) -> None:
    path, heard = notify
    port = _free_port()
    proxy = _proxy(serve_socket, port, env={"NOTIFY_SOCKET": path})
    try:
        proxy.wait_for("1 listeners up")
        deadline = time.monotonic() + 10
        while not any("READY=1" in m for m in heard):
            assert time.monotonic() < deadline, heard
            time.sleep(0.02)
        ready = [m for m in heard if "READY=1" in m]
        assert len(ready) == 1, heard
        assert "in 2 processes" in ready[0], ready
        # Both processes listen by then: a connection to either is answered.
        for _ in range(16):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.5", 0))
            try:
                conn.request("GET", "/latest/meta-data/instance-id")
                assert conn.getresponse().status == 200
            finally:
                conn.close()
        mark = proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while sum("reloaded:" in line for line in proxy.lines[mark:]) < 2:
            assert time.monotonic() < deadline, proxy.log
            time.sleep(0.02)
    finally:
        assert proxy.stop() == 0, proxy.log
    assert any("STOPPING=1" in m for m in heard), heard


def test_proxy_workers_a_port_held_by_another_process_is_not_shared(serve_socket: Path) -> None:
    # SO_REUSEPORT shares a port only among sockets that all set it: a listener that
    # did not (a Neutron haproxy left behind, say) still makes the bind fail.
    port = _free_port()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(8)
        proxy = _proxy(serve_socket, port)
        try:
            proxy.wait_for(r"cannot bind|Address already in use|not listening", timeout=15)
        finally:
            proxy.stop()
