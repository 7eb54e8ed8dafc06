"""The storm's load generator: ``python -m bench.storm_load``, a child of the benchmark.

Every guest replays its datasource's recorded sequence (``bench/sequences.py``) from
its own network namespace: one new TCP connection per request to
169.254.169.254:80, the recorded header lines, cloud-init's timeout, retries and
sleeps for that request. All guests start together.

One process does it all, cheaply, so that the load generator takes as little of the
machine as it can from the servers it measures:

- sockets are created inside each guest's namespace before the start (``setns(2)``
  into the guest, ``socket()``, back: a socket belongs to the namespace it was
  created in for life), so the storm pays no thread or process per guest; as many
  as the descriptor limit allows (without CAP_SYS_RESOURCE the hard limit cannot be
  raised: 20000 here, so 1000 guests get 18 each of the 35-38 they use), the rest
  in batches of up to 8 on the storm's clock when a guest runs out (counted;
  about 6 µs of CPU each);
- one edge-triggered epoll loop drives every connection (connect, send once
  writable, read the reply by its Content-Length, close: about six system calls and
  no event-loop objects per request; uvloop's ``sock_*`` calls cost about three times
  the user CPU per request here);
- each guest's logic is a plain generator (``Storm.flow``) that yields a request or
  a sleep and is sent the outcome, so cloud-init's retry rules read as code.

The parent reads this process's CPU time from /proc like any other process's; its
system time includes the kernel's work of pushing each packet through the veths,
the bridge and the router's conntrack and REDIRECT, done in the sender's context.

Protocol (the one argument, the benchmark's work directory, only marks the process
as the benchmark's for ``bench.run clean``): one JSON line on stdin (guests, sequences, target, options); ``ready`` on
stdout once the sockets exist; ``go`` on stdin starts the storm; one JSON line of
results on stdout at the end. Bounded: every attempt has a timeout and the whole
storm a deadline, after which unfinished guests stop and count as failed.

Safety: sockets connect only to the configured target, only from inside ``m169b-``
namespaces; no socket made in the host namespace is ever connected.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import os
import resource
import select
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.sequences import Step
from bench.storm_net import PREFIX, setns

SPARES = 4  # sockets made per guest beyond its sequence, for retries
BATCH = 8  # sockets made at once when a guest runs out during the storm
RESERVED_FDS = 1024  # for the process itself and the connections in flight
ET_FLAGS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


@dataclass(frozen=True)
class Request:
    step: Step
    data: bytes


@dataclass(frozen=True)
class Sleep:
    seconds: float


Outcome = tuple[int | None, bytes, str]  # status (None: no reply), body, error
Op = Request | Sleep


@dataclass
class GuestRun:
    """One guest's state and outcome."""

    index: int
    netns: str
    uuid: str
    mac: str
    steps: Sequence[Step]
    requests: list[bytes]
    sockets: list[socket.socket]
    start: float = 0.0
    end: float = -1.0
    failure: str = ""
    attempts: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    flow: Generator[Op, Outcome, None] | None = None


class Conn:
    """One request in flight."""

    __slots__ = ("buf", "connected", "data", "done", "guest", "head_end", "need", "sock", "started")

    def __init__(self, guest: GuestRun, sock: socket.socket, data: bytes, started: float) -> None:
        self.guest = guest
        self.sock = sock
        self.data = data
        self.started = started
        self.connected = False
        self.done = False
        self.buf = b""
        self.head_end = -1
        self.need = -1


