"""``proxy-rss``: memory of the per-namespace metadata proxy for N namespaces.

meta169: ONE ``meta169 proxy`` process with N listeners (0.0.0.0:9697 in each
namespace, bound to network demo-net) in front of one ``meta169 serve`` on a Unix
socket. Neutron: one haproxy daemon per namespace (``ip netns exec NS haproxy -f
CFG``, Neutron's config, same port), all forwarding to the same serve socket.

Every listener answers one request (status 200 checked for all N) before memory is
read, from /proc/PID/status (VmRSS) and /proc/PID/smaps_rollup (PSS, USS). RSS
counts shared pages (haproxy's text, libc) once per process, so the RSS sum
overstates the haproxy fleet; PSS divides shared pages among sharers and sums
honestly. Target (docs/benchmarks.md): meta169 proxy RSS for 1000 namespaces under 100 MB.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import netns
from bench.harness import BenchError, Cleanup, Memory, Settings, mb, memory, meta169_registry, table
from bench.servers import haproxy_config, start_haproxies, start_proxy, start_serve

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
NETWORK = "demo-net"
PORT = 9697
PROBE = "/latest/meta-data/instance-id"
TARGET_MB = 100
ZERO = Memory(0, 0, 0)


@dataclass
class RssResult:
    namespaces: int
    proxy_one: Memory = ZERO
    proxy_idle: Memory = ZERO
    proxy_loaded: Memory = ZERO
    haproxy_total: Memory = ZERO
    haproxy_count: int = 0
    serve: Memory = ZERO
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.proxy_loaded.rss < TARGET_MB * 1024


def _probe_all(settings: Settings, names: list[str], what: str) -> None:
    result = netns.nsctl(settings, names, "probe", str(PORT), PROBE)
    counts = result["counts"]
    assert isinstance(counts, dict)
    if counts.get("200") != len(names):
        raise BenchError(f"{what}: not every namespace answered 200: {counts} ({result['first_failure']})")


def run(settings: Settings, cleanup: Cleanup, work: Path) -> RssResult:
    n = settings.namespaces
    res = RssResult(n)
    tag = netns.new_tag()
    names = [f"{tag}-{i:04d}" for i in range(n)]
    t0 = time.monotonic()
    netns.create(names, cleanup)
    netns.nsctl(settings, names, "lo-up")
    res.timings["create namespaces (+ lo up)"] = time.monotonic() - t0
    print(f"\n== proxy memory, {n} namespaces {names[0]}..{names[-1]}", flush=True)

    registry = meta169_registry(settings, work / "rss.db", DEMO)
    sock = work / "serve.sock"
    serve = start_serve(settings, registry, [f"unix:{sock}=proxy"], cleanup=cleanup, log=work / "serve.log")

    def listener_file(path: Path, which: list[str]) -> Path:
        entries = [{"netns": ns, "address": "0.0.0.0", "port": PORT, "network": NETWORK} for ns in which]
        path.write_text(json.dumps({"listeners": entries}))
        return path

    one = start_proxy(
        settings,
        sock,
        listener_file=listener_file(work / "one.json", names[:1]),
        cleanup=cleanup,
        log=work / "proxy-one.log",
    )
    _probe_all(settings, names[:1], "meta169 proxy, 1 listener")
    res.proxy_one = memory(one.pid)
    cleanup.run_now(one.stop)

    t0 = time.monotonic()
    proxy = start_proxy(
        settings,
        sock,
        listener_file=listener_file(work / "all.json", names),
        cleanup=cleanup,
        log=work / "proxy.log",
        timeout=120,
    )
    res.timings[f"meta169 proxy: start, {n} listeners"] = time.monotonic() - t0
    if f"{n} listeners up" not in proxy.output():
        raise BenchError(f"meta169 proxy did not open {n} listeners:\n{proxy.output()[-2000:]}")
    res.proxy_idle = memory(proxy.pid)
    t0 = time.monotonic()
    _probe_all(settings, names, "meta169 proxy")
    res.timings[f"meta169 proxy: {n} requests, one per namespace"] = time.monotonic() - t0
    res.proxy_loaded = memory(proxy.pid)
    print(f"  meta169 proxy RSS {mb(res.proxy_loaded.rss)} MB, PSS {mb(res.proxy_loaded.pss)} MB", flush=True)
    cleanup.run_now(proxy.stop)

    hdir = work / "haproxy"
    hdir.mkdir()
    configs = []
    for ns in names:
        cfg, pidfile = hdir / f"{ns}.cfg", hdir / f"{ns}.pid"
        cfg.write_text(haproxy_config(pidfile=pidfile, bind=f"0.0.0.0:{PORT}", upstream=sock, network_id=NETWORK))
        configs.append((ns, cfg, pidfile))
    t0 = time.monotonic()
    pids, stop_all = start_haproxies(configs, cleanup=cleanup)
    res.timings[f"haproxy: start {n} daemons"] = time.monotonic() - t0
    t0 = time.monotonic()
    _probe_all(settings, names, "haproxy")
    res.timings[f"haproxy: {n} requests, one per namespace"] = time.monotonic() - t0
    total = ZERO
    for pid in pids:
        total = total + memory(pid)
    res.haproxy_total, res.haproxy_count = total, len(pids)
    res.serve = memory(serve.pid)
    print(f"  haproxy x{len(pids)} RSS {mb(total.rss)} MB, PSS {mb(total.pss)} MB", flush=True)
    t0 = time.monotonic()
    cleanup.run_now(stop_all)
    res.timings[f"haproxy: stop {n} daemons"] = time.monotonic() - t0
    cleanup.run_now(serve.stop)
    print()
    print(report(res))
    return res


def report(res: RssResult) -> str:
    n, hap = res.namespaces, res.haproxy_total

    def row(what: str, procs: int, m: Memory, per: int) -> tuple[str, ...]:
        return (
            what,
            str(procs),
            mb(m.rss),
            mb(m.pss),
            mb(m.uss),
            f"{m.rss / per:.0f}" if per else "",
            f"{m.rss / hap.rss:.3f}x" if hap.rss else "n/a",
            f"{m.pss / hap.pss:.3f}x" if hap.pss else "n/a",
        )

    rows = [
        row(f"meta169 proxy, {n} listeners, after 1 request each", 1, res.proxy_loaded, n),
        row(f"meta169 proxy, {n} listeners, idle", 1, res.proxy_idle, n),
        row("meta169 proxy, 1 listener", 1, res.proxy_one, 1),
        row("haproxy per namespace (Neutron), after 1 request each", res.haproxy_count, hap, n),
        row("meta169 serve (upstream of both, not counted)", 1, res.serve, 0),
    ]
    per_listener = (res.proxy_loaded.rss - res.proxy_one.rss) / max(1, n - 1)
    out = [
        f"### proxy memory for {n} namespaces (MB; sums over processes)\n",
        table(
            (
                "what",
                "processes",
                "RSS MB",
                "PSS MB",
                "USS MB",
                "RSS KB per namespace",
                "RSS vs haproxy",
                "PSS vs haproxy",
            ),
            rows,
        ),
        "",
        f"meta169 proxy marginal cost per listener: {per_listener:.1f} KB RSS.",
        f"Target: meta169 proxy RSS for {n} namespaces < {TARGET_MB} MB: "
        f"{'met' if res.met else 'NOT met'} ({mb(res.proxy_loaded.rss)} MB).",
        "",
        table(("step", "seconds"), [(k, f"{v:.1f}") for k, v in res.timings.items()]),
    ]
    return "\n".join(out)
