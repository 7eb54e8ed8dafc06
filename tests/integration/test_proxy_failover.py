"""A proxy with several upstreams: requests spread over the serve nodes marked up, a
node that fails is marked down and its requests go to another (only those safe to
send again), a node marked down is probed and comes back. Scripted Unix-socket
servers play serve where each failure must be exact; then real serve processes, one
SIGKILLed in the middle of a load, behind a real ``meta169 proxy``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from meta169.metrics.instruments import ProxyMetrics
from meta169.proxy.upstream import Upstream, UpstreamSpec
from tests.integration.serving import ServeProcess, guests_inventory, imported_registry, meta169_argv, start_serve
from tests.integration.test_proxy_pipeline import FakeServe, Script, Sink, answers
from tests.processes import free_port, stop
from tests.scrape import scrape, total, value


def _echo(conn: int, index: int, request: bytes) -> Awaitable[bytes | None]:
    async def answer() -> bytes | None:
        path = request.split(b" ")[1]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)

    return answer()


def _hang_up(conn: int, index: int, request: bytes) -> Awaitable[bytes | None]:
    async def answer() -> bytes | None:
        return None  # read the request, then close without a byte of reply

    return answer()


def _send(upstream: Upstream, method: str, path: str, count: int = 1) -> list[Sink]:
    sinks = [Sink() for _ in range(count)]
    for i, sink in enumerate(sinks):
        payload = f"{method} {path}{i} HTTP/1.1\r\nhost: metadata\r\ncontent-length: 0\r\n\r\n".encode()
        upstream.request(payload, lambda r: r, sink, pipeline=method == "GET", idempotent=method != "POST")
    return sinks


def _requests(*serves: FakeServe) -> int:
    return sum(data.count(b"HTTP/1.1\r\n") for serve in serves for _, data in serve.reads)


@asynccontextmanager
async def _nodes(tmp_path: Path, a: Script, b: Script) -> AsyncIterator[tuple[FakeServe, FakeServe]]:
    async with FakeServe(tmp_path / "a.sock", a) as node_a, FakeServe(tmp_path / "b.sock", b) as node_b:
        yield node_a, node_b


def test_proxy_failover_requests_spread_over_both_nodes(tmp_path: Path) -> None:
    async def body() -> None:
        async with _nodes(tmp_path, _echo, _echo) as (a, b):
            upstream = Upstream([UpstreamSpec(unix_path=a.path), UpstreamSpec(unix_path=b.path)])
            try:
                for _ in range(6):  # one at a time: both nodes idle each time, ties taken in turn
                    assert await answers(_send(upstream, "PUT", "/r/")) == [b"/r/0"]
                assert (_requests(a), _requests(b)) == (3, 3)
            finally:
                await upstream.close()

    asyncio.run(body())


def _send_as(upstream: Upstream, caller: int, path: str, count: int = 1) -> list[Sink]:
    sinks = [Sink() for _ in range(count)]
    for i, sink in enumerate(sinks):
        payload = f"GET {path}{i} HTTP/1.1\r\nhost: metadata\r\n\r\n".encode()
        upstream.request(payload, lambda r: r, sink, pipeline=True, affinity=caller)
    return sinks


def _callers_seen(serve: FakeServe) -> set[str]:
    return {m.decode() for _, data in serve.reads for m in re.findall(rb"GET /(c\d+)/", data)}


def test_proxy_failover_each_caller_keeps_to_one_node(tmp_path: Path) -> None:
    """Each caller's requests go to one node (its cache, tokens and rate limit live
    there), the callers spread over both; with its node down, a caller goes to the
    other, and only the callers of the node that went down move."""

    async def body() -> None:
        async with _nodes(tmp_path, _echo, _echo) as (a, b):
            upstream = Upstream([UpstreamSpec(unix_path=a.path), UpstreamSpec(unix_path=b.path)])
            try:
                for caller in range(40):
                    for _ in range(3):  # one at a time: both nodes idle, no tie to break by load
                        assert await answers(_send_as(upstream, caller, f"/c{caller}/")) == [f"/c{caller}/0".encode()]
                on_a, on_b = _callers_seen(a), _callers_seen(b)
                assert on_a and on_b and not on_a & on_b
                assert len(on_a | on_b) == 40
                a.reads.clear()
                b.reads.clear()
                upstream._pools[0].mark_down("test")
                for caller in range(40):
                    assert await answers(_send_as(upstream, caller, f"/c{caller}/")) == [f"/c{caller}/0".encode()]
                assert _callers_seen(b) == on_a | on_b and not a.reads
                upstream._pools[0].mark_up()
                b.reads.clear()
                for caller in range(40):
                    assert await answers(_send_as(upstream, caller, f"/c{caller}/")) == [f"/c{caller}/0".encode()]
                assert _callers_seen(a) == on_a and _callers_seen(b) == on_b
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_failover_the_proxy_sends_each_guest_to_one_node(tmp_path: Path) -> None:
    """Through a real proxy listener: every request of a guest (its address on the
    listener's network) reaches the same node, and the guests spread over both."""
    from meta169.http.listen import Binding
    from tests.integration.serving import get, proxy_in_process

    async def body() -> None:
        async with _nodes(tmp_path, _echo, _echo) as (a, b):
            upstream = Upstream([UpstreamSpec(unix_path=a.path), UpstreamSpec(unix_path=b.path)])
            with proxy_in_process(upstream, Binding("network", "net-a")) as address:
                for guest in range(2, 22):
                    for path in ("/openstack", "/latest/meta-data/", "/latest/meta-data/instance-id"):
                        status, _, _ = await asyncio.to_thread(get, address, path, source=f"127.0.0.{guest}")
                        assert status == 200
        seen = [
            set(re.findall(rb"(?i)x-meta169-caller-ip: (127\.0\.0\.\d+)", b"".join(d for _, d in node.reads)))
            for node in (a, b)
        ]
        assert seen[0] and seen[1] and not seen[0] & seen[1]
        assert len(seen[0] | seen[1]) == 20

    asyncio.run(body())


def test_proxy_failover_a_callers_node_takes_no_more_than_its_share(tmp_path: Path) -> None:
    """A node that answers slowly does not hold every request of its callers: once it
    has more than its share outstanding (bounded loads), they go to the other."""
    release = asyncio.Event()

    def slow(conn: int, index: int, request: bytes) -> Awaitable[bytes | None]:
        async def answer() -> bytes | None:
            await release.wait()
            return await _echo(conn, index, request)

        return answer()

    async def body() -> None:
        async with _nodes(tmp_path, slow, _echo) as (a, b):
            upstream = Upstream([UpstreamSpec(unix_path=a.path), UpstreamSpec(unix_path=b.path)])
            try:
                # A caller whose node is a (the first pool).
                caller = next(c for c in range(1000) if hash((c, 0)) > hash((c, 1)))
                sinks = _send_as(upstream, caller, "/c0/", 40)
                await asyncio.sleep(0.2)
                assert 0 < _requests(b) < 40  # its share stayed with a, the rest went to b
                release.set()
                assert await answers(sinks) == [f"/c0/{i}".encode() for i in range(40)]
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_failover_request_lost_on_one_node_is_answered_by_the_other(tmp_path: Path) -> None:
    async def body() -> None:
        metrics = ProxyMetrics()
        async with _nodes(tmp_path, _hang_up, _echo) as (a, b):
            upstream = Upstream([UpstreamSpec(unix_path=a.path), UpstreamSpec(unix_path=b.path)], metrics=metrics)
            try:
                gets = _send(upstream, "GET", "/g/", 6)  # pipelined, spread over both nodes
                puts = _send(upstream, "PUT", "/latest/api/token", 2)  # the IMDSv2 token PUT
                outcomes = await answers(gets + puts)
                assert outcomes == [f"/g/{i}".encode() for i in range(6)] + [
                    b"/latest/api/token0",
                    b"/latest/api/token1",
                ]
                assert _requests(a) > 0  # some went to the node that hangs up first
                assert metrics.retries.values[("lost",)] >= _requests(a)
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_failover_sent_post_is_never_sent_again(tmp_path: Path) -> None:
    async def body() -> None:
        async with _nodes(tmp_path, _hang_up, _hang_up) as (a, b):
            upstream = Upstream([UpstreamSpec(unix_path=a.path), UpstreamSpec(unix_path=b.path)])
            try:
                assert await answers(_send(upstream, "POST", "/openstack/latest/password")) == [502]
                assert _requests(a, b) == 1
                # A GET is tried once on each node, and no more.
                assert await answers(_send(upstream, "GET", "/latest/meta-data/")) == [502]
                assert [sum(data.count(b"GET ") for _, data in node.reads) for node in (a, b)] == [1, 1]
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_failover_unreachable_node_is_marked_down_and_skipped(tmp_path: Path) -> None:
    async def body() -> None:
        metrics = ProxyMetrics()
        async with FakeServe(tmp_path / "b.sock", _echo) as b:
            gone = UpstreamSpec(unix_path=tmp_path / "a.sock")  # nothing listens there
            upstream = Upstream([gone, UpstreamSpec(unix_path=b.path)], metrics=metrics)
            try:
                # A POST that could not be sent at all goes to the other node too.
                sinks = _send(upstream, "POST", "/p/", 2) + _send(upstream, "GET", "/g/", 4)
                assert await answers(sinks) == [b"/p/0", b"/p/1"] + [f"/g/{i}".encode() for i in range(4)]
                assert upstream.states() == [(f"unix:{gone.unix_path}", False), (f"unix:{b.path}", True)]
                connect_retries = metrics.retries.values[("connect",)]
                assert connect_retries >= 1
                # Marked down: the next requests do not try it at all.
                assert await answers(_send(upstream, "GET", "/h/", 4)) == [f"/h/{i}".encode() for i in range(4)]
                assert metrics.retries.values[("connect",)] == connect_retries
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_failover_health_check_marks_down_and_back_up(tmp_path: Path) -> None:
    async def silent(conn: int, index: int, request: bytes) -> bytes | None:
        await asyncio.sleep(30)
        return None

    async def until(upstream: Upstream, wanted: list[bool]) -> None:
        deadline = time.monotonic() + 5
        while [up for _, up in upstream.states()] != wanted:
            assert time.monotonic() < deadline, upstream.states()
            await asyncio.sleep(0.02)

    async def body() -> None:
        path_a = tmp_path / "a.sock"
        async with FakeServe(tmp_path / "b.sock", _echo) as b:
            spec_a = UpstreamSpec(unix_path=path_a, reply_timeout=0.3)
            upstream = Upstream([spec_a, UpstreamSpec(unix_path=b.path, reply_timeout=0.3)])
            upstream.start_checks(0.05)
            try:
                await until(upstream, [False, True])  # nothing listens at a: probe refused
                async with FakeServe(path_a, _echo) as a:
                    await until(upstream, [True, True])  # it answers now: back
                    probe = a.reads[0][1]
                    assert probe.startswith(b"GET /healthz HTTP/1.1\r\n") and b"x-meta169" not in probe.lower()
                    assert await answers(_send(upstream, "PUT", "/r/") + _send(upstream, "PUT", "/s/")) == [
                        b"/r/0",
                        b"/s/0",
                    ]
                path_a.unlink(missing_ok=True)
                async with FakeServe(path_a, silent):
                    await until(upstream, [False, True])  # accepts, never answers: down
            finally:
                await upstream.close()

    asyncio.run(body())


# -- real processes ----------------------------------------------------------------------

GUESTS = range(10, 26)
INVENTORY = guests_inventory(GUESTS, "fa:16:3e:00:02")


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def _metrics_port(lines: list[str]) -> int:
    for line in lines:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        if found:
            return int(found.group(1))
    raise AssertionError("no metrics listener in:\n" + "\n".join(lines))


def _serve(url: str, sock: Path, keys: Path) -> tuple[ServeProcess, int]:
    srv = start_serve(
        url,
        [f"unix:{sock}=proxy"],
        "--rate-limit",
        "0",
        "--token-key-file",
        str(keys),
        "--metrics-listen",
        "127.0.0.1:0",
    )
    return srv, _metrics_port(srv.log_lines)


@contextmanager
def _proxy(tmp_path: Path, socks: list[Path], port: int) -> Iterator[int]:
    """A ``meta169 proxy`` process to ``socks``, listening on 127.0.0.1:port for
    net-a; yields its metrics port."""
    log = tmp_path / "proxy.log"
    argv = meta169_argv("-v", "proxy", "--listen", f"127.0.0.1:{port}=network:net-a")
    for sock in socks:
        argv += ["--upstream", f"unix:{sock}"]
    argv += ["--upstream-check-interval", "0.2", "--metrics-listen", "127.0.0.1:0"]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while "listeners up" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield _metrics_port(log.read_text().splitlines())
    finally:
        stop(proc, 10)


async def _ask(port: int, guest: int, method: str, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request from 127.0.0.<guest>, on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{guest}", 0))
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0][9:12]), fields, body


