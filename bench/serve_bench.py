"""``serve``: meta169 serve against nginx returning the same bytes from memory.

Both servers run at once on 127.0.0.1 (each idle while the other is loaded), with
the same number of processes: 1 vs 1 (server pinned to CPU 1, wrk -t1 to CPU 0) and
2 vs 2 (``serve --workers 2`` vs ``worker_processes 2``; with two cores nothing can
be pinned apart, so servers and wrk -t2 share both). Each point is run
``repeats`` times, alternating which server goes first, and the median is reported.

One more point per layout, mode ``keep-alive+token``, is an IMDSv2 client: the
static leaf on keep-alive with a token serve issued (``PUT /latest/api/token``) in
an ``X-aws-ec2-metadata-token`` header on every request, as botocore and
cloud-init send it. nginx gets the same header line and ignores it (same request
bytes, same reply bytes); serve checks it on every request.

With ``--metrics`` a second serve runs beside the first, the same but with
``--metrics-listen`` on (counting every request, the compiled path's included, and
timing each call), loaded in the same rotation; a second table gives both against
nginx and against each other, and a scrape after the load shows the counts.
"""

from __future__ import annotations

import http.client
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    BenchError,
    Cleanup,
    Fetched,
    Series,
    Settings,
    fetch,
    free_port,
    memory_tree,
    meta169_registry,
    ratio,
    run_wrk,
    table,
)
from bench.servers import start_nginx, start_serve

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
NETWORK = "demo-net"
# A static leaf, an EC2 listing, and the document cloud-init reads first (its
# random_seed is fresh per request, so nginx gets one sample of the same size).
PATHS = ("/latest/meta-data/instance-id", "/latest/meta-data/", "/openstack/latest/meta_data.json")
MODES = ("keep-alive", "close")
# The IMDSv2 point: PATHS[0], keep-alive, a valid token on every request.
TOKEN_MODE = "keep-alive+token"
TARGETS = {"keep-alive": 0.8, "close": 0.9, TOKEN_MODE: 0.8}
TOKEN_HEADER = "X-aws-ec2-metadata-token"


@dataclass(frozen=True)
class Layout:
    name: str
    workers: int
    server_cpus: str | None
    wrk_cpus: str | None
    wrk_threads: int


def layouts(settings: Settings) -> list[Layout]:
    return [
        Layout("1 vs 1", 1, settings.cpus("1"), settings.cpus("0"), 1),
        Layout("2 vs 2", 2, None, None, 2),
    ]


@dataclass
class Point:
    layout: str
    path: str
    mode: str
    serve: Series
    nginx: Series
    # serve with --metrics-listen (bench.run serve --metrics)
    metered: Series | None = None

    @property
    def ratio(self) -> float:
        return self.serve.median / self.nginx.median if self.nginx.median else 0.0

    @property
    def met(self) -> bool:
        return self.serve.valid and self.nginx.valid and self.ratio >= TARGETS[self.mode]


def run(settings: Settings, cleanup: Cleanup, work: Path) -> list[Point]:
    registry = meta169_registry(settings, work / "serve.db", DEMO)
    points: list[Point] = []
    for layout in layouts(settings):
        points.extend(_run_layout(settings, cleanup, work / layout.name.replace(" ", ""), registry, layout))
    print()
    print(report(points))
    if settings.metrics:
        print()
        print(metrics_report(points))
    return points


