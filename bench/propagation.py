"""``propagation``: how long after a registry write every other serve node serves it.

Four serve nodes share one throw-away PostgreSQL (``bench/storm_pg.py``): two hear
of writes as they commit (LISTEN/NOTIFY, the default), two only poll (``serve
--no-registry-listen``, ``--poll-interval 0.5``): the anchor, in the same run, under
the same load. The benchmark process writes to the registry N times, the first half
of one kind, the second half of the other:

- **update**: an instance's user data changes (every node has it cached);
- **create**: a new instance appears, whose address each node was asked for just
  before the write (and answered 404, a negative entry it caches). A polling node
  reads it as a topology change and drops every site.

After each write returns (committed), one client thread per node asks its node, as
fast as it can, for the document the write changed (``/latest/user-data``, or
``/latest/meta-data/instance-id`` of the new instance) from the instance's own
address, 1 ms between requests, until the node serves the new value: that node's
propagation time. The next write follows after a random 10-500 ms (so writes fall
anywhere in the polling nodes' interval). Reported per mode and kind: p50, p99 and max, and writes not
served within 3 s. Target: p99 <= 100 ms with LISTEN on.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench import storm_pg
from bench.harness import (
    BenchError,
    Cleanup,
    Proc,
    Settings,
    free_port,
    machine_cpu,
    process_cpu,
    spawn,
    table,
    wait_for_port,
)
from bench.storm_load import percentile

TARGET_P99_MS = 100.0
DEFAULT_WRITES = 100
# A watcher's pause between two requests: the resolution of the measurement.
WATCH_GAP_S = 0.001
TIMEOUT_S = 3.0
NETWORK = "prop-net"
LISTEN, POLL = "LISTEN/NOTIFY (default)", "polling only (--no-registry-listen)"
UPDATE, CREATE = "update", "create"
BASE_UUID = "70000000-0000-4000-8000-000000000000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """propagation's own flags on ``bench.run``'s parser."""
    g = p.add_argument_group("propagation")
    g.add_argument("--writes", type=int, default=DEFAULT_WRITES, help=f"registry writes (default {DEFAULT_WRITES})")


@dataclass
class Node:
    mode: str
    port: int
    proc: Proc
    conns: dict[str, http.client.HTTPConnection] = field(default_factory=dict)

    def get(self, ip: str, path: str) -> tuple[int, bytes]:
        """GET from ``ip`` (the instance's own address) on a kept connection."""
        for attempt in (1, 2):
            conn = self.conns.get(ip)
            if conn is None:
                conn = self.conns[ip] = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=5, source_address=(ip, 0)
                )
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                del self.conns[ip]
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


@dataclass(frozen=True)
class Target:
    ip: str
    path: str
    want: bytes
    committed: float


