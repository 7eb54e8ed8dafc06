"""What every benchmark shares: settings, cleanup, processes, memory, wrk, tables.

Cleanup is the point of this module: every process and namespace a benchmark makes
is registered here the moment it exists, and undone in reverse order on normal exit,
on an exception, on Ctrl-C and on SIGTERM/SIGHUP (turned into KeyboardInterrupt so
``finally`` blocks run). Processes are stopped by PID, never by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


@dataclass(frozen=True)
class Settings:
    duration: float = 5.0
    repeats: int = 3
    connections: int = 50
    work_dir: Path = Path("/tmp")
    namespaces: int = 1000
    pin: bool = True
    # serve: also run a second serve with --metrics-listen and report its cost
    metrics: bool = False
    meta169: Path = VENV_BIN / "meta169"
    python: Path = VENV_BIN / "python"

    def cpus(self, which: str | None) -> str | None:
        """A taskset CPU list, or None when pinning is off."""
        return which if self.pin else None


class BenchError(Exception):
    """A benchmark could not run as designed (a server did not start, a check failed)."""


# -- cleanup ------------------------------------------------------------------------------------


class Cleanup:
    """A LIFO of undo steps that always all run, each failure reported, none fatal."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, step: Callable[[], None]) -> Callable[[], None]:
        self._steps.append((what, step))
        return step

    def run_now(self, step: Callable[[], None]) -> None:
        """Run one registered step early (a server stopped between phases) and forget it."""
        for i in range(len(self._steps) - 1, -1, -1):
            if self._steps[i][1] == step:  # bound methods are equal, not identical
                del self._steps[i]
                break
        step()

    def run(self) -> None:
        # A second Ctrl-C must not leave namespaces or daemons behind.
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            while self._steps:
                what, step = self._steps.pop()
                try:
                    step()
                except Exception as exc:  # one failed undo must not skip the others
                    print(f"cleanup: {what}: {exc}", file=sys.stderr)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def guarded() -> Iterator[Cleanup]:
    """A Cleanup that runs however the block ends (SIGTERM and SIGHUP included)."""
    cleanup = Cleanup()
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield cleanup
    finally:
        cleanup.run()
        for sig, handler in old.items():
            signal.signal(sig, handler)


# -- processes ----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (daemons are not our children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_pids(pids: Sequence[int], *, timeout: float = 5.0) -> list[int]:
    """SIGTERM each PID, wait, then SIGKILL what is left. Returns the PIDs that survived."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if pid_alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05 if left else 0)
    return [p for p in left if pid_alive(p)]


@dataclass
class Proc:
    """A server this benchmark started; its output goes to ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.popen.returncode}):\n{self.output()[-2000:]}")
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout}s:\n{self.output()[-2000:]}")


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def spawn(name: str, argv: Sequence[str], *, cleanup: Cleanup, log: Path, cpus: str | None = None) -> Proc:
    """Start a foreground server, registered for cleanup before anything else can fail."""
    with log.open("wb") as out:
        popen = subprocess.Popen(
            pinned(argv, cpus), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc = Proc(name, popen, log)
    cleanup.push(f"stop {name} (pid {proc.pid})", proc.stop)
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.5)
            s.connect(("127.0.0.1", port))
            return
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"{proc.name}: nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass(frozen=True)
class Fetched:
    status: int
    content_type: str
    body: bytes


def fetch(port: int, path: str) -> Fetched:
    """One GET to 127.0.0.1 (loopback only)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return Fetched(resp.status, resp.getheader("Content-Type", ""), resp.read())
    finally:
        conn.close()


def meta169_registry(settings: Settings, db: Path, yaml_file: Path) -> str:
    url = f"sqlite:///{db}"
    subprocess.run(
        [str(settings.meta169), "--registry", url, "import", str(yaml_file)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return url


# -- memory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Kilobytes. PSS splits shared pages among their sharers, so PSS sums add up."""

    rss: int
    pss: int
    uss: int

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss, self.uss + other.uss)


def memory(pid: int) -> Memory:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return Memory(rss, fields.get("Pss", 0), uss)


