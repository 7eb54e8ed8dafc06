"""``proxy-rps``: requests/s from a guest through the per-network hop to serve.

Topology (all made here, removed after): namespace ``<tag>-guest`` holds
10.0.0.11/24, namespace ``<tag>-router`` holds 10.0.0.1/24, joined by a veth pair
that never appears in the host namespace. wrk runs inside the guest. The registry
has network bench-net (10.0.0.0/24) and instance bench-vm owning 10.0.0.11.

Paths compared in one run, each against the same ``meta169 serve --listen
unix:SOCK=proxy`` (one process):

- meta169 proxy: one listener ``<router>/10.0.0.1:9697=network:bench-net``; per
  request it strips identity headers, stamps X-Meta169-Caller-IP (the TCP source,
  10.0.0.11) and X-Meta169-Network-ID, and forwards over a pooled keep-alive Unix
  connection.
- haproxy (Neutron): in the router namespace on 10.0.0.1:9698 with Neutron's
  config (http mode, http-server-close: a new Unix connection to serve per request,
  X-Forwarded-For, X-Neutron-Network-ID) plus set-header X-Meta169-Caller-IP %[src]
  and X-Meta169-Network-ID so serve can identify the caller.
- haproxy keep-alive: the same without http-server-close (haproxy reuses server
  connections), on 10.0.0.1:9699. Not what Neutron runs; a stricter anchor.

Pinning (default): wrk on CPU 0; the hop and serve share CPU 1, the same for all three.
Target (docs/benchmarks.md): meta169 proxy throughput >= the haproxy (Neutron) path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench import netns
from bench.harness import BenchError, Cleanup, Series, Settings, meta169_registry, ratio, run_wrk, table
from bench.servers import haproxy_config, start_haproxies, start_proxy, start_serve

NETWORK = "bench-net"
GUEST_IP, ROUTER_IP = "10.0.0.11", "10.0.0.1"
INSTANCE = "0b5e7c1a-6d2f-4e0a-9c1b-7f3a2d4e5b01"
REGISTRY_YAML = f"""networks:
  - id: {NETWORK}
    project_id: bench
    name: bench
    subnets:
      - cidr: 10.0.0.0/24
        gateway: {ROUTER_IP}
        dhcp: true
