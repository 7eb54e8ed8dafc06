"""A throw-away PostgreSQL for ``boot-storm --registry postgres``: the serve nodes share it
as several network nodes would share one cluster.

initdb into a fresh ``/tmp/m169b-XXXXXXXX`` directory (``bench.run clean`` sweeps
those, and the server's command line names it, so a SIGKILLed run's server is found
and stopped too), Unix socket only (``listen_addresses = ''``: nothing listens on
any address), run as the ``postgres`` user (the server refuses root), stopped with
``pg_ctl stop -m immediate`` and removed by the cleanup registered here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Cleanup

USER = "meta169"
DATABASE = "meta169"
SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "64MB",
    "logging_collector": "off",
}


def _bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / n, os.X_OK) for n in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise BenchError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")


def _drop() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    raise BenchError("no 'postgres' or 'nobody' user to run PostgreSQL as (it refuses root)")


def _run(argv: list[str], drop: dict[str, Any]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **drop)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-1500:]}")


def start(cleanup: Cleanup) -> str:
    """Start the server; return the registry URL (psycopg over the Unix socket)."""
    bindir, drop = _bindir(), _drop()
    root = Path(tempfile.mkdtemp(prefix="m169b-"))
    cleanup.push(f"remove {root}", lambda: shutil.rmtree(root, ignore_errors=True))
    root.chmod(0o755)
    if drop:
        os.chown(root, drop["user"], drop["group"])
    data = root / "data"
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            USER,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ],
        drop,
    )
    conf = data / "postgresql.conf"
    settings = {**SETTINGS, "unix_socket_directories": f"'{root}'"}
    conf.write_text(conf.read_text() + "\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def stop() -> None:
        if (data / "postmaster.pid").exists():
            _run([str(bindir / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(data)], drop)

    cleanup.push("stop PostgreSQL", stop)
    _run([str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data), "-l", str(root / "pg.log")], drop)
    import psycopg

    with psycopg.connect(host=str(root), user=USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    return f"postgresql+psycopg://{USER}@/{DATABASE}?host={root}"
