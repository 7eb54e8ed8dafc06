"""``first-request``: what a caller serve has never seen costs, alone and 1000 at once.

The boot storm's cold path, without the network around it. One SQLite registry with
N instances shaped like the storm's (``bench/storm_net.py``, ``bench/sequences.py``:
one key, user data, vendor data, one port; N/100 networks).

1. **In process, one caller at a time** (the registry thread's work per caller):
   - *per-caller path (before)*: what serve did for each new caller until now, as its
     anchor in the same run: ``Registry.resolve`` (a query for the owner, then the
     instance and its ports), ``Registry.get_network`` for each port's network, then
     ``build_site``;
   - *one query*: ``Registry.resolve_many([caller])``, one statement, then
     ``build_site`` (networks are cached by the site cache);
   - *one query, the version asked (now)*: the same statement, then
     ``Site.lazily`` and the one lookup of the document asked, which renders that
     version of that tree only; and the two renders alone;
   - *batched*: ``resolve_many`` for 256 callers at once, per caller;
   - *rendering ahead*: all N sites, as ``serve`` does at start (reads in batches of
     128, one query per batch of networks for the owners), per site.
2. **Over HTTP, N never-seen callers at once**, each one ``GET
   /openstack/2018-08-27/meta_data.json`` on its own connection to a ``meta169 serve``
   proxy socket (the identity stamped as ``meta169 proxy`` stamps it), against two
   serve processes started side by side on the registry: ``--no-prerender`` (every
   caller is a miss: batched resolution, rendering on the event loop) and the default
   (sites rendered ahead at start). Reported: when the first, the median, the 99th
   percentile and the last caller had its answer, from the common start, and every
   status (all must be 200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import storm_net
from bench.harness import BenchError, Cleanup, Settings, spawn, table
from bench.storm_load import percentile

DEFAULT_CALLERS = 1000
DOC = "/openstack/2018-08-27/meta_data.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("first-request")
    g.add_argument(
        "--callers",
        type=int,
        default=DEFAULT_CALLERS,
        help=f"instances, all asked once (default {DEFAULT_CALLERS}; 100 with --quick)",
    )


def _per_call_ms(fn: Any, items: list[Any]) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - started) / len(items) * 1000


def in_process(url: str, topo: storm_net.Topology) -> list[tuple[str, str]]:
    from meta169.api.cache import Scope, SiteCache
    from meta169.model import Caller, parse_ip
    from meta169.registry import open_registry
    from meta169.render import RenderOptions, Site, build_site

    registry = open_registry(url)
    options = RenderOptions()
    callers = [Caller(ip=parse_ip(g.ip), network_id=g.router.network) for g in topo.guests]
    sample = callers[: min(300, len(callers))]
    try:
        networks = {n.id: n for n in registry.list_networks()}

        def before(caller: Caller) -> None:
            instance = registry.resolve(caller)
            mine = {p.network_id: registry.get_network(p.network_id) for p in instance.ports}
            build_site(instance, mine, options)

        def now(caller: Caller) -> None:
            found = registry.resolve_many([caller])[0]
            assert not isinstance(found, Exception)
            build_site(found, networks, options)

        def lazily(caller: Caller) -> None:
            found = registry.resolve_many([caller])[0]
            assert not isinstance(found, Exception)
            assert Site.lazily(found, networks, options).lookup(DOC) is not None

        instances = [registry.resolve_many([c])[0] for c in sample]

        def render_whole(instance: Any) -> None:
            build_site(instance, networks, options)

        def render_asked(instance: Any) -> None:
            assert Site.lazily(instance, networks, options).lookup(DOC) is not None

        def lookup_before(caller: Caller) -> None:
            for port in registry.resolve(caller).ports:
                registry.get_network(port.network_id)

        rows = []
        # Alternated twice, the median kept: the machine is shared.
        runs: dict[str, list[float]] = {
            "before": [],
            "now": [],
            "lazily": [],
            "lookup before": [],
            "lookup now": [],
            "render whole": [],
            "render asked": [],
        }
        for _ in range(2):
            runs["before"].append(_per_call_ms(before, sample))
            runs["now"].append(_per_call_ms(now, sample))
            runs["lazily"].append(_per_call_ms(lazily, sample))
            runs["render whole"].append(_per_call_ms(render_whole, instances))
            runs["render asked"].append(_per_call_ms(render_asked, instances))
            runs["lookup before"].append(_per_call_ms(lookup_before, sample))
            runs["lookup now"].append(_per_call_ms(lambda c: registry.resolve_many([c]), sample))
        batch_ms = []
        for start in range(0, len(callers), 256):
            chunk = callers[start : start + 256]
            batch_ms.append(_per_call_ms(registry.resolve_many, [chunk]) / len(chunk))
        before_ms, now_ms = statistics.median(runs["before"]), statistics.median(runs["now"])
        rows.append(("per-caller path (before): resolve + get_network + render", f"{before_ms:.2f}"))
        rows.append(("  of which the registry lookup", f"{statistics.median(runs['lookup before']):.2f}"))
        rows.append(("one query: resolve_many([caller]) + render the whole site", f"{now_ms:.2f}"))
        rows.append(("  of which the registry lookup", f"{statistics.median(runs['lookup now']):.2f}"))
        rows.append(
            (
                f"one query, the version asked (now): resolve_many([caller]) + Site.lazily, lookup {DOC}",
                f"{statistics.median(runs['lazily']):.2f}",
            )
        )
        rows.append(("render the whole site (build_site)", f"{statistics.median(runs['render whole']):.3f}"))
        rows.append(
            ("render the version asked only (Site.lazily + lookup)", f"{statistics.median(runs['render asked']):.3f}")
        )
        rows.append(("batched: resolve_many(256 callers), per caller", f"{statistics.median(batch_ms):.3f}"))

        async def ahead() -> float:
            cache = SiteCache(registry, options, prerender=Scope(everything=True), max_sites=len(callers) + 1)
            await cache.poll_once()
            started = time.perf_counter()
            cache.start()
            while cache.site_count < len(callers):
                if time.perf_counter() - started > 120:
                    raise BenchError(f"rendering ahead: {cache.site_count} of {len(callers)} sites after 120 s")
                await asyncio.sleep(0.005)
            took = time.perf_counter() - started
            cache.close()
            return took

        took = asyncio.run(ahead())
        rows.append((f"rendering ahead: {len(callers)} sites, per site", f"{took / len(callers) * 1000:.2f}"))
        print(f"\nfirst-request, in process ({len(callers)} instances, SQLite), ms per caller:\n")
        print(table(("what", "ms"), rows))
        lazily_ms = statistics.median(runs["lazily"])
        print(f"\nper-caller path before / one query: {before_ms / now_ms:.2f}x", end="")
        print(f"; before / one query and the version asked: {before_ms / lazily_ms:.2f}x")
        return [(r[0], r[1]) for r in rows]
    finally:
        registry.close()


async def _storm(sock: Path, topo: storm_net.Topology) -> tuple[list[float], dict[int, int]]:
    """Every guest's first request at once; completion times from the common start."""
    gate = asyncio.Event()
    done: list[float] = []
    statuses: dict[int, int] = {}

    async def one(guest: storm_net.Guest) -> None:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        request = (
            f"GET {DOC} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n"
            f"X-Meta169-Caller-IP: {guest.ip}\r\nX-Meta169-Network-ID: {guest.router.network}\r\n\r\n"
        ).encode()
        await gate.wait()
        writer.write(request)
        reply = await reader.read()
        finished = time.perf_counter()
        writer.close()
        status = int(reply[9:12]) if reply[:5] == b"HTTP/" else 0
        if status == 200 and json.loads(reply.partition(b"\r\n\r\n")[2])["uuid"] != guest.uuid:
            status = -1  # another instance's document
        statuses[status] = statuses.get(status, 0) + 1
        done.append(finished)

    tasks = [asyncio.create_task(one(g)) for g in topo.guests]
    await asyncio.sleep(0.5)  # every connection open
    started = time.perf_counter()
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return sorted(t - started for t in done), statuses