async def _crawl(port: int, guest: int) -> list[str]:
    """What a booting guest asks, IMDSv2 first; the problems found (none: all good)."""
    problems = []
    status, _, token = await _ask(
        port, guest, "PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n"
    )
    if status != 200 or not token:
        problems.append(f"token PUT {status}")
    auth = f"X-aws-ec2-metadata-token: {token.decode()}\r\n"
    status, _, body = await _ask(port, guest, "GET", "/latest/meta-data/instance-id", auth)
    if (status, body) != (200, _uuid(guest).encode()):
        problems.append(f"instance-id {status} {body[:80]!r}")
    status, fields, body = await _ask(port, guest, "HEAD", "/latest/meta-data/instance-id", auth)
    if (status, body, fields.get("content-length")) != (200, b"", str(len(_uuid(guest)))):
        problems.append(f"HEAD {status}")
    status, _, body = await _ask(port, guest, "GET", "/openstack/latest/meta_data.json")
    if status != 200 or json.loads(body).get("uuid") != _uuid(guest):
        problems.append(f"meta_data.json {status} {body[:80]!r}")
    return problems


async def _load(port: int, crawls: int, *, at: int = -1, then: object = None) -> tuple[list[str], int]:
    """``crawls`` crawls, 24 at a time; ``then()`` (a coroutine function) once ``at``
    are done, while the others go on. Returns the problems and the crawls finished
    after ``then`` returned."""
    problems: list[str] = []
    done = 0
    after = 0
    fired = asyncio.Event()
    todo = iter(range(crawls))

    async def worker() -> None:
        nonlocal done, after
        for i in todo:
            problems.extend(await _crawl(port, GUESTS[i % len(GUESTS)]))
            done += 1
            if fired.is_set():
                after += 1
            if done == at and then is not None:
                await then()  # type: ignore[operator]
                fired.set()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(24))), 120)
    return problems, after


