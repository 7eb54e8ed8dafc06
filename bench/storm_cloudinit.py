"""``boot-storm --cloudinit N``: cloud-init's real datasource code in N guests at once,
each crawling http://169.254.169.254/ from its own namespace through the router's
REDIRECT and ``meta169 proxy``, and every guest's request log compared with the
recorded sequence the storm replays (``bench/cloudinit_sequences.json``).

Each guest runs ``tests/harness/ci_driver.py`` (cloud-init 22.4.2 unpacked from
Debian's package by ``scripts/fetch-cloud-init``, never installed) under ``ip netns
exec``, with cloud-init's default timeouts and its network guard allowing
169.254.169.254 only. The log compared is the driver's: per attempt the method, the
path, whether the IMDSv2 token was sent, the TTL asked for, and the status.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import sequences
from bench.harness import REPO, BenchError, Cleanup, Settings, table
from bench.storm_net import METADATA_IP, Guest, Topology

DRIVER = REPO / "tests" / "harness" / "ci_driver.py"
FETCH = REPO / "scripts" / "fetch-cloud-init"
# cloud-init's own defaults per datasource (sources/__init__.py DataSource.url_*,
# DataSourceEc2.url_max_wait and url_timeout), as the recording used.
DEFAULTS: dict[str, list[str]] = {
    "openstack": ["--timeout", "10", "--retries", "5"],
    "ec2": ["--timeout", "50", "--retries", "5", "--max-wait", "120"],
    "ec2-imdsv2": ["--timeout", "50", "--retries", "5", "--max-wait", "120"],
}
DEADLINE_S = 150


def cloudinit_dir() -> Path:
    done = subprocess.run([str(FETCH)], capture_output=True, text=True, timeout=600, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not (Path(lines[-1]) / "cloudinit").is_dir():
        raise BenchError(f"scripts/fetch-cloud-init failed: {done.stderr.strip()[-1000:]}")
    return Path(lines[-1])


def driver_argv(settings: Settings, guest: Guest, pkg: Path) -> list[str]:
    source = "openstack" if guest.kind == "openstack" else "ec2"
    argv = ["ip", "netns", "exec", guest.netns, str(settings.python), str(DRIVER), "--cloudinit-path", str(pkg)]
    argv += ["--source", source, "--url", f"http://{METADATA_IP}", "--allow-net", f"{METADATA_IP}/32"]
    if guest.kind == "ec2-imdsv2":
        argv.append("--imdsv2")
    return [*argv, *DEFAULTS[guest.kind], "--deadline", str(DEADLINE_S - 10)]


def expected(guest: Guest, recording: sequences.Recording) -> list[tuple[str, str, bool, str | None, int]]:
    out = []
    for s in recording.sequences[guest.kind]:
        ttl = next((v for n, v in s.headers if n.lower() == sequences.TTL_HEADER.lower()), None)
        out.append((s.method, s.path_for(guest.mac), s.uses_token, ttl, s.status))
    return out


def observed(report: dict[str, Any]) -> list[tuple[str, str, bool, str | None, int]]:
    base = f"http://{METADATA_IP}"
    return [
        (a["method"], a["url"].removeprefix(base), bool(a["token_sent"]), a["token_ttl"], a["status"])
        for a in report["requests"]
    ]


def run(settings: Settings, cleanup: Cleanup, work: Path, opts: Any) -> dict[str, Any]:
    from bench import storm

    recording = sequences.load()
    pkg = cloudinit_dir()
    timings: dict[str, float] = {}
    topo: Topology = storm.build(settings, cleanup, opts, timings)
    (work / "inventory.json").write_text(json.dumps(topo.inventory()))
    registry = storm.registry_url(settings, cleanup, work, opts.registry)
    keyfile = work / "token-keys"
    keyfile.write_text(f"0:{secrets.token_hex(32)}\n")
    keyfile.chmod(0o600)
    nodes = storm.start_nodes(settings, cleanup, work, registry, keyfile, 1, opts.workers, "ci")
    storm.start_proxy(settings, cleanup, work, topo, nodes.sockets[:1], "ci")
    print(
        f"\n== cloud-init 22.4.2 in {len(topo.guests)} guests at once ({', '.join(opts.kinds)}), through meta169 proxy",
        flush=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    procs: list[tuple[Guest, subprocess.Popen[bytes], Path]] = []

    def stop_all() -> None:
        for _, p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)

    cleanup.push("stop cloud-init drivers", stop_all)
    t0 = time.monotonic()
    for g in topo.guests:
        out = work / f"ci-{g.index:04d}.json"
        with out.open("wb") as f, (work / f"ci-{g.index:04d}.log").open("wb") as err:
            procs.append((g, subprocess.Popen(driver_argv(settings, g, pkg), stdout=f, stderr=err, env=env), out))
    for _, p, _ in procs:
        try:
            p.wait(max(1.0, DEADLINE_S - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    wall = time.monotonic() - t0
    cleanup.run_now(stop_all)

    rows, results = [], []
    for kind in opts.kinds:
        mine = [(g, p, out) for g, p, out in procs if g.kind == kind]
        same, ok, crawl, first_diff = 0, 0, [], ""
        for g, p, out in mine:
            report: dict[str, Any] = {}
            with contextlib.suppress(ValueError, OSError):
                report = json.loads(out.read_text())
            if not report:
                first_diff = first_diff or f"{g.netns}: driver exited {p.returncode} without a report"
                continue
            good = report.get("ok") and report.get("instance_id") == g.uuid and report["retries"]["count"] == 0
            ok += bool(good)
            crawl.append(float(report.get("crawl_seconds", 0)))
            want, got = expected(g, recording), observed(report)
            if want == got:
                same += 1
            elif not first_diff:
                i = next(
                    (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
                )
                first_diff = (
                    f"{g.netns} request {i}: recorded {want[i] if i < len(want) else None}, "
                    f"cloud-init sent {got[i] if i < len(got) else None}"
                )
            results.append({"guest": g.netns, "kind": kind, "ok": bool(good), "same": want == got})
        rows.append(
            (
                kind,
                str(len(mine)),
                str(ok),
                f"{same} of {len(mine)}",
                str(len(recording.sequences[kind])),
                f"{statistics.median(crawl):.2f}" if crawl else "n/a",
                f"{max(crawl):.2f}" if crawl else "n/a",
                first_diff or "none",
            )
        )
    text = (
        f"### cloud-init 22.4.2 in {len(topo.guests)} guests at once vs the recorded sequences\n\n"
        + table(
            (
                "datasource",
                "guests",
                "crawl ok, own instance, no retry",
                "request log identical to the recording",
                "requests each",
                "crawl p50 s",
                "crawl max s",
                "first difference",
            ),
            rows,
        )
        + f"\n\nAll {len(topo.guests)} drivers started together; the last one ended after {wall:.1f} s "
        "(the crawl itself is the driver's crawl_seconds; starting Python and importing cloud-init "
        "in every namespace at once takes most of the rest)."
    )
    print()
    print(text)
    if any(not r["same"] or not r["ok"] for r in results) or len(results) != len(topo.guests):
        print("\ncloud-init did not do what the recording says: see the first difference above", file=sys.stderr)
    return {"rows": rows, "guests": results, "wall": wall}
