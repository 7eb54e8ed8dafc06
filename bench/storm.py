"""``boot-storm``: N guests boot at once and each crawls the metadata service as
cloud-init 22.4.2 does; how long until the last one has its data, and does any fail.

Topology (``bench/storm_net.py``): R router namespaces, each with its guests' veths on
a bridge and the router-mode REDIRECT of 169.254.169.254:80 to port 9697; every guest
in its own namespace. Behind port 9697, in the same run, one after the other on the
same namespaces and registry, each with freshly started serve nodes (cold caches, as
for instances that were just created):

- **Neutron**: one haproxy per router namespace, configured as Neutron does
  (``bench/servers.py haproxy_config``), to serve node 1's Unix socket;
- **meta169**: ONE ``meta169 proxy`` with a listener in every router namespace, to
  the K serve nodes (all of them when ``--upstream`` is repeatable, else node 1);
- **meta169, one node killed** (``--kill-one``): K=2, and serve node 1 is SIGKILLed
  (by PID) when half of the guests have crawled successfully.

After each path's first storm a second one runs through the same processes (unless
``--no-reboot``): every guest boots again with serve's caches warm, as after a host's
restart.

Each serve node: ``meta169 serve --listen unix:SOCK=proxy`` on one registry (SQLite
by default, a throw-away PostgreSQL with ``--registry postgres``), with one shared
``--token-key-file`` so an IMDSv2 token from one node is good on another, and the
default per-instance rate limit (a crawl is within its burst; every guest is its own
instance).

The guests (``bench/storm_load.py``, one process) replay
``bench/cloudinit_sequences.json``: half OpenStack, half EC2 with IMDSv2 by default
(``--datasources``). A guest fails when, after cloud-init's own retries, any
request's status is not the recorded one (all are 200), a reply names another
instance, or a request times out. Measured per path: time until the last guest
finished, crawl-time percentiles, request-latency p99, failed guests, CPU per crawl
of every process from /proc (the load generator's and the kernel's ksoftirqd threads'
too), RSS and peak RSS of every process, conntrack entries per router and TCP
retransmission and listen-drop counters. ``--cloudinit N`` runs cloud-init's real code
in N guests instead (``bench/storm_cloudinit.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import netns, sequences, storm_net
from bench.harness import (
    BenchError,
    Cleanup,
    Proc,
    Settings,
    families,
    machine_cpu,
    memory,
    meta169_registry,
    process_cpu,
    spawn,
    table,
)
from bench.servers import haproxy_config, start_haproxies
from bench.storm_load import percentile
from bench.storm_net import Topology
from meta169.plumbing import iptables

NEUTRON, MINE, KILLED = "Neutron (haproxy per router)", "meta169 proxy", "meta169 proxy, node 1 killed"
TARGET_GUESTS = 1000
TARGET_P99_S = 1.0
TARGET_P99_KILLED_S = 2.0
TARGET_VS_NEUTRON = 0.5
DEFAULT_KINDS = ("openstack", "ec2-imdsv2")
# The second storm through the same running processes: every guest boots again, as
# after a host's restart, and serve has every site cached already.
REBOOT = ", reboot (warm)"
# Softirq work the storm's packets cause is charged to whichever process is running,
# or, under load, to the kernel's ksoftirqd threads; those are shown apart so that
# "other load" counts only what other people's processes did.
KERNEL = "kernel ksoftirqd"
STORM_DEADLINE_S = 120.0


@dataclass(frozen=True)
class StormOptions:
    guests: int = 1000
    routers: int = 10
    serve_nodes: int = 1
    kill_one: bool = False
    kinds: tuple[str, ...] = DEFAULT_KINDS
    registry: str = "sqlite"
    workers: int = 1
    proxy_workers: int = 1
    paths: tuple[str, ...] = ("neutron", "meta169")
    cloudinit: int = 0
    reboot: bool = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """boot-storm's own flags on ``bench.run``'s parser."""
    g = p.add_argument_group("boot-storm")
    g.add_argument("--guests", type=int, help="guests booting at once (default 1000; 50 with --quick)")
    g.add_argument("--routers", type=int, default=10, help="router namespaces the guests are spread over (10)")
    g.add_argument("--serve-nodes", type=int, default=1, help="serve processes behind the hop (K, default 1)")
    g.add_argument("--serve-workers", type=int, default=1, help="--workers of each serve node (default 1)")
    g.add_argument("--proxy-workers", type=int, default=1, help="--workers of meta169 proxy (default 1)")
    g.add_argument(
        "--kill-one",
        action="store_true",
        help="K=2 serve nodes behind meta169 proxy; SIGKILL node 1 when half the guests are done "
        "(only this storm unless --paths is given too)",
    )
    g.add_argument(
        "--paths",
        help="comma-separated storms to run: neutron, meta169 (default both; none with --kill-one)",
    )
    g.add_argument(
        "--datasources",
        default=",".join(DEFAULT_KINDS),
        help=f"guest i runs the i-th of these, round robin ({', '.join(sequences.KINDS)}; "
        f"default {','.join(DEFAULT_KINDS)})",
    )
    g.add_argument("--registry", choices=("sqlite", "postgres"), default="sqlite", help="registry backend")
    g.add_argument(
        "--no-reboot",
        action="store_true",
        help="skip the second storm through each path's running processes (warm caches)",
    )
    g.add_argument(
        "--cloudinit",
        type=int,
        default=0,
        metavar="N",
        help="instead of the replay: run cloud-init's real datasource code in N guests at once and "
        "compare their request logs with the recording",
    )


def options(args: argparse.Namespace) -> StormOptions:
    guests = args.guests or (50 if args.quick else TARGET_GUESTS)
    if args.cloudinit:
        guests = args.cloudinit
    paths = tuple(p for p in (args.paths or "").split(",") if p) or (() if args.kill_one else ("neutron", "meta169"))
    if bad := [p for p in paths if p not in ("neutron", "meta169")]:
        raise BenchError(f"unknown --paths {bad}: neutron, meta169")
    return StormOptions(
        guests=guests,
        routers=min(args.routers, guests),
        serve_nodes=max(1, args.serve_nodes),
        kill_one=args.kill_one,
        kinds=tuple(k for k in args.datasources.split(",") if k),
        registry=args.registry,
        workers=max(1, args.serve_workers),
        proxy_workers=max(1, args.proxy_workers),
        paths=paths,
        cloudinit=args.cloudinit,
        reboot=not args.no_reboot,
    )


@dataclass
class Measured:
    """One storm through one path."""

    path: str
    guests: int
    serve_nodes: int
    upstreams: int
    wall: float = 0.0
    last_done: float = 0.0
    crawl: list[float] = field(default_factory=list)
    requests: list[float] = field(default_factory=list)
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per crawl
    rss: dict[str, tuple[float, float]] = field(default_factory=dict)  # MB now, MB peak
    other_load: float = 0.0
    conntrack_max: int = 0
    killed_at: float | None = None
    extra_sockets: int = 0
    prepare: float = 0.0
    # The generator's own split: its system time includes the kernel's work of sending
    # into the veths (the bridge, the router's conntrack and REDIRECT run in the
    # sender's softirq context), which a real guest's host would pay too.
    generator_user_ms: float = 0.0
    generator_system_ms: float = 0.0
    # Summed over the routers' and the guests' namespaces (bench/storm_load.py COUNTERS).
    tcp: dict[str, dict[str, int]] = field(default_factory=dict)
    # Requests that took a second or more: a SYN retransmission (the first is after 1 s)
    # or a retry's sleep, never plain queueing at these rates.
    slow_requests: int = 0

    def p(self, q: float) -> float:
        return percentile(self.crawl, q)

    @property
    def service_cpu_ms(self) -> float:
        """CPU per crawl of what a network node runs (the hop and serve): the path's
        cost if CPU alone bounded it. The guests' side and the kernel threads are out."""
        return sum(v for k, v in self.cpu_ms.items() if not k.startswith(("load generator", KERNEL)))