def test_proxy_failover_sigkill_of_one_node_fails_no_guest_request(tmp_path: Path) -> None:
    url = imported_registry(tmp_path, INVENTORY)
    keys = tmp_path / "token.keys"
    keys.write_text("1:" + "ab" * 32 + "\n")  # one key ring: a token from one node is good on the other
    keys.chmod(0o600)
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    node_a, metrics_a = _serve(url, sock_a, keys)
    node_b, metrics_b = _serve(url, sock_b, keys)
    restarted: ServeProcess | None = None
    port = free_port()
    try:
        with _proxy(tmp_path, [sock_a, sock_b], port) as proxy_metrics:
            answered_by_a_before = 0.0

            async def kill_a() -> None:
                nonlocal answered_by_a_before
                answered_by_a_before = total(
                    await asyncio.to_thread(scrape, metrics_a), "meta169_serve_requests_total", status="2xx"
                )
                os.kill(node_a.proc.pid, signal.SIGKILL)

            problems, after = asyncio.run(_load(port, 240, at=60, then=kill_a))
            assert problems == []
            assert node_a.proc.wait(5) == -signal.SIGKILL
            assert after > 100  # most of the load ran with node a dead
            assert answered_by_a_before > 0  # both nodes had their share before
            assert total(scrape(metrics_b), "meta169_serve_requests_total", status="2xx") > 0
            samples = scrape(proxy_metrics)
            assert value(samples, "meta169_proxy_upstream_up", upstream=f"unix:{sock_a}") == 0
            assert value(samples, "meta169_proxy_upstream_up", upstream=f"unix:{sock_b}") == 1
            # Both nodes had guests of their own; what node a left went to node b.
            replies_a = value(samples, "meta169_proxy_upstream_replies_total", upstream=f"unix:{sock_a}")
            replies_b = value(samples, "meta169_proxy_upstream_replies_total", upstream=f"unix:{sock_b}")
            assert 0 < replies_a < replies_b
            assert value(samples, "meta169_proxy_upstream_outstanding", upstream=f"unix:{sock_b}") == 0
            assert total(samples, "meta169_proxy_upstream_retries_total") >= 1
            assert total(samples, "meta169_proxy_upstream_errors_total") == 0

            # Node a comes back on the same socket: probed, marked up, given requests again.
            restarted, metrics_a = _serve(url, sock_a, keys)
            deadline = time.monotonic() + 10
            while value(scrape(proxy_metrics), "meta169_proxy_upstream_up", upstream=f"unix:{sock_a}") != 1:
                assert time.monotonic() < deadline, "node a never marked up again"
                time.sleep(0.1)
            problems, _ = asyncio.run(_load(port, 48))
            assert problems == []
            assert total(scrape(metrics_a), "meta169_serve_requests_total", status="2xx") > 0
    finally:
        for srv in (node_a, node_b, restarted):
            if srv is not None:
                srv.stop()