class Storm:
    def __init__(self, config: dict[str, Any]) -> None:
        self.target = (str(config["target"]), int(config["port"]))
        self.deadline = float(config["deadline"])
        self.kill_pid = config.get("kill_pid")
        self.kill_after = int(config.get("kill_after") or 0)
        self.killed_at: float | None = None
        self.finished = 0
        self.succeeded = 0
        self.statuses: Counter[str] = Counter()
        self.extra_sockets = 0
        self.t0 = 0.0
        self.host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.timers: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        sequences = {kind: tuple(Step.from_json(s) for s in steps) for kind, steps in config["sequences"].items()}
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        longest = max(len(s) for s in sequences.values()) + SPARES
        self.per_guest = max(1, min(longest, (hard - RESERVED_FDS) // max(1, len(config["guests"]))))
        self.guests = [self._prepare(i, g, sequences[g["kind"]]) for i, g in enumerate(config["guests"])]

    # -- sockets -----------------------------------------------------------------------------------

    def _prepare(self, i: int, g: dict[str, Any], steps: tuple[Step, ...]) -> GuestRun:
        name = str(g["netns"])
        if not name.startswith(PREFIX) or "/" in name:
            raise SystemExit(f"storm_load: refusing namespace {name!r} (not the benchmark's)")
        # The token is only known after the guest's PUT: keep its placeholder until then.
        requests = [s.request(mac=g["mac"], token="{token}") for s in steps]
        run = GuestRun(i, name, g["uuid"], g["mac"], steps, requests, [])
        run.sockets = self._sockets(run, min(self.per_guest, len(steps) + SPARES))
        return run

    def _sockets(self, run: GuestRun, n: int) -> list[socket.socket]:
        """``n`` sockets of ``run``'s namespace (this thread enters it and always comes back)."""
        made = []
        fd = os.open(f"/run/netns/{run.netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd)
        finally:
            os.close(fd)
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                # urllib3 sets TCP_NODELAY on every connection it opens.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                made.append(s)
        finally:
            setns(self.host_ns)
        made.reverse()  # pop() hands them out in creation order
        return made

    def _socket(self, run: GuestRun) -> socket.socket:
        if not run.sockets:
            n = min(BATCH, max(1, len(run.steps) - run.attempts))
            self.extra_sockets += n
            run.sockets = self._sockets(run, n)
        return run.sockets.pop()

    # -- a guest, as cloud-init does it ----------------------------------------------------------------

    def flow(self, run: GuestRun) -> Generator[Op, Outcome, None]:
        token = b""
        for i, step in enumerate(run.steps):
            data = run.requests[i]
            first = time.monotonic()
            loop_n = 0
            tries = 0
            while True:
                status, body, error = yield Request(step, data.replace(b"{token}", token) if step.uses_token else data)
                tries += 1
                ok = status == step.status and (not step.probe or bool(body))
                if ok and _names_someone_else(step, body, run.uuid):
                    run.failure = f"{step.path_for(run.mac)}: another instance's reply"
                    return
                if ok:
                    if step.is_token_put:
                        token = body
                    break
                outcome = f"{status}" if status is not None else error
                if step.probe:
                    # wait_for_url: one try unless max_wait > 0, then rounds until it has
                    # passed, sleeping loop_n // 5 + 1 s (url_helper.wait_for_url).
                    assert step.max_wait is not None
                    waited = time.monotonic() - first
                    if step.max_wait <= 0 or waited > step.max_wait or not step.retried(status):
                        run.failure = f"{step.path_for(run.mac)}: {outcome}"
                        return
                    yield Sleep(loop_n // 5 + 1)
                    loop_n += 1
                else:
                    if tries >= step.tries or not step.retried(status):
                        run.failure = f"{step.path_for(run.mac)}: {outcome} after {tries} tries"
                        return
                    if status == 401 and step.uses_token:
                        # DataSourceEc2._refresh_stale_aws_token_cb drops the token; the
                        # retry's _get_headers asks for a new one first.
                        st, new, _ = yield Request(run.steps[0], run.requests[0])
                        token = new if st == 200 else b""
                    yield Sleep(step.sleep)
                run.retries += 1

    # -- the engine ---------------------------------------------------------------------------------

    def _advance(self, run: GuestRun, outcome: Outcome | None, now: float) -> None:
        assert run.flow is not None
        try:
            op = next(run.flow) if outcome is None else run.flow.send(outcome)
        except StopIteration:
            self._finish(run, now)
            return
        if isinstance(op, Sleep):
            heapq.heappush(self.timers, (now + op.seconds, next(self._seq), run))
        else:
            self._start(run, op, now)

    def _start(self, run: GuestRun, op: Request, now: float) -> None:
        sock = self._socket(run)
        conn = Conn(run, sock, op.data, now)
        fd = sock.fileno()
        self.conns[fd] = conn
        remaining = self.deadline - (now - self.t0)
        timeout = remaining if op.step.timeout is None else min(op.step.timeout, remaining)
        heapq.heappush(self.timers, (now + max(timeout, 0.001), next(self._seq), conn))
        self.epoll.register(fd, ET_FLAGS)
        err = sock.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS):
            self._complete(conn, (None, b"", errno.errorcode.get(err, str(err))), now)

    def _complete(self, conn: Conn, outcome: Outcome, now: float) -> None:
        if conn.done:
            return
        conn.done = True
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()  # also leaves the epoll set
        run = conn.guest
        run.attempts += 1
        run.latencies.append(now - conn.started)
        status, _, error = outcome
        self.statuses[str(status) if status is not None else error] += 1
        self._advance(run, outcome, now)

    def _finish(self, run: GuestRun, now: float) -> None:
        run.end = now - self.t0
        self.finished += 1
        self.succeeded += not run.failure
        # Half done means half crawled successfully: guests failing fast must not
        # bring the kill forward to a moment when nothing is in flight.
        if self.kill_pid and self.killed_at is None and self.succeeded >= self.kill_after:
            # A serve node this benchmark started (its PID came from the parent).
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(self.kill_pid), signal.SIGKILL)
            self.killed_at = now - self.t0

    def _event(self, conn: Conn, events: int, now: float) -> None:
        sock = conn.sock
        if not conn.connected:
            if events & (select.EPOLLERR | select.EPOLLHUP):
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self._complete(conn, (None, b"", errno.errorcode.get(err, "connect failed")), now)
                return
            if not events & select.EPOLLOUT:
                return
            conn.connected = True
            try:
                sent = sock.send(conn.data)
            except OSError as exc:
                self._complete(conn, (None, b"", type(exc).__name__), now)
                return
            if sent != len(conn.data):  # a request is a few hundred bytes: never seen
                self._complete(conn, (None, b"", "short send"), now)
                return
        if not events & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP):
            return
        while True:  # edge-triggered: read until the reply is whole or the socket is dry
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self._complete(conn, (None, b"", type(exc).__name__), now)
                return
            if not chunk:
                if conn.head_end >= 0 and conn.need < 0:  # delimited by the close
                    self._complete(conn, (_status(conn.buf), conn.buf[conn.head_end + 4 :], ""), now)
                else:
                    self._complete(conn, (None, b"", "closed before the reply"), now)
                return
            conn.buf += chunk
            if conn.head_end < 0:
                conn.head_end = conn.buf.find(b"\r\n\r\n")
                if conn.head_end < 0:
                    continue
                length = _content_length(conn.buf[: conn.head_end])
                conn.need = conn.head_end + 4 + length if length is not None else -1
            if 0 <= conn.need <= len(conn.buf):
                self._complete(conn, (_status(conn.buf), conn.buf[conn.head_end + 4 : conn.need], ""), now)
                return

    def run(self) -> float:
        self.t0 = now = time.monotonic()
        for g in self.guests:
            g.start = 0.0
            g.flow = self.flow(g)
        for g in self.guests:
            self._advance(g, None, now)
        end_by = self.t0 + self.deadline + 5
        while self.finished < len(self.guests):
            now = time.monotonic()
            if now > end_by:
                break
            wait = 0.05
            if self.timers:
                wait = min(wait, max(0.0, self.timers[0][0] - now))
            for fd, events in self.epoll.poll(wait, 4096):
                conn = self.conns.get(fd)
                if conn is not None:
                    self._event(conn, events, time.monotonic())
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, what = heapq.heappop(self.timers)
                if isinstance(what, Conn):
                    if not what.done:
                        self._complete(what, (None, b"", "timeout"), now)
                else:
                    self._advance(what, (None, b"", "woke"), now)  # a Sleep is over
        for g in self.guests:
            if g.end < 0:
                g.failure = g.failure or "storm deadline"
                g.end = self.deadline
        for conn in list(self.conns.values()):
            conn.sock.close()
        return time.monotonic() - self.t0

    def counters(self, names: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per namespace: nf_conntrack_count and the TCP counters that show lost
        connections (/proc/net/snmp, /proc/net/netstat). Both answer for the namespace
        of the process that opens them, so this thread enters each in turn."""
        out = {}
        for name in names:
            if not name.startswith(PREFIX) or "/" in name:
                continue
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
                found = _tcp_counters()
                with contextlib.suppress(OSError), open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
                    found["conntrack"] = int(f.read())
                out[name] = found
            finally:
                setns(self.host_ns)
                os.close(fd)
        return out


COUNTERS = ("RetransSegs", "TCPSynRetrans", "ListenOverflows", "ListenDrops", "TCPBacklogDrop", "TCPTimeouts")


def _tcp_counters() -> dict[str, int]:
    found: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with contextlib.suppress(OSError), open(path) as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            for key, value in zip(names.split()[1:], values.split()[1:], strict=False):
                if key in COUNTERS:
                    found[key] = int(value)
    return found


def _names_someone_else(step: Step, body: bytes, uuid: str) -> bool:
    """The replies that carry the instance id must carry this guest's."""
    if step.path.endswith(("/meta-data/instance-id", "/meta_data.json")):
        return uuid.encode() not in body
    return False


def _status(buf: bytes) -> int | None:
    parts = buf.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def main() -> int:
    config = json.loads(sys.stdin.readline())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t = time.monotonic()
    storm = Storm(config)
    prepare = time.monotonic() - t
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    cpu0 = os.times()
    wall = storm.run()
    cpu1 = os.times()
    routers = storm.counters(config.get("routers", []))
    guests_seen = storm.counters([g.netns for g in storm.guests])
    sums = {
        "routers": dict(sum((Counter(c) for c in routers.values()), Counter())),
        "guests": dict(sum((Counter(c) for c in guests_seen.values()), Counter())),
    }
    conntrack = {name: c.get("conntrack", 0) for name, c in routers.items()}
    guests = [
        {
            "start": g.start,
            "end": g.end,
            "failure": g.failure,
            "attempts": g.attempts,
            "retries": g.retries,
            "latencies": [round(x, 5) for x in g.latencies],
        }
        for g in storm.guests
    ]
    print(
        json.dumps(
            {
                "wall": wall,
                "prepare": prepare,
                "cpu_user": cpu1.user - cpu0.user,
                "cpu_system": cpu1.system - cpu0.system,
                "killed_at": storm.killed_at,
                "statuses": dict(storm.statuses),
                "extra_sockets": storm.extra_sockets,
                "conntrack": conntrack,
                "tcp": sums,
                "guests": guests,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