def proxy_takes_several_upstreams(settings: Settings) -> bool:
    """Whether this ``meta169 proxy`` accepts ``--upstream`` more than once (its help says so)."""
    done = subprocess.run(
        [str(settings.meta169), "proxy", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    block = re.search(r"--upstream\b(.*?)(?=\n\s+--|\Z)", done.stdout, re.S)
    return bool(block and re.search(r"repeatable|multiple", block.group(1), re.I))


# -- building ------------------------------------------------------------------------------------


def build(settings: Settings, cleanup: Cleanup, opts: StormOptions, timings: dict[str, float]) -> Topology:
    for kind in opts.kinds:
        if kind not in sequences.KINDS:
            raise BenchError(f"unknown datasource {kind!r}; one of {', '.join(sequences.KINDS)}")
    try:
        topo = storm_net.plan(netns.new_tag(), opts.guests, opts.routers, opts.kinds)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    t = time.monotonic()
    netns.create(topo.namespaces, cleanup)
    timings["create namespaces"] = time.monotonic() - t
    t = time.monotonic()
    for router in topo.routers:
        netns.ip_batch(storm_net.router_batch(topo, router), netns=router.netns)
    timings["veths and bridges"] = time.monotonic() - t
    t = time.monotonic()
    try:
        storm_net.configure_guests(settings.python, topo)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    timings["guest addresses and routes"] = time.monotonic() - t
    t = time.monotonic()
    rules = iptables.router_rules([storm_net.BRIDGE], proxy_port=storm_net.PROXY_PORT)
    for router in topo.routers:
        iptables.apply(router.netns, rules)
    timings["router REDIRECT rules"] = time.monotonic() - t
    return topo


@dataclass
class Nodes:
    procs: list[Proc]
    sockets: list[Path]


def start_nodes(
    settings: Settings, cleanup: Cleanup, work: Path, registry: str, keyfile: Path, n: int, workers: int, label: str
) -> Nodes:
    procs, socks = [], []
    for k in range(1, n + 1):
        sock = work / f"{label}-serve{k}.sock"
        argv = [str(settings.meta169), "-v", "--registry", registry, "serve", "--listen", f"unix:{sock}=proxy"]
        argv += ["--token-key-file", str(keyfile), "--workers", str(workers)]
        proc = spawn(f"serve node {k}", argv, cleanup=cleanup, log=work / f"{label}-serve{k}.log")
        procs.append(proc)
        socks.append(sock)
    for proc in procs:
        proc.wait_for("listening on", timeout=60)
    for proc in procs:
        proc.wait_for("sites ahead", timeout=120)
    return Nodes(procs, socks)


def start_proxy(
    settings: Settings,
    cleanup: Cleanup,
    work: Path,
    topo: Topology,
    upstreams: Sequence[Path],
    label: str,
    workers: int = 1,
) -> Proc:
    listeners = [
        {"netns": r.netns, "address": "0.0.0.0", "port": storm_net.PROXY_PORT, "network": r.network}
        for r in topo.routers
    ]
    lfile = work / f"{label}-listeners.json"
    lfile.write_text(json.dumps({"listeners": listeners}))
    argv = [str(settings.meta169), "proxy", "--listeners", str(lfile), "--workers", str(workers)]
    for sock in upstreams:
        argv += ["--upstream", f"unix:{sock}"]
    proc = spawn("meta169 proxy", argv, cleanup=cleanup, log=work / f"{label}-proxy.log")
    proc.wait_for(f"{len(listeners)} listeners up", timeout=60)
    return proc


def ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry.name}/comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
    return pids


def peak_rss_kb(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- one storm ---------------------------------------------------------------------------------------


def storm(
    settings: Settings,
    topo: Topology,
    recording: sequences.Recording,
    watch: dict[str, list[int]],
    result: Measured,
    *,
    work: Path,
    kill_pid: int | None = None,
    raw: Path | None = None,
) -> None:
    """Run the load generator once; fill ``result``. ``watch`` names the PIDs whose
    CPU and memory are reported (the generator is added)."""
    config = {
        "target": storm_net.METADATA_IP,
        "port": 80,
        "deadline": STORM_DEADLINE_S,
        "sequences": {k: [s.to_json() for s in v] for k, v in recording.sequences.items()},
        "guests": [{"netns": g.netns, "uuid": g.uuid, "mac": g.mac, "kind": g.kind} for g in topo.guests],
        "routers": [r.netns for r in topo.routers],
        "kill_pid": kill_pid,
        "kill_after": math.ceil(len(topo.guests) / 2),
    }
    gen = subprocess.Popen(
        # The work directory on the command line lets ``bench.run clean`` find a
        # generator left behind by a SIGKILLed run (it would stop at its deadline anyway).
        [str(settings.python), "-m", "bench.storm_load", str(work)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
    )
    try:
        assert gen.stdin is not None and gen.stdout is not None
        gen.stdin.write(json.dumps(config) + "\n")
        gen.stdin.flush()
        if gen.stdout.readline().strip() != "ready":
            raise BenchError(f"load generator did not get ready (exit {gen.poll()})")
        cpu0 = {name: process_cpu(pids) for name, pids in watch.items()}
        gen_cpu0 = process_cpu([gen.pid])
        machine0, wall0 = machine_cpu(), time.monotonic()
        gen.stdin.write("go\n")
        gen.stdin.flush()
        line = gen.stdout.readline()
        wall = time.monotonic() - wall0
        machine1 = machine_cpu()
        gen_cpu1 = process_cpu([gen.pid])
        # The killed node's PID is gone; its CPU up to the kill is lost with it.
        cpu1 = {name: process_cpu(pids) for name, pids in watch.items()}
        for name, pids in watch.items():
            if name.startswith(KERNEL):
                continue
            now, peak = 0, 0
            for pid in map(int, families(pids)):  # with --workers, each process's own
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    now += memory(pid).rss
                    peak += peak_rss_kb(pid)
            result.rss[name] = (now / 1024, peak / 1024)
        if not line:
            raise BenchError(f"load generator ended without results (exit {gen.wait(10)})")
        out: dict[str, Any] = json.loads(line)
        if raw is not None:
            raw.write_text(line)
        result.rss["load generator"] = (memory(gen.pid).rss / 1024, peak_rss_kb(gen.pid) / 1024)
    finally:
        if gen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                gen.wait(10)
        if gen.poll() is None:
            gen.kill()
            gen.wait(5)
    n = len(topo.guests)
    used = {name: cpu1[name] - cpu0[name] for name in watch}
    used["load generator"] = gen_cpu1 - gen_cpu0
    result.cpu_ms = {name: secs * 1000 / n for name, secs in used.items()}
    ours = sum(used.values())
    result.other_load = max(0.0, (machine1 - machine0) - ours) / (wall * (os.cpu_count() or 1))
    guests = out["guests"]
    result.wall = out["wall"]
    result.last_done = max(g["end"] for g in guests)
    result.crawl = [g["end"] - g["start"] for g in guests]
    result.requests = [x for g in guests for x in g["latencies"]]
    result.failed = sum(1 for g in guests if g["failure"])
    result.failures = dict(Counter(_reason(g["failure"]) for g in guests if g["failure"]).most_common(3))
    result.retries = sum(g["retries"] for g in guests)
    result.statuses = out["statuses"]
    result.conntrack_max = max(out["conntrack"].values(), default=0)
    result.tcp = out["tcp"]
    result.slow_requests = sum(1 for x in result.requests if x >= 1.0)
    result.killed_at = out["killed_at"]
    result.extra_sockets = out["extra_sockets"]
    result.prepare = out["prepare"]
    result.generator_user_ms = out["cpu_user"] * 1000 / n
    result.generator_system_ms = out["cpu_system"] * 1000 / n


def _reason(failure: str) -> str:
    """A failure without the guest-specific part of its path (MAC addresses)."""
    return re.sub(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", "{mac}", failure)


# -- the benchmark ----------------------------------------------------------------------------------


def run(settings: Settings, cleanup: Cleanup, work: Path, opts: StormOptions) -> dict[str, Any]:
    if opts.cloudinit:
        from bench import storm_cloudinit

        return storm_cloudinit.run(settings, cleanup, work, opts)
    recording = sequences.load()
    timings: dict[str, float] = {}
    several = proxy_takes_several_upstreams(settings)
    topo = build(settings, cleanup, opts, timings)
    print(
        f"\n== boot storm: {len(topo.guests)} guests ({', '.join(opts.kinds)}) behind {len(topo.routers)} routers "
        f"{topo.routers[0].netns}..; setup {sum(timings.values()):.1f} s",
        flush=True,
    )
    (work / "inventory.json").write_text(json.dumps(topo.inventory()))
    t = time.monotonic()
    registry = registry_url(settings, cleanup, work, opts.registry)
    timings[f"registry: import {len(topo.guests)} instances ({opts.registry})"] = time.monotonic() - t
    keyfile = work / "token-keys"
    keyfile.write_text(f"0:{secrets.token_hex(32)}\n")
    keyfile.chmod(0o600)

    results: list[Measured] = []
    scenarios = [(p, opts.serve_nodes) for p in opts.paths]
    if opts.kill_one:
        scenarios.append(("killed", max(2, opts.serve_nodes)))
    for label, k in scenarios:
        nodes = start_nodes(settings, cleanup, work, registry, keyfile, k, opts.workers, label)
        watch: dict[str, list[int]] = {}
        if label == "neutron":
            configs = []
            for r in topo.routers:
                cfg, pidfile = work / f"haproxy-{r.index:02d}.cfg", work / f"haproxy-{r.index:02d}.pid"
                cfg.write_text(
                    haproxy_config(
                        pidfile=pidfile,
                        bind=f"0.0.0.0:{storm_net.PROXY_PORT}",
                        upstream=nodes.sockets[0],
                        network_id=r.network,
                    )
                )
                configs.append((r.netns, cfg, pidfile))
            pids, stop_hop = start_haproxies(configs, cleanup=cleanup)
            watch[f"haproxy x{len(pids)}"] = pids
            result = Measured(NEUTRON, len(topo.guests), k, 1)
        else:
            upstreams = nodes.sockets if several else nodes.sockets[:1]
            proxy = start_proxy(settings, cleanup, work, topo, upstreams, label, opts.proxy_workers)
            stop_hop = proxy.stop
            watch["meta169 proxy" if opts.proxy_workers == 1 else f"meta169 proxy x{opts.proxy_workers}"] = [proxy.pid]
            result = Measured(KILLED if label == "killed" else MINE, len(topo.guests), k, len(upstreams))
        for i, node in enumerate(nodes.procs, 1):
            watch[f"serve node {i}"] = [node.pid]
        watch[KERNEL] = ksoftirqd_pids()
        kill = nodes.procs[0].pid if label == "killed" else None
        print(f"  {result.path}: storm ...", flush=True)
        storm(settings, topo, recording, watch, result, work=work, kill_pid=kill, raw=work / f"{label}-guests.json")
        results.append(result)
        print("  " + summary(result), flush=True)
        if opts.reboot and label != "killed":
            time.sleep(1)
            warm = Measured(result.path + REBOOT, result.guests, result.serve_nodes, result.upstreams)
            print(f"  {warm.path}: storm ...", flush=True)
            storm(settings, topo, recording, watch, warm, work=work, raw=work / f"{label}-reboot-guests.json")
            results.append(warm)
            print("  " + summary(warm), flush=True)
        cleanup.run_now(stop_hop)
        for node in reversed(nodes.procs):
            cleanup.run_now(node.stop)
        time.sleep(1)  # let the namespaces' sockets settle before the next path
    print()
    print(report(results, opts, several, timings))
    return {"results": results, "timings": timings, "several_upstreams": several}


def registry_url(settings: Settings, cleanup: Cleanup, work: Path, backend: str) -> str:
    if backend == "sqlite":
        return meta169_registry(settings, work / "storm.db", work / "inventory.json")
    if backend == "postgres":
        from bench import storm_pg

        url = storm_pg.start(cleanup)
        done = subprocess.run(
            [str(settings.meta169), "--registry", url, "import", str(work / "inventory.json")],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"import into PostgreSQL failed: {done.stderr[-2000:]}")
        return url
    raise BenchError(f"unknown registry backend {backend!r} (sqlite or postgres)")


# -- report ------------------------------------------------------------------------------------------


def summary(m: Measured) -> str:
    return (
        f"generator user {m.generator_user_ms:.1f} sys {m.generator_system_ms:.1f} ms/crawl; "
        f"last guest done {m.last_done:.2f} s, crawl p50 {m.p(50):.2f} s p99 {m.p(99):.2f} s, "
        f"failed {m.failed}{' ' + str(m.failures) if m.failures else ''}, retries {m.retries}, "
        f"statuses {m.statuses}, requests >= 1 s {m.slow_requests}, tcp {m.tcp}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def report(results: list[Measured], opts: StormOptions, several: bool, timings: dict[str, float]) -> str:
    names = sorted({n for m in results for n in m.cpu_ms}, key=_proc_order)
    rows = []
    for m in results:
        rows.append(
            (
                m.path,
                f"{m.serve_nodes} ({m.upstreams} used by the hop)",
                str(m.guests),
                f"{m.last_done:.2f}",
                _ms(m.p(50)),
                _ms(m.p(99)),
                _ms(max(m.crawl, default=float("nan"))),
                f"{percentile(m.requests, 99) * 1000:.1f}",
                str(m.slow_requests),
                str(m.failed),
                str(m.retries),
                ", ".join(f"{k}: {v}" for k, v in sorted(m.statuses.items())),
                f"{m.other_load:.0%}",
            )
        )
    out = [
        f"### boot storm: {opts.guests} guests ({' + '.join(opts.kinds)}), {opts.routers} routers "
        f"(times in ms unless marked)\n",
        table(
            (
                "path",
                "serve nodes",
                "guests",
                "last guest done s",
                "crawl p50",
                "crawl p99",
                "crawl max",
                "request p99",
                "requests >= 1 s",
                "failed guests",
                "retries",
                "replies",
                "other load",
            ),
            rows,
        ),
        "",
        table(
            ("path", *(f"CPU ms/crawl {n}" for n in names), "hop + serve", "conntrack entries per router"),
            [
                (
                    m.path,
                    *(f"{m.cpu_ms[n]:.2f}" if n in m.cpu_ms else "" for n in names),
                    f"{m.service_cpu_ms:.2f}",
                    str(m.conntrack_max),
                )
                for m in results
            ],
        ),
        "",
        table(
            ("path", "process", "RSS MB after", "peak RSS MB"),
            [
                (m.path, name, f"{now:.1f}", f"{peak:.1f}")
                for m in results
                for name, (now, peak) in sorted(m.rss.items(), key=lambda kv: _proc_order(kv[0]))
            ],
        ),
        "",
        targets(results, several),
        "",
        table(("setup step", "seconds"), [(k, f"{v:.1f}") for k, v in timings.items()]),
    ]
    for m in results:
        counted = {where: c for where, c in m.tcp.items() if any(k != "conntrack" for k in c)}
        if counted:
            text = "; ".join(
                f"{where}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "conntrack")
                for where, c in counted.items()
            )
            out.append(f"{m.path}: TCP counters summed over the namespaces (zero ones left out): {text}.")
        if m.failures:
            reasons = "; ".join(f"{reason} ({n} guests)" for reason, n in m.failures.items())
            out.append(f"{m.path}: failed guests, most common first: {reasons}.")
        if m.killed_at is not None:
            out.append(f"\n{m.path}: serve node 1 SIGKILLed at {m.killed_at:.2f} s (half of the guests done).")
        elif m.path == KILLED:
            out.append(
                f"\n{m.path}: serve node 1 was never killed: fewer than half of the guests crawled successfully."
            )
        if m.extra_sockets:
            out.append(
                f"{m.path}: {m.extra_sockets} socket(s) made during the storm, in batches (the descriptor "
                "limit did not allow one per request of every guest before the start)."
            )
    if not several and any(m.serve_nodes > 1 for m in results):
        out.append(
            "\nThis meta169 proxy takes one --upstream: with K > 1 serve nodes it forwards to node 1 only, "
            "so the other nodes idle and killing node 1 leaves the proxy nowhere to send."
        )
    return "\n".join(out)


def _proc_order(name: str) -> tuple[int, str]:
    order = ("meta169 proxy", "haproxy", "serve", "load generator", KERNEL)
    return next((i for i, p in enumerate(order) if name.startswith(p)), len(order)), name


def targets(results: list[Measured], several: bool) -> str:
    by = {m.path: m for m in results}
    rows: list[tuple[str, str, str]] = []
    mine, neutron, killed = by.get(MINE), by.get(NEUTRON), by.get(KILLED)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if mine is not None:
        rows.append(
            (f"{TARGET_GUESTS} guests", str(mine.guests), verdict(mine.guests >= TARGET_GUESTS)),
        )
        rows.append(("zero failed guests (meta169)", str(mine.failed), verdict(mine.failed == 0)))
        rows.append(
            (f"p99 crawl <= {TARGET_P99_S:g} s (meta169)", f"{mine.p(99):.2f} s", verdict(mine.p(99) <= TARGET_P99_S))
        )
        if neutron is not None:
            ratio = mine.last_done / neutron.last_done if neutron.last_done else float("nan")
            rows.append(
                (
                    f"finishes in <= {TARGET_VS_NEUTRON:g}x Neutron's time",
                    f"{mine.last_done:.2f} s vs {neutron.last_done:.2f} s = {ratio:.2f}x",
                    verdict(ratio <= TARGET_VS_NEUTRON and mine.failed == 0),
                )
            )
    if killed is not None:
        note = "" if several else " (proxy has one upstream)"
        if killed.killed_at is None:
            rows.append(("node killed" + note, "node 1 never killed (too few guests succeeded)", "not measured"))
        else:
            rows.append(("node killed: zero failed" + note, str(killed.failed), verdict(killed.failed == 0)))
            rows.append(
                (
                    f"node killed: p99 crawl <= {TARGET_P99_KILLED_S:g} s" + note,
                    f"{killed.p(99):.2f} s",
                    verdict(killed.p(99) <= TARGET_P99_KILLED_S and killed.failed == 0),
                )
            )
    return table(("target", "measured", "verdict"), rows)
