"""Start a real ``meta169 serve`` process on loopback for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meta169.api.config import ServeConfig
from meta169.api.server import RunningServer, start
from meta169.http.listen import Binding, ListenAddress
from meta169.model import parse_ip
from meta169.proxy.server import ProxyListener, ProxyServer
from meta169.proxy.upstream import Upstream
from meta169.registry import Registry
from tests.processes import free_port, stop

_READY = re.compile(r"listening on (\S+) \(([^)]*)\)")


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    addresses: list[tuple[str, int]]
    registry_url: str
    log_lines: list[str] = field(default_factory=list)

    def stop(self) -> str:
        stop(self.proc)
        assert self.proc.stderr is not None
        if self.proc.stderr.closed:
            return "\n".join(self.log_lines)
        rest = self.proc.stderr.read()
        self.proc.stderr.close()
        self.log_lines.extend(rest.splitlines())
        return "\n".join(self.log_lines)


def meta169_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meta169", *args]


def run_cli(registry_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        meta169_argv("--registry", registry_url, *args), capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"meta169 {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def start_serve(registry_url: str, listens: list[str], *extra: str, timeout: float = 15.0) -> ServeProcess:
    argv = meta169_argv("-v", "--registry", registry_url, "serve", *extra)
    for item in listens:
        argv += ["--listen", item]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    addresses: list[tuple[str, int]] = []
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while len(addresses) < len(listens):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait(5)
            rest = proc.stderr.read()
            proc.stderr.close()
            raise AssertionError("serve did not start:\n" + "\n".join(lines) + rest)
        line = proc.stderr.readline()
        if not line:
            continue
        lines.append(line.rstrip())
        match = _READY.search(line)
        if match:
            host, _, port = match.group(1).rpartition(":")
            addresses.append((host.strip("[]"), int(port) if port.isdigit() else 0))
    return ServeProcess(proc, addresses, registry_url, lines)


def get(
    address: tuple[str, int],
    path: str,
    *,
    source: str = "127.0.0.1",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(address[0], address[1], timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def imported_registry(directory: Path, inventory: str, *, name: str = "inv.yaml") -> str:
    """The URL of a SQLite registry in ``directory`` that ``meta169 import`` filled with
    ``inventory`` (written to ``directory / name``)."""
    (directory / name).write_text(inventory)
    url = f"sqlite:///{directory / 'registry.db'}"
    run_cli(url, "import", str(directory / name))
    return url


def one_instance_inventory(ip: str = "127.0.0.1") -> str:
    """The smallest useful inventory: network net-a (127.0.0.0/24) and instance alpha at ``ip``."""
    return f"""
networks:
  - id: net-a
    project_id: proj-a
    subnets: [{{cidr: 127.0.0.0/24, gateway: 127.0.0.254, dhcp: true}}]
instances:
  - uuid: 11111111-1111-4111-8111-111111111111
    name: alpha
    project_id: proj-a
    ports: [{{network: net-a, mac: "fa:16:3e:00:00:0a", ips: [{ip}]}}]
"""


def guests_inventory(guests: range, mac_prefix: str) -> str:
    """net-a on 127.0.0.0/24 and guest N at 127.0.0.N for each N of ``guests``."""
    return """
networks:
  - id: net-a
    subnets: [{cidr: 127.0.0.0/24, gateway: 127.0.0.254}]
instances:
""" + "".join(
        f"""  - uuid: 00000000-0000-4000-8000-{n:012d}
    name: vm-{n}
    ports: [{{network: net-a, mac: "{mac_prefix}:{n:02x}", ips: [127.0.0.{n}]}}]
"""
        for n in guests
    )


@contextlib.contextmanager
def in_process(config: ServeConfig, registry: Registry) -> Iterator[list[ListenAddress]]:
    """Run ``api.server.start`` on its own loop in a thread; yields bound addresses."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, RunningServer] = {}
    failure: list[BaseException] = []

    def runner() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            holder["srv"] = await start(config, registry=registry)

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    assert ready.wait(5)
    if failure:
        loop.close()
        raise failure[0]
    running = holder["srv"]
    try:
        yield running.addresses
    finally:
        asyncio.run_coroutine_threadsafe(running.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def proxy_in_process(upstream: Upstream, binding: Binding) -> Iterator[tuple[str, int]]:
    """Run a ``ProxyServer`` with one listener on 127.0.0.1 (a free port) on its own
    loop in a thread; yields the listener's address."""
    loop = asyncio.new_event_loop()
    proxy = ProxyServer(upstream)
    port = free_port()
    listener = ProxyListener(binding, parse_ip("127.0.0.1"), port)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxy.reconcile([listener]))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield ("127.0.0.1", port)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def metrics_after_first_poll(running: RunningServer) -> int:
    """The metrics port of an in-process serve, once its first registry poll is done:
    a lookup overlapping it is served but not cached (it would miss twice)."""
    from tests.scrape import scrape, value

    assert running.ops is not None
    metrics = running.ops.address.port
    deadline = time.monotonic() + 5
    while value(scrape(metrics), "meta169_serve_registry_polls_total", result="ok") < 2:
        assert time.monotonic() < deadline, "no registry poll"
        time.sleep(0.02)
    return metrics
