"""Run cloud-init 22.4.2's real datasource code against a metadata URL, from tests.

``cloudinit_path()`` finds (or fetches and unpacks, via ``scripts/fetch-cloud-init``)
Debian's cloud-init package; ``run_datasource()`` crawls a URL with it in a
subprocess (``ci_driver.py``) and returns the driver's JSON report. This module
never imports cloud-init itself: the package lives only on the driver's sys.path.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from tests.capabilities import require

REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch-cloud-init"
DRIVER = Path(__file__).resolve().with_name("ci_driver.py")
CACHE_ENV = "META169_CACHE"
# Driver exit codes (ci_driver.py).
EXIT_DATASOURCE_FAILED = 1
EXIT_GUARD = 3
_STDERR_TAIL = 12_000

Source = Literal["openstack", "ec2"]


@functools.cache
def _fetch() -> tuple[Path | None, str]:
    cmd = [str(FETCH_SCRIPT)]
    cache = os.environ.get(CACHE_ENV)
    if cache:
        cmd.append(cache)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{FETCH_SCRIPT} could not run: {exc}"
    if proc.returncode != 0:
        return None, f"{FETCH_SCRIPT} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if path is None or not (path / "cloudinit" / "version.py").is_file():
        return None, f"{FETCH_SCRIPT} printed no usable path: {proc.stdout!r}"
    return path, ""


def cloudinit_path() -> Path:
    """The dist-packages dir holding cloud-init 22.4.2's ``cloudinit`` package.

    Fetches and unpacks Debian's package on first use (never installs it). When
    that is impossible the calling test is skipped, or fails if
    META169_REQUIRE_E2E=1.
    """
    path, reason = _fetch()
    if path is None:
        require("cloud-init 22.4.2", False, reason)
    return path


def driver_command(
    source: Source,
    url: str,
    *,
    cloudinit_dir: Path,
    imdsv2: bool = False,
    allow_net: Iterable[str] = (),
    netns: str | None = None,
    request_timeout: int | None = None,
    max_wait: int | None = None,
    retries: int | None = None,
    host_macs: bool = False,
    deadline: float | None = None,
) -> list[str]:
    """The argv that runs ci_driver.py (inside ``ip netns exec NS`` when netns is set)."""
    argv = [
        sys.executable,
        str(DRIVER),
        "--cloudinit-path",
        str(cloudinit_dir),
        "--source",
        source,
        "--url",
        url,
    ]
    if imdsv2:
        argv.append("--imdsv2")
    for cidr in allow_net:
        argv += ["--allow-net", cidr]
    for flag, value in (
        ("--timeout", request_timeout),
        ("--max-wait", max_wait),
        ("--retries", retries),
        ("--deadline", deadline),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if host_macs:
        argv.append("--host-macs")
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return argv


def run_datasource(
    source: Source,
    url: str,
    *,
    imdsv2: bool = False,
    allow_net: Sequence[str] = (),
    netns: str | None = None,
    timeout: float = 30,
    request_timeout: int | None = None,
    max_wait: int | None = None,
    retries: int | None = None,
    host_macs: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Crawl url with cloud-init's DataSourceOpenStack or DataSourceEc2; return its report.

    timeout bounds the whole subprocess (seconds). allow_net replaces the
    driver's default allow-list (127.0.0.0/8, ::1); inside a lab namespace pass
    e.g. ("169.254.169.254/32", "fe80::/10"). With check=True (default) a
    datasource failure raises AssertionError; with check=False the report of a
    failed crawl (``ok`` false, ``errors`` filled) is returned instead. A guard
    refusal, a crash or a timeout always raises, with the driver's stderr.
    """
    argv = driver_command(
        source,
        url,
        cloudinit_dir=cloudinit_path(),
        imdsv2=imdsv2,
        allow_net=allow_net,
        netns=netns,
        request_timeout=request_timeout,
        max_wait=max_wait,
        retries=retries,
        host_macs=host_macs,
        # Let the driver dump its stacks before we kill it.
        deadline=max(1.0, timeout - 2),
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise AssertionError(f"cloud-init driver timed out after {timeout}s: {argv}\n{err[-_STDERR_TAIL:]}") from exc
    report: dict[str, Any] | None = None
    if proc.returncode in (0, EXIT_DATASOURCE_FAILED) and proc.stdout.strip():
        report = json.loads(proc.stdout)
    if report is None or (check and proc.returncode != 0):
        errors = report.get("errors") if report else None
        raise AssertionError(
            f"cloud-init driver exited {proc.returncode} ({_describe(proc.returncode)}); "
            f"errors={errors}\nargv={argv}\n--- driver stderr (tail) ---\n"
            f"{proc.stderr[-_STDERR_TAIL:]}"
        )
    return report


def _describe(code: int) -> str:
    return {
        0: "ok",
        EXIT_DATASOURCE_FAILED: "datasource failed",
        2: "usage or import error",
        EXIT_GUARD: "NETWORK GUARD refused a destination",
    }.get(code, "crashed")