def _run_layout(settings: Settings, cleanup: Cleanup, work: Path, registry: str, layout: Layout) -> list[Point]:
    work.mkdir(parents=True, exist_ok=True)
    sport, nport = free_port(), free_port()
    serve = start_serve(
        settings,
        registry,
        [f"127.0.0.1:{sport}"],
        network=NETWORK,
        workers=layout.workers,
        cpus=layout.server_cpus,
        cleanup=cleanup,
        log=work / "serve.log",
    )
    # nginx gets serve's exact bytes and content type for every path.
    routes: dict[str, tuple[str, bytes]] = {}
    for path in PATHS:
        got = fetch(sport, path)
        if got.status != 200:
            raise BenchError(f"serve answered {got.status} for {path}: {got.body[:200]!r}")
        routes[path] = (got.content_type, got.body)
    nginx = start_nginx(work / "nginx", nport, layout.workers, routes, cleanup=cleanup, cpus=layout.server_cpus)
    for path, (ctype, body) in routes.items():
        got = fetch(nport, path)
        same = got.body == body if "meta_data.json" not in path else len(got.body) == len(body)
        if got.status != 200 or got.content_type != ctype or not same:
            raise BenchError(f"nginx does not return serve's bytes for {path}: {got}")
    print(f"\n== serve vs nginx, {layout.name}: serve pid {serve.pid} :{sport}, nginx pid {nginx.pid} :{nport}")
    servers = {"serve": sport, "nginx": nport}
    pids = {"serve": serve.pid, "nginx": nginx.pid}
    scrape_port = 0
    metered = None
    if settings.metrics:
        mport, scrape_port = free_port(), free_port()
        metered = start_serve(
            settings,
            registry,
            [f"127.0.0.1:{mport}"],
            network=NETWORK,
            workers=layout.workers,
            cpus=layout.server_cpus,
            cleanup=cleanup,
            log=work / "serve-metrics.log",
            extra=("--metrics-listen", f"127.0.0.1:{scrape_port}"),
            name="meta169 serve+metrics",
        )
        for path in PATHS:
            got = fetch(mport, path)
            if got.status != 200 or len(got.body) != len(routes[path][1]):
                raise BenchError(f"serve with metrics answered {got.status} for {path}: {got.body[:200]!r}")
        print(f"   serve with --metrics-listen: pid {metered.pid} :{mport}, metrics on :{scrape_port}")
        servers["serve+metrics"] = mport
        pids["serve+metrics"] = metered.pid
    # Each serve seals its own tokens (its own key); nginx gets serve's, for the same bytes.
    tokens = {name: imds_token(port) for name, port in servers.items() if name != "nginx"}
    tokens["nginx"] = tokens["serve"]
    for name, port in servers.items():
        got = fetch_with(port, PATHS[0], {TOKEN_HEADER: tokens[name]})
        if got.status != 200 or got.body != routes[PATHS[0]][1]:
            raise BenchError(f"{name} answered {got.status} for {PATHS[0]} with a token: {got.body[:200]!r}")

    def load(name: str, path: str, mode: str, duration: float) -> Series:
        return Series(
            [
                run_wrk(
                    f"http://127.0.0.1:{servers[name]}{path}",
                    duration=duration,
                    connections=settings.connections,
                    threads=layout.wrk_threads,
                    close=mode == "close",
                    cpus=layout.wrk_cpus,
                    watch={"server": [pids[name]]},
                    headers=[f"{TOKEN_HEADER}: {tokens[name]}"] if mode == TOKEN_MODE else (),
                )
            ]
        )

    for name in servers:  # warm up: site cache, page cache, TCP state
        load(name, PATHS[0], "keep-alive", 1)
    points = []
    for path, mode in _points():
        runs: dict[str, Series] = {name: Series() for name in servers}
        for r in range(settings.repeats):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                runs[name].runs.extend(load(name, path, mode, settings.duration).runs)
                time.sleep(0.2)
        point = Point(layout.name, path, mode, runs["serve"], runs["nginx"], runs.get("serve+metrics"))
        points.append(point)
        print(
            f"  {path:35} {mode:10} serve {point.serve.median:9.0f}/s {point.serve.spread:5} "
            f"nginx {point.nginx.median:9.0f}/s {point.nginx.spread:5} ratio {point.ratio:.2f}  "
            f"CPU/req {point.serve.cpu_us('server'):.0f} / {point.nginx.cpu_us('server'):.0f} us  "
            f"other load {point.serve.other_load:.0%}",
            flush=True,
        )
        if point.metered is not None:
            print(
                f"  {'':35} {'':10} serve+metrics {point.metered.median:9.0f}/s {point.metered.spread:5} "
                f"on/off {ratio(point.metered, point.serve)}  "
                f"CPU/req {point.metered.cpu_us('server'):.0f} us",
                flush=True,
            )
    if scrape_port:
        print(f"  {scraped(scrape_port)}")
    mem_serve, mem_nginx = memory_tree(serve.pid), memory_tree(nginx.pid)
    print(
        f"  memory after load: serve RSS {mem_serve.rss // 1024} MB (PSS {mem_serve.pss // 1024}), "
        f"nginx RSS {mem_nginx.rss // 1024} MB (PSS {mem_nginx.pss // 1024})"
    )
    cleanup.run_now(nginx.stop)
    cleanup.run_now(serve.stop)
    if metered is not None:
        cleanup.run_now(metered.stop)
    return points