class Watcher:
    """One thread per node: after each write, asks its node until the new value shows."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.times: list[float] = []
        self.late = 0
        self.error: str | None = None
        self._target: Target | None = None
        self._go = threading.Event()
        self.done = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, target: Target) -> None:
        self.done.clear()
        self._target = target
        self._go.set()

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            target = self._target
            if self._stop or target is None:
                return
            try:
                self._one(target)
            except (OSError, http.client.HTTPException, BenchError) as exc:
                self.error = f"{self.node.proc.name}: {exc}"
            self.done.set()

    def _one(self, target: Target) -> None:
        while True:
            status, body = self.node.get(target.ip, target.path)
            now = time.perf_counter()
            if status == 200 and body == target.want:
                self.times.append(now - target.committed)
                return
            if status not in (200, 404):
                raise BenchError(f"{status} {body[:80]!r} for {target.ip}{target.path}")
            if now - target.committed > TIMEOUT_S:
                self.late += 1
                return
            time.sleep(WATCH_GAP_S)

    def stop(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(5)


@dataclass
class Result:
    # mode -> kind -> propagation times in seconds; writes not served in time
    times: dict[str, dict[str, list[float]]]
    late: dict[str, int]
    writes: int
    write_ms: list[float]
    cpu: dict[str, float]
    other_load: float


def _instance(n: int, ip: str, user_data: bytes) -> Any:
    from meta169.model import Instance, Port, parse_ip

    uuid = BASE_UUID[:-12] + f"{n:012x}"
    mac = f"fa:16:3e:70:{n >> 8:02x}:{n & 0xFF:02x}"
    return Instance(
        uuid=uuid,
        name=f"prop-{n}",
        project_id="prop",
        user_data=user_data,
        ports=(Port(NETWORK, mac, (parse_ip(ip),)),),
    )


def _postmaster(url: str) -> int:
    host = parse_qs(urlsplit(url).query).get("host", [""])[0]
    return int((Path(host) / "data" / "postmaster.pid").read_text().split()[0])


def run(settings: Settings, cleanup: Cleanup, work: Path, opts: argparse.Namespace) -> Result:
    from meta169.model import Network, Subnet, parse_ip, parse_network
    from meta169.registry import open_registry

    writes = max(2, 20 if getattr(opts, "quick", False) else opts.writes)
    url = storm_pg.start(cleanup)
    registry = open_registry(url)
    cleanup.push("close the registry", registry.close)
    subnet = Subnet(cidr=parse_network("127.0.0.0/8"), gateway=parse_ip("127.0.0.254"))
    registry.put_network(Network(id=NETWORK, project_id="prop", subnets=(subnet,)))
    updated = _instance(0, "127.0.0.2", b"w0")
    registry.put_instance(updated)
    nodes: list[Node] = []
    for mode in (LISTEN, LISTEN, POLL, POLL):
        port = free_port()
        argv = [str(settings.meta169), "--registry", url, "serve", "--listen", f"127.0.0.1:{port}=network:{NETWORK}"]
        argv += ["--rate-limit", "0", "--poll-interval", "0.5"]
        if mode == POLL:
            argv.append("--no-registry-listen")
        label = f"serve {len(nodes) + 1} ({'listen' if mode == LISTEN else 'poll'})"
        proc = spawn(label, argv, cleanup=cleanup, log=work / f"serve{len(nodes) + 1}.log")
        wait_for_port(port, proc, timeout=30)
        nodes.append(Node(mode, port, proc))
    for node in nodes:
        cleanup.push("close client connections", node.close)
        status, body = node.get("127.0.0.2", "/latest/user-data")
        if (status, body) != (200, b"w0"):
            raise BenchError(f"{node.proc.name}: {status} {body[:80]!r} before any write")
    times: dict[str, dict[str, list[float]]] = {m: {UPDATE: [], CREATE: []} for m in (LISTEN, POLL)}
    late = {LISTEN: 0, POLL: 0}
    write_ms: list[float] = []
    watchers = [Watcher(node) for node in nodes]
    for watcher in watchers:
        cleanup.push("stop a watcher", watcher.stop)
    watched = {"serve (listen)": [n.proc.pid for n in nodes if n.mode == LISTEN]}
    watched["serve (poll)"] = [n.proc.pid for n in nodes if n.mode == POLL]
    watched["PostgreSQL"] = [_postmaster(url)]
    cpu0 = {k: process_cpu(v) for k, v in watched.items()}
    mine0 = time.process_time()
    machine0, wall0 = machine_cpu(), time.monotonic()
    rng = random.Random(169)
    for i in range(1, writes + 1):
        if i <= writes // 2:
            kind, ip, path = UPDATE, "127.0.0.2", "/latest/user-data"
            instance = _instance(0, "127.0.0.2", f"w{i}".encode())
            want = instance.user_data
        else:
            n = i
            kind, ip, path = CREATE, f"127.0.{1 + n // 250}.{1 + n % 250}", "/latest/meta-data/instance-id"
            instance = _instance(n, ip, b"")
            want = instance.uuid.encode()
            for node in nodes:  # asked before it exists: a cached 404
                status, _ = node.get(ip, path)
                if status != 404:
                    raise BenchError(f"{node.proc.name}: {status} for {ip} before its instance exists")
        t0 = time.perf_counter()
        registry.put_instance(instance)
        committed = time.perf_counter()
        write_ms.append((committed - t0) * 1000)
        assert want is not None
        for watcher in watchers:
            watcher.watch(Target(ip, path, want, committed))
        for watcher in watchers:
            if not watcher.done.wait(TIMEOUT_S + 10):
                raise BenchError(f"{watcher.node.proc.name}: its watcher hangs")
            if watcher.error is not None:
                raise BenchError(watcher.error)
            times[watcher.node.mode][kind].extend(watcher.times)
            late[watcher.node.mode] += watcher.late
            watcher.times.clear()
            watcher.late = 0
        time.sleep(rng.uniform(0.010, 0.500))
    wall = time.monotonic() - wall0
    cpu = {k: process_cpu(v) - cpu0[k] for k, v in watched.items()}
    cpu["this client and writer"] = time.process_time() - mine0
    ncpu = len(Path("/proc/stat").read_text().split("\ncpu")) - 1
    other = max(0.0, (machine_cpu() - machine0) - sum(cpu.values())) / (wall * max(1, ncpu))
    result = Result(times, late, writes, write_ms, cpu, other)
    report(result)
    return result


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(sorted(values), q) * 1000:.1f}" if values else "-"


def report(r: Result) -> None:
    rows = []
    for mode in (LISTEN, POLL):
        for kind in (UPDATE, CREATE, "both"):
            values = r.times[mode][UPDATE] + r.times[mode][CREATE] if kind == "both" else r.times[mode][kind]
            rows.append(
                (
                    mode,
                    kind,
                    len(values),
                    _ms(values, 50),
                    _ms(values, 99),
                    f"{max(values) * 1000:.1f}" if values else "-",
                    r.late[mode] if kind == "both" else "",
                )
            )
    print(f"\npropagation: {r.writes} writes, each watched on 2 nodes per mode ({r.other_load:.0%} other load)\n")
    print(table(("mode", "write", "served", "p50 ms", "p99 ms", "max ms", f"not served in {TIMEOUT_S:g} s"), rows))
    both = {m: r.times[m][UPDATE] + r.times[m][CREATE] for m in (LISTEN, POLL)}
    print(
        f"\nwrite (commit) time p50 {_ms([w / 1000 for w in r.write_ms], 50)} ms; CPU during the run: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in r.cpu.items())
    )
    if both[LISTEN] and both[POLL]:
        ratio = percentile(sorted(both[POLL]), 50) / max(percentile(sorted(both[LISTEN]), 50), 1e-9)
        print(f"p50 polling / p50 LISTEN: {ratio:.1f}x")
    p99 = percentile(sorted(both[LISTEN]), 99) * 1000 if both[LISTEN] else float("inf")
    met = p99 <= TARGET_P99_MS and r.late[LISTEN] == 0
    print(
        f"\ntarget: every other node serves a write within {TARGET_P99_MS:g} ms at p99 (LISTEN on): "
        f"{p99:.1f} ms, {r.late[LISTEN]} late: {'met' if met else 'NOT MET'}"
    )
    print(json.dumps({"listen_p99_ms": round(p99, 1), "met": met}))