def over_http(settings: Settings, cleanup: Cleanup, work: Path, url: str, topo: storm_net.Topology) -> list[Any]:
    rows: list[Any] = []
    for label, extra in (("--no-prerender", ["--no-prerender"]), ("default (rendered ahead)", [])):
        sock = work / f"serve-{len(rows)}.sock"
        argv = [str(settings.meta169), "-v", "--registry", url, "serve", "--listen", f"unix:{sock}=proxy"]
        log = work / f"serve-{len(rows)}.log"
        proc = spawn(f"serve {label}", [*argv, "--rate-limit", "0", *extra], cleanup=cleanup, log=log)
        proc.wait_for("listening on", timeout=60)
        if not extra:
            proc.wait_for("sites ahead", timeout=120)
        times, statuses = asyncio.run(_storm(sock, topo))
        cleanup.run_now(proc.stop)
        ms = [t * 1000 for t in times]
        rows.append(
            (
                label,
                f"{ms[0]:.0f}",
                f"{percentile(ms, 50):.0f}",
                f"{percentile(ms, 99):.0f}",
                f"{ms[-1]:.0f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
            )
        )
        if set(statuses) != {200}:
            print(f"INVALID: {label} answered {statuses}")
    print(f"\nfirst-request over HTTP: {len(topo.guests)} never-seen callers at once, ms from the common start:\n")
    print(table(("serve", "first", "p50", "p99", "last", "statuses"), rows))
    return rows


def run(settings: Settings, cleanup: Cleanup, work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    count = 100 if getattr(opts, "quick", False) else opts.callers
    topo = storm_net.plan("m169b-first", count, max(1, count // 100), ("openstack",))
    inventory = work / "inventory.json"
    inventory.write_text(json.dumps(topo.inventory()))
    url = f"sqlite:///{work / 'registry.db'}"
    subprocess.run(
        [str(settings.meta169), "--registry", url, "import", str(inventory)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {"in_process": in_process(url, topo), "over_http": over_http(settings, cleanup, work, url, topo)}
