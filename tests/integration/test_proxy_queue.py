"""When every connection the proxy may open to serve is busy, requests wait in one
FIFO queue instead of being refused: a freed connection takes the first waiting
request (and the GETs right behind it, pipelined), a request still waiting at its
deadline gets 504, and only a full queue answers 503. Scripted Unix-socket servers
play serve where timing must be exact; a real serve behind a tiny pool shows a burst
of guests all answered."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from pathlib import Path

from meta169.http.listen import Binding
from meta169.metrics.instruments import ProxyMetrics
from meta169.proxy.upstream import PIPELINE_DEPTH, Upstream, UpstreamSpec
from tests.integration.serving import ServeProcess, guests_inventory, imported_registry, proxy_in_process, start_serve
from tests.integration.test_proxy_pipeline import FakeServe, Sink, answers


def _reply(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _request(n: int, method: str = "GET") -> bytes:
    return f"{method} /r/{n} HTTP/1.1\r\nhost: metadata\r\n\r\n".encode()


def _slow(seconds: float):  # type: ignore[no-untyped-def]
    def script(conn: int, index: int, request: bytes) -> Awaitable[bytes | None]:
        async def answer() -> bytes | None:
            await asyncio.sleep(seconds)
            return _reply(request.split(b" ")[1])

        return answer()

    return script


def _send(upstream: Upstream, numbers: range, *, method: str = "GET") -> list[Sink]:
    """Issue requests from one callback, as requests read in one loop iteration are."""
    sinks = [Sink() for _ in numbers]
    for n, sink in zip(numbers, sinks, strict=True):
        upstream.request(_request(n, method), lambda r: r, sink, pipeline=method == "GET")
    return sinks


def _order(serve: FakeServe) -> list[int]:
    """The request numbers in the order serve read them."""
    return [int(n) for _, data in serve.reads for n in re.findall(rb"/r/(\d+)", data)]


def test_proxy_queue_full_pool_waits_in_fifo_order(tmp_path: Path) -> None:
    async def body() -> None:
        metrics = ProxyMetrics()
        async with FakeServe(tmp_path / "serve.sock", _slow(0.02)) as serve:
            upstream = Upstream(UpstreamSpec(unix_path=serve.path, max_connections=1), metrics=metrics)
            try:
                sinks = _send(upstream, range(6), method="PUT")  # PUTs: one on a connection at a time
                assert upstream.waiting() == 5
                assert await answers(sinks) == [f"/r/{n}".encode() for n in range(6)]
                assert serve.connections == 1
                assert _order(serve) == list(range(6))  # first come, first served
                counts = metrics.queue_wait.series[()]
                assert sum(counts[:-1]) == 5 and counts[-1] > 0  # five waited, for some time
                assert metrics.upstream_errors.values == {("502",): 0, ("503",): 0, ("504",): 0}
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_queue_freed_connection_takes_waiting_gets_as_one_pipeline(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeServe(tmp_path / "serve.sock", _slow(0.05)) as serve:
            upstream = Upstream(UpstreamSpec(unix_path=serve.path, max_connections=1))
            try:
                first = _send(upstream, range(1), method="PUT")
                await asyncio.sleep(0.01)  # the PUT is on the only connection
                gets = _send(upstream, range(1, 1 + PIPELINE_DEPTH + 2))
                assert await answers(first + gets) == [f"/r/{n}".encode() for n in range(PIPELINE_DEPTH + 3)]
                # Once the PUT's reply came, the waiting GETs left PIPELINE_DEPTH to a write.
                batches = [len(re.findall(rb"GET ", data)) for _, data in serve.reads[1:]]
                assert batches[0] == PIPELINE_DEPTH and sum(batches) == PIPELINE_DEPTH + 2, batches
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_queue_request_still_waiting_at_its_deadline_is_504(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeServe(tmp_path / "serve.sock", _slow(30)) as serve:
            spec = UpstreamSpec(unix_path=serve.path, max_connections=1, reply_timeout=0.3)
            upstream = Upstream(spec)
            try:
                sinks = _send(upstream, range(3), method="PUT")
                assert await answers(sinks) == [504, 504, 504]
                assert upstream.waiting() == 0
            finally:
                await upstream.close()

    asyncio.run(body())


def test_proxy_queue_full_queue_is_503_at_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeServe(tmp_path / "serve.sock", _slow(0.05)) as serve:
            upstream = Upstream(UpstreamSpec(unix_path=serve.path, max_connections=1), queue_limit=2)
            try:
                sinks = _send(upstream, range(5), method="PUT")
                assert [s.outcome.done() for s in sinks] == [False, False, False, True, True]
                assert await answers(sinks) == [b"/r/0", b"/r/1", b"/r/2", 503, 503]
            finally:
                await upstream.close()

    asyncio.run(body())


INVENTORY = guests_inventory(range(10, 30), "fa:16:3e:00:01")


def test_proxy_queue_burst_through_a_tiny_pool_all_answered(tmp_path: Path) -> None:
    """Twenty guests boot at once, each with an IMDSv2 token PUT (a connection of its
    own) and GETs, through a pool of 4 connections to a real serve: every request is
    answered 200, none 503."""
    url = imported_registry(tmp_path, INVENTORY)
    sock = tmp_path / "serve.sock"
    srv: ServeProcess = start_serve(url, [f"unix:{sock}=proxy"], "--rate-limit", "0")
    upstream = Upstream(UpstreamSpec(unix_path=sock, max_connections=4))

    async def guest(address: tuple[str, int], n: int) -> list[tuple[int, bytes]]:
        out = []
        for method, path, extra in [
            ("PUT", "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n"),
            ("GET", "/latest/meta-data/instance-id", ""),
            ("GET", "/openstack", ""),
        ]:
            reader, writer = await asyncio.open_connection(*address, local_addr=(f"127.0.0.{n}", 0))
            try:
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
                data = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            out.append((int(head[9:12]), body))
        return out

    async def storm(address: tuple[str, int]) -> list[list[tuple[int, bytes]]]:
        return await asyncio.gather(*(guest(address, n) for n in range(10, 30) for _ in range(3)))

    try:
        with proxy_in_process(upstream, Binding("network", "net-a")) as address:
            crawls = asyncio.run(storm(address))
    finally:
        srv.stop()
    statuses = [status for crawl in crawls for status, _ in crawl]
    assert statuses == [200] * 180, sorted(set(statuses))
    ids = [crawl[1][1] for crawl in crawls]
    assert ids == [f"00000000-0000-4000-8000-{n:012d}".encode() for n in range(10, 30) for _ in range(3)]
