"""Entry point: ``python -m bench.run [BENCH|all|clean] [options]``, BENCH one of ``BENCHES`` below.

Needs root (namespaces, haproxy in them), wrk, nginx and haproxy
(``scripts/install-system-deps bench``). Prints Markdown tables with absolute
numbers and ratios to the anchors; ``--json FILE`` also saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from bench import first_request, netns, propagation, proxy_rps, proxy_rss, scale, serve_bench, storm
from bench.harness import BenchError, Settings, guarded, machine_facts, table

BENCHES = ("serve", "proxy-rss", "proxy-rps", "boot-storm", "propagation", "first-request", "scale")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("which", nargs="?", default="all", choices=(*BENCHES, "all", "clean"))
    p.add_argument("--duration", type=float, default=4.0, help="seconds of load per run (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median is reported (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--namespaces", type=int, default=1000, help="namespaces for proxy-rss (default 1000)")
    p.add_argument("--no-pin", action="store_true", help="do not taskset servers and wrk to CPUs")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="serve: also load a serve with --metrics-listen on and report the cost of its metrics",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s, 1 repeat, 50 namespaces")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    storm.add_arguments(p)
    propagation.add_arguments(p)
    first_request.add_arguments(p)
    scale.add_arguments(p)
    return p.parse_args(argv)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def preflight() -> None:
    missing = [c for c in ("wrk", "nginx", "haproxy", "ip", "taskset") if shutil.which(c) is None]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run scripts/install-system-deps bench (as root)")
    if os.geteuid() != 0:
        raise BenchError("needs root: network namespaces and haproxy inside them")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(tempfile.gettempdir())
    if args.which == "clean":
        names, pids = netns.sweep(root)
        print(f"stopped {len(pids)} processes, removed {len(names)} namespaces")
        return 0
    settings = Settings(
        duration=1.0 if args.quick else args.duration,
        repeats=1 if args.quick else args.repeats,
        connections=args.connections,
        namespaces=50 if args.quick and args.namespaces == 1000 else args.namespaces,
        pin=not args.no_pin,
        metrics=args.metrics,
    )
    chosen = BENCHES if args.which == "all" else (args.which,)
    facts = machine_facts()
    print(table(("machine", ""), list(facts.items())))
    print(
        f"\nsettings: {settings.duration:g} s per run, {settings.repeats} runs per point (median), "
        f"{settings.connections} connections, pinning {'on' if settings.pin else 'off'}"
    )
    results: dict[str, Any] = {"machine": facts, "settings": _plain(settings)}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="m169b-", dir=root))
    try:
        preflight()
        with guarded() as cleanup:
            for name in chosen:
                sub = work / name
                sub.mkdir()
                t0 = time.monotonic()
                if name == "serve":
                    results[name] = serve_bench.run(settings, cleanup, sub)
                elif name == "boot-storm":
                    results[name] = storm.run(settings, cleanup, sub, storm.options(args))
                elif name == "propagation":
                    results[name] = propagation.run(settings, cleanup, sub, args)
                elif name == "first-request":
                    results[name] = first_request.run(settings, cleanup, sub, args)
                elif name == "scale":
                    results[name] = scale.run(settings, cleanup, sub, scale.options(args))
                elif name == "proxy-rss":
                    results[name] = proxy_rss.run(settings, cleanup, sub)
                else:
                    results[name] = proxy_rps.run(settings, cleanup, sub)
                print(f"\n({name}: {time.monotonic() - t0:.0f} s)", flush=True)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped and removed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(_plain(results), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
