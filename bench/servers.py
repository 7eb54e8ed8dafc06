"""The servers under test and the anchors: how each is configured and started.

Configs are pure functions of their inputs (text out); ``start_*`` run them as
foreground processes (or, for haproxy, daemons as Neutron runs them, tracked by
pidfile) registered with the caller's Cleanup.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench.harness import BenchError, Cleanup, Proc, Settings, pinned, spawn, stop_pids, wait_for_port

# -- meta169 -------------------------------------------------------------------------------------


def start_serve(
    settings: Settings,
    registry: str,
    listens: Sequence[str],
    *,
    cleanup: Cleanup,
    log: Path,
    network: str | None = None,
    workers: int = 1,
    cpus: str | None = None,
    extra: Sequence[str] = (),
    name: str = "meta169 serve",
) -> Proc:
    argv = [str(settings.meta169), "--registry", registry, "serve"]
    for item in listens:
        argv += ["--listen", item]
    if network:
        argv += ["--network", network]
    argv += ["--workers", str(workers), *_no_rate_limit(settings), *extra]
    proc = spawn(f"{name} x{workers}", argv, cleanup=cleanup, log=log, cpus=cpus)
    proc.wait_for("listening on")
    return proc


@functools.cache
def _no_rate_limit(settings: Settings) -> tuple[str, ...]:
    """serve's per-instance rate limit would answer a load generator (one instance)
    429 after its burst; benchmarks measure the serving path, so it is turned off
    where the CLI has it."""
    done = subprocess.run(
        [str(settings.meta169), "serve", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return ("--rate-limit", "0") if "--rate-limit" in done.stdout else ()


def start_proxy(
    settings: Settings,
    upstream: Path,
    *,
    cleanup: Cleanup,
    log: Path,
    listens: Sequence[str] = (),
    listener_file: Path | None = None,
    cpus: str | None = None,
    timeout: float = 60.0,
) -> Proc:
    argv = [str(settings.meta169), "proxy", "--upstream", f"unix:{upstream}"]
    for item in listens:
        argv += ["--listen", item]
    if listener_file is not None:
        argv += ["--listeners", str(listener_file)]
    proc = spawn("meta169 proxy", argv, cleanup=cleanup, log=log, cpus=cpus)
    proc.wait_for("listeners up", timeout=timeout)
    return proc


# -- nginx -------------------------------------------------------------------------------------------


def nginx_string(body: bytes) -> bytes:
    """``body`` as an nginx single-quoted string. ``$`` cannot be escaped in nginx
    strings, so it becomes a variable holding "$" (the ``geo`` block in the config)."""
    escaped = body.replace(b"\\", b"\\\\").replace(b"'", b"\\'").replace(b"$", b"${m169b_dollar}")
    return b"'" + escaped + b"'"


def nginx_config(work: Path, port: int, workers: int, routes: Mapping[str, tuple[str, bytes]]) -> bytes:
    """nginx answering each path from memory (``return 200``) with serve's exact bytes
    and content type. Keep-alive is unlimited (``keepalive_requests``), as in serve."""
    tmp = work / "nginx-tmp"
    locations = b"".join(
        b'        location = %s { default_type "%s"; return 200 %s; }\n'
        % (path.encode(), ctype.encode(), nginx_string(body))
        for path, (ctype, body) in routes.items()
    )
    head = f"""worker_processes {workers};
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    types {{ }}
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    geo $m169b_dollar {{ default "$"; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
"""
    tail = b"        location / { return 404; }\n    }\n}\n"
    return head.encode() + locations + tail


def start_nginx(
    work: Path,
    port: int,
    workers: int,
    routes: Mapping[str, tuple[str, bytes]],
    *,
    cleanup: Cleanup,
    cpus: str | None = None,
) -> Proc:
    work.mkdir(parents=True, exist_ok=True)
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_bytes(nginx_config(work, port, workers, routes))
    argv = ["nginx", "-p", str(work), "-c", str(conf), "-e", str(work / "nginx-error.log")]
    proc = spawn(f"nginx x{workers}", argv, cleanup=cleanup, log=work / "nginx.out", cpus=cpus)
    wait_for_port(port, proc)
    return proc


# -- haproxy (Neutron's metadata proxy) ------------------------------------------------------------------


def haproxy_config(
    *,
    pidfile: Path,
    bind: str,
    upstream: Path,
    network_id: str,
    server_close: bool = True,
) -> str:
    """haproxy as Neutron configures its per-namespace metadata proxy
    [openstack/neutron neutron/common/metadata.py METADATA_HAPROXY_GLOBAL and
    neutron/agent/metadata/driver.py _UNLIMITED_CONFIG_TEMPLATE, _HEADER_CONFIG_TEMPLATE]:
    http mode, maxconn 1024, nbthread 2, http-server-close, forwardfor, the same
    timeouts, a unix-socket server and the X-Neutron-Network-ID header.

    Differences, all in haproxy's favour or neutral: no syslog lines (there is no
    /dev/log here and per-request logging would only slow it down); user/group
    root, which is Neutron's default (the agent's own euid) and lets it reach the
    socket; and two extra headers, because meta169 serve's proxy listener takes the
    caller from X-Meta169-Caller-IP / X-Meta169-Network-ID where Neutron's agent
    would look the port up from X-Forwarded-For. ``server_close=False`` is the
    non-Neutron variant that keeps connections to serve open (haproxy's default).
    """
    close = "    option http-server-close\n" if server_close else ""
    return f"""global
    user        root
    group       root
    maxconn     1024
    nbthread    2
    pidfile     {pidfile}
    daemon

defaults
    mode http
    option dontlognull
{close}    option forwardfor
    retries                 3
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s

listen listener
    bind {bind}
    server metadata {upstream}
    http-request del-header X-Neutron-Router-ID
    http-request set-header X-Neutron-Network-ID {network_id}
    http-request set-header X-Meta169-Caller-IP %[src]
    http-request set-header X-Meta169-Network-ID {network_id}
"""


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().split()
    except FileNotFoundError:
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def stop_pidfiles(pidfiles: Sequence[Path]) -> None:
    pids = [pid for pid in map(read_pid, pidfiles) if pid is not None]
    stop_pids(pids)
    for pidfile in pidfiles:  # a stale pidfile could name a reused PID later
        pidfile.unlink(missing_ok=True)


def start_haproxies(
    configs: Sequence[tuple[str, Path, Path]], *, cleanup: Cleanup, cpus: str | None = None, parallel: int = 4
) -> tuple[list[int], Callable[[], None]]:
    """``ip netns exec NS haproxy -f CFG`` for each (netns, config, pidfile), as Neutron
    spawns them; a few at a time. Returns the daemons' PIDs and the step that stops
    them (registered with ``cleanup``; pass it to ``cleanup.run_now``)."""
    pidfiles = [pidfile for _, _, pidfile in configs]
    stop = cleanup.push(f"stop {len(configs)} haproxy daemons", lambda: stop_pidfiles(pidfiles))
    running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def reap(limit: int) -> None:
        while len(running) > limit:
            ns, popen = running.pop(0)
            try:
                _, err = popen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                raise BenchError(f"haproxy in {ns} did not daemonize in 30s") from None
            if popen.returncode != 0:
                raise BenchError(f"haproxy in {ns} failed ({popen.returncode}): {err.decode(errors='replace')}")

    for netns, config, _ in configs:
        argv = ["ip", "netns", "exec", netns, *pinned(["haproxy", "-f", str(config)], cpus)]
        running.append(
            (netns, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        )
        reap(parallel)
    reap(0)
    pids = []
    for netns, _, pidfile in configs:
        deadline = time.monotonic() + 5
        pid = read_pid(pidfile)
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.02)
            pid = read_pid(pidfile)
        if pid is None:
            raise BenchError(f"haproxy in {netns}: no pidfile {pidfile}")
        pids.append(pid)
    return pids, stop