instances:
  - uuid: {INSTANCE}
    name: bench-vm
    hostname: bench-vm
    project_id: bench
    availability_zone: nova
    keys:
      - {{name: bench, type: ssh, data: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKeyOnlyNotARealKey bench@meta169"}}
    user_data: |
      #cloud-config
      hostname: bench-vm
    ports:
      - {{network: {NETWORK}, mac: "fa:16:3e:be:00:01", ips: [{GUEST_IP}]}}
"""
PATHS = ("/latest/meta-data/instance-id", "/openstack/latest/meta_data.json")
MODES = ("keep-alive", "close")
HOPS = {"meta169 proxy": 9697, "haproxy (Neutron)": 9698, "haproxy keep-alive": 9699}
ANCHOR = "haproxy (Neutron)"


@dataclass
class Point:
    path: str
    mode: str
    series: dict[str, Series]

    def median(self, hop: str) -> float:
        return self.series[hop].median

    def cpu_us(self, hop: str) -> float:
        """CPU per request of the whole path (hop + serve): what bounds req/s when CPU-bound."""
        return self.series[hop].cpu_us("hop") + self.series[hop].cpu_us("serve")

    @property
    def met(self) -> bool:
        mine, anchor = self.series["meta169 proxy"], self.series[ANCHOR]
        return mine.valid and anchor.valid and mine.median >= anchor.median


def _topology(cleanup: Cleanup) -> tuple[str, str]:
    tag = netns.new_tag()
    guest, router = f"{tag}-guest", f"{tag}-router"
    netns.create([guest, router], cleanup)
    # Both veth ends are created straight inside the namespaces: nothing in the host's.
    netns.ip_batch([f"link add m169b-g0 netns {guest} type veth peer name m169b-r0 netns {router}"])
    netns.ip_batch(["link set lo up", "link set m169b-g0 up", f"addr add {GUEST_IP}/24 dev m169b-g0"], netns=guest)
    netns.ip_batch(["link set lo up", "link set m169b-r0 up", f"addr add {ROUTER_IP}/24 dev m169b-r0"], netns=router)
    return guest, router


def run(settings: Settings, cleanup: Cleanup, work: Path) -> list[Point]:
    guest, router = _topology(cleanup)
    (work / "bench.yaml").write_text(REGISTRY_YAML)
    registry = meta169_registry(settings, work / "rps.db", work / "bench.yaml")
    sock = work / "serve.sock"
    hop_cpus, wrk_cpus = settings.cpus("1"), settings.cpus("0")
    serve = start_serve(
        settings, registry, [f"unix:{sock}=proxy"], cleanup=cleanup, log=work / "serve.log", cpus=hop_cpus
    )
    proxy = start_proxy(
        settings,
        sock,
        listens=[f"{router}/{ROUTER_IP}:{HOPS['meta169 proxy']}=network:{NETWORK}"],
        cleanup=cleanup,
        log=work / "proxy.log",
        cpus=hop_cpus,
    )
    configs = []
    for hop, close in (("haproxy (Neutron)", True), ("haproxy keep-alive", False)):
        name = "neutron" if close else "keepalive"
        cfg, pidfile = work / f"haproxy-{name}.cfg", work / f"haproxy-{name}.pid"
        cfg.write_text(
            haproxy_config(
                pidfile=pidfile, bind=f"{ROUTER_IP}:{HOPS[hop]}", upstream=sock, network_id=NETWORK, server_close=close
            )
        )
        configs.append((router, cfg, pidfile))
    pids, _ = start_haproxies(configs, cleanup=cleanup, cpus=hop_cpus)
    hop_pid = {"meta169 proxy": proxy.pid, "haproxy (Neutron)": pids[0], "haproxy keep-alive": pids[1]}
    print(
        f"\n== guest -> hop -> serve: {guest} {GUEST_IP} -> {router} {ROUTER_IP}; serve pid {serve.pid}, "
        f"proxy pid {proxy.pid}, haproxy pids {pids}",
        flush=True,
    )
    for hop, port in HOPS.items():
        got = netns.nsctl(settings, [guest], "probe", str(port), PATHS[0], ROUTER_IP)
        if got["counts"] != {"200": 1} or got["first_body"] != INSTANCE:
            raise BenchError(f"{hop} on {ROUTER_IP}:{port} does not identify the guest: {got}")

    def load(hop: str, path: str, mode: str, duration: float) -> Series:
        return Series(
            [
                run_wrk(
                    f"http://{ROUTER_IP}:{HOPS[hop]}{path}",
                    duration=duration,
                    connections=settings.connections,
                    close=mode == "close",
                    cpus=wrk_cpus,
                    netns=guest,
                    watch={"hop": [hop_pid[hop]], "serve": [serve.pid]},
                )
            ]
        )

    for hop in HOPS:
        load(hop, PATHS[0], "keep-alive", 1)
    points = []
    for path in PATHS:
        for mode in MODES:
            point = Point(path, mode, {hop: Series() for hop in HOPS})
            hops = list(HOPS)
            for r in range(settings.repeats):
                for hop in hops[r % len(hops) :] + hops[: r % len(hops)]:  # rotate who goes first
                    point.series[hop].runs.extend(load(hop, path, mode, settings.duration).runs)
                    time.sleep(0.2)
            points.append(point)
            print(
                "  "
                + f"{path:35} {mode:10} "
                + "  ".join(
                    f"{hop} {point.median(hop):6.0f}/s {point.series[hop].spread} "
                    f"({point.series[hop].cpu_us('hop'):.0f}+{point.series[hop].cpu_us('serve'):.0f} us)"
                    for hop in HOPS
                ),
                flush=True,
            )
    print()
    print(report(points))
    return points


def report(points: list[Point]) -> str:
    rows = []
    for p in points:
        mine = p.series["meta169 proxy"]
        rows.append(
            (
                p.path,
                p.mode,
                *(p.series[h].cell() for h in HOPS),
                ratio(mine, p.series[ANCHOR]),
                ratio(mine, p.series["haproxy keep-alive"]),
                "n/a" if not (mine.valid and p.series[ANCHOR].valid) else "yes" if p.met else "NO",
                " / ".join(f"{p.series[h].cpu_us('hop'):.0f}+{p.series[h].cpu_us('serve'):.0f}" for h in HOPS),
                ratio(p.cpu_us(ANCHOR), p.cpu_us("meta169 proxy")) if mine.valid and p.series[ANCHOR].valid else "n/a",
                " / ".join(f"{p.series[h].p99:.1f}" for h in HOPS),
                f"{max(p.series[h].other_load for h in HOPS):.0%}",
                " / ".join(str(p.series[h].errors) for h in HOPS),
            )
        )
    return "### guest -> hop -> serve (requests/s, median of runs)\n\n" + table(
        (
            "path",
            "mode",
            *(f"{h} req/s" for h in HOPS),
            "proxy/haproxy(Neutron)",
            "proxy/haproxy keep-alive",
            "target met",
            "CPU us/req hop+serve (same order)",
            "CPU-bound ratio vs Neutron",
            "p99 ms (same order)",
            "other load",
            "errors (same order)",
        ),
        rows,
    )