def memory_tree(pid: int) -> Memory:
    """A process and its direct children (``serve --workers N`` forks)."""
    total = memory(pid)
    with contextlib.suppress(FileNotFoundError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                total = total + memory(int(child))
    return total


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


# -- wrk ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    # CPU microseconds per request of each watched process group, and the share of
    # the machine's CPU used by processes this benchmark did not start (noise).
    cpu_us: dict[str, float] = field(default_factory=dict)
    other_load: float = 0.0

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors

    @property
    def valid(self) -> bool:
        """Throughput of error replies (a 429 from a rate limit, a 503) measures nothing."""
        return self.non2xx <= self.requests // 100


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(text: str) -> WrkResult:
    """Read wrk's summary (run with --latency)."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise BenchError(f"cannot read wrk output:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        p50_ms=_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=_ms(p99.group(1)) if p99 else float("nan"),
    )


def wrk_argv(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int,
    close: bool,
    cpus: str | None,
    netns: str | None,
    headers: Sequence[str] = (),
) -> list[str]:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s"]
    argv += ["--timeout", "5s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    for line in headers:
        argv += ["-H", line]
    argv = pinned([*argv, url], cpus)
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return argv


_TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """Seconds of CPU the whole machine has been busy (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def process_cpu(pids: Sequence[int]) -> float:
    """CPU seconds used so far by these processes and their direct children."""
    total = 0
    for p in families(pids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def families(pids: Sequence[int]) -> list[str]:
    """These processes and their direct children, as /proc names them."""
    family: list[str] = []
    for pid in pids:
        family.append(str(pid))
        with contextlib.suppress(FileNotFoundError):
            family += Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return family


def run_queue_wait(pids: Sequence[int]) -> float:
    """Seconds these processes' threads, and their direct children's, have waited
    runnable for a CPU (schedstat's run_delay, proc(5)): what a busy machine adds to
    their latency, besides the work itself."""
    total = 0
    for p in families(pids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    close: bool = False,
    cpus: str | None = None,
    netns: str | None = None,
    watch: Mapping[str, Sequence[int]] | None = None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """Run wrk once. ``watch`` names groups of server PIDs whose CPU time per request
    is reported; CPU the machine spent outside them and wrk is reported as noise.
    ``headers`` are request header lines sent with every request."""
    argv = wrk_argv(
        url,
        duration=duration,
        connections=connections,
        threads=threads,
        close=close,
        cpus=cpus,
        netns=netns,
        headers=headers,
    )
    watch = watch or {}
    before = {name: process_cpu(pids) for name, pids in watch.items()}
    machine0, kids0, wall0 = machine_cpu(), _children_cpu(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    machine1, kids1, wall1 = machine_cpu(), _children_cpu(), time.monotonic()
    after = {name: process_cpu(pids) for name, pids in watch.items()}
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    if not result.valid:
        print(f"  ! {url}: {result.non2xx} of {result.requests} replies were not 2xx", file=sys.stderr)
    used = {name: after[name] - before[name] for name in watch}
    ours = sum(used.values()) + (kids1 - kids0)
    other = max(0.0, (machine1 - machine0) - ours) / ((wall1 - wall0) * (os.cpu_count() or 1))
    per_req = {name: cpu * 1e6 / max(1, result.requests) for name, cpu in used.items()}
    return dataclasses.replace(result, cpu_us=per_req, other_load=other)


# -- statistics and tables ------------------------------------------------------------------------------


@dataclass
class Series:
    """Repeated runs of one point; the median is what is reported."""

    runs: list[WrkResult] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.rps for r in self.runs) if self.runs else float("nan")

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.runs)

    @property
    def non2xx_share(self) -> float:
        return sum(r.non2xx for r in self.runs) / max(1, sum(r.requests for r in self.runs))

    def cell(self) -> str:
        """The median for a table, or why it is not a measurement."""
        text = f"{self.median:,.0f} {self.spread}".strip()
        return text if self.valid else f"{text} INVALID: {self.non2xx_share:.0%} non-2xx"

    @property
    def spread(self) -> str:
        if len(self.runs) < 2:
            return ""
        lo, hi = min(r.rps for r in self.runs), max(r.rps for r in self.runs)
        return f"±{(hi - lo) / 2 / self.median * 100:.0f}%" if self.median else ""

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs) if self.runs else float("nan")

    def cpu_us(self, name: str) -> float:
        values = [r.cpu_us[name] for r in self.runs if name in r.cpu_us]
        return statistics.median(values) if values else float("nan")

    @property
    def other_load(self) -> float:
        return statistics.median(r.other_load for r in self.runs) if self.runs else float("nan")


def ratio(a: float | Series, b: float | Series) -> str:
    if isinstance(a, Series) or isinstance(b, Series):
        if any(isinstance(x, Series) and not x.valid for x in (a, b)):
            return "n/a"
        a = a.median if isinstance(a, Series) else a
        b = b.median if isinstance(b, Series) else b
    return f"{a / b:.2f}x" if b else "n/a"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def machine_facts() -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def version(argv: list[str], pattern: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except FileNotFoundError:
            return "missing"
        m = re.search(pattern, done.stdout + done.stderr)
        return m.group(1) if m else "?"

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except FileNotFoundError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--", "src"):
        commit += " + uncommitted changes in src/"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "meta169": commit,
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "haproxy": version(["haproxy", "-v"], r"version (\S+)"),
        "wrk": version(["wrk", "-v"], r"wrk (\S+)"),
    }