def _points() -> list[tuple[str, str]]:
    """(path, mode) of every point of a layout, in the order they are run."""
    return [(path, mode) for path in PATHS for mode in MODES] + [(PATHS[0], TOKEN_MODE)]


def imds_token(port: int) -> str:
    """An IMDSv2 token from the serve on ``port`` (127.0.0.1), valid for 6 hours."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"the token PUT answered {resp.status}: {body[:200]!r}")
    return body.decode()


def fetch_with(port: int, path: str, headers: dict[str, str]) -> Fetched:
    """One GET with these headers to 127.0.0.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return Fetched(resp.status, resp.getheader("Content-Type", ""), resp.read())
    finally:
        conn.close()


def scraped(port: int) -> str:
    """What the metered serve counted, from one scrape of its /metrics."""
    got = fetch(port, "/metrics")
    if got.status != 200:
        raise BenchError(f"/metrics answered {got.status}")
    text = got.body.decode()
    by_path: dict[str, float] = {}
    for match in re.finditer(r'^meta169_serve_requests_total\{[^}]*path="(\w+)"[^}]*\} (\S+)$', text, re.M):
        by_path[match.group(1)] = by_path.get(match.group(1), 0.0) + float(match.group(2))
    procs = re.search(r"^meta169_metrics_processes (\S+)$", text, re.M)
    counted = ", ".join(f"{name} {value:,.0f}" for name, value in sorted(by_path.items()))
    return f"metrics scrape ({len(got.body):,} bytes, {procs.group(1) if procs else '?'} processes): requests {counted}"


def metrics_report(points: list[Point]) -> str:
    rows = []
    for p in points:
        if p.metered is None:
            continue
        rows.append(
            (
                p.layout,
                p.path,
                p.mode,
                p.serve.cell(),
                p.metered.cell(),
                ratio(p.metered, p.serve),
                ratio(p.serve, p.nginx),
                ratio(p.metered, p.nginx),
                f"{p.serve.cpu_us('server'):.0f} / {p.metered.cpu_us('server'):.0f}",
            )
        )
    return "### serve with --metrics-listen on and off (requests/s, median of runs)\n\n" + table(
        (
            "procs",
            "path",
            "mode",
            "serve req/s (off)",
            "serve req/s (on)",
            "on/off",
            "serve/nginx off",
            "serve/nginx on",
            "CPU us/req off / on",
        ),
        rows,
    )


def report(points: list[Point]) -> str:
    rows = []
    for p in points:
        rows.append(
            (
                p.layout,
                p.path,
                p.mode,
                p.serve.cell(),
                p.nginx.cell(),
                ratio(p.serve, p.nginx),
                f">= {TARGETS[p.mode]}x",
                "n/a" if not (p.serve.valid and p.nginx.valid) else "yes" if p.met else "NO",
                f"{p.serve.cpu_us('server'):.0f} / {p.nginx.cpu_us('server'):.0f}",
                ratio(p.nginx.cpu_us("server"), p.serve.cpu_us("server")) if p.serve.valid and p.nginx.valid else "n/a",
                f"{p.serve.p99:.1f} / {p.nginx.p99:.1f}",
                f"{max(p.serve.other_load, p.nginx.other_load):.0%}",
                p.serve.errors + p.nginx.errors,
            )
        )
    return "### serve vs nginx (requests/s, median of runs)\n\n" + table(
        (
            "procs",
            "path",
            "mode",
            "serve req/s",
            "nginx req/s",
            "serve/nginx",
            "target",
            "met",
            "CPU us/req serve / nginx",
            "CPU-bound ratio",
            "p99 ms serve / nginx",
            "other load",
            "errors",
        ),
        rows,
    )
