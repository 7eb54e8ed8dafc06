"""serve's metrics, health endpoints and access log over real loopback sockets: each
metric family moves after the request that should move it."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meta169.api.config import ServeConfig
from meta169.api.ratelimit import RateLimit
from meta169.api.server import RunningServer, start
from meta169.http import wire
from meta169.http.limits import Limits
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.logs import ACCESS_LOGGER
from meta169.registry.memory import MemoryRegistry
from tests.capabilities import require
from tests.integration.serving import get, metrics_after_first_poll
from tests.integration.test_serve_http import UUID, _registry
from tests.scrape import fetch, scrape, total, value

DOC = "/latest/meta-data/instance-id"
Serve = Callable[..., RunningServer]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start serve (network listener net-a and a proxy Unix socket, metrics on) on a
    loop in a thread; returns the running server."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: list[RunningServer] = []

    def boot(registry: MemoryRegistry | None = None, **changes: object) -> RunningServer:
        config = ServeConfig(
            registry_url="memory://",
            listeners=(
                ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),
                ListenerSpec(ListenAddress(unix_path=tmp_path / f"proxy{len(started)}.sock"), Binding("proxy")),
            ),
            limits=Limits(request_timeout=2.0, keepalive_timeout=2.0),
            poll_interval=0.05,
            metrics_listen=ListenAddress("127.0.0.1", 0),
        )
        config = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
        reg = registry if registry is not None else _registry()
        running = asyncio.run_coroutine_threadsafe(start(config, registry=reg), loop).result(10)
        started.append(running)
        return running

    try:
        yield boot
    finally:
        for running in started:
            asyncio.run_coroutine_threadsafe(running.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _ports(running: RunningServer) -> tuple[tuple[str, int], int]:
    """The listener's and the metrics' addresses, once the first registry poll is
    done (a lookup that overlaps it is served but not cached: it would miss twice)."""
    return ("127.0.0.1", running.addresses[0].port), metrics_after_first_poll(running)


def test_metrics_serve_counts_each_family(serve: Serve) -> None:
    addr, mport = _ports(serve())
    before = scrape(mport)
    assert value(before, "meta169_metrics_processes") == 1
    assert value(before, "meta169_info", role="serve", version=next(iter(_versions(before)))) == 1
    for _ in range(3):
        assert get(addr, DOC)[0] == 200
    assert get(addr, "/openstack/latest/user_data")[0] == 200
    status, _, _ = get(addr, "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    assert get(addr, "/latest/api/token", method="PUT")[0] == 400  # no TTL
    assert get(addr, DOC, headers={"X-aws-ec2-metadata-token": "not-a-token"})[0] == 401
    assert get(addr, DOC, source="127.0.0.9")[0] == 404  # no instance has 127.0.0.9
    after = scrape(mport)

    # the first GET is the Python path's, the repeats the compiled path's
    assert value(after, "meta169_serve_requests_total", tree="ec2", kind="document", status="2xx", path="python") == 1
    fast = value(after, "meta169_serve_requests_total", tree="ec2", kind="document", status="2xx", path="fast")
    assert fast == (2 if wire.compiled() else 0)
    assert (
        value(after, "meta169_serve_requests_total", tree="openstack", kind="user-data", status="2xx", path="python")
        == 1
    )
    assert value(after, "meta169_serve_requests_total", tree="ec2", kind="token", status="2xx", path="python") == 1
    assert value(after, "meta169_serve_requests_total", tree="ec2", kind="token", status="4xx", path="python") == 1
    assert value(after, "meta169_serve_tokens_issued_total") == 1
    assert value(after, "meta169_serve_tokens_refused_total", reason="ttl") == 1
    assert value(after, "meta169_serve_tokens_refused_total", reason="invalid") == 1
    assert value(after, "meta169_serve_unknown_callers_total", reason="unknown") == 1
    assert value(after, "meta169_serve_site_cache_lookups_total", result="miss") == 2  # 127.0.0.1, then 127.0.0.9
    assert value(after, "meta169_serve_site_cache_lookups_total", result="hit") >= 4
    # 127.0.0.9 (no site rendered ahead names it) was read from the registry, on its thread
    assert value(after, "meta169_serve_registry_read_duration_seconds_count", via="thread") >= 1
    # every request is in the histogram once, whichever path answered it
    answered = total(after, "meta169_serve_requests_total")
    assert total(after, "meta169_serve_request_duration_seconds_count") == answered == 8
    assert value(after, "meta169_serve_registry_polls_total", result="ok") >= 1
    assert value(after, "meta169_serve_registry_revision") >= 1
    assert 0 <= value(after, "meta169_serve_registry_poll_age_seconds") < 5


def _versions(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {dict(labels)["version"] for name, labels in samples if name == "meta169_info"}


def test_metrics_serve_fast_path_counts_in_c(serve: Serve) -> None:
    require("compiled fast path", wire.compiled(), "meta169.http._wire was not built")
    running = serve()
    addr, mport = _ports(running)
    assert running.metrics is not None and running.metrics.fast_paths
    conn = http.client.HTTPConnection(*addr, timeout=5)
    try:
        for _ in range(5):  # one connection: after the first, each is the compiled path's
            conn.request("GET", "/openstack/latest/meta_data.json")
            assert conn.getresponse().read()
    finally:
        conn.close()
    samples = scrape(mport)
    labels = {"tree": "openstack", "kind": "document", "status": "2xx"}
    assert value(samples, "meta169_serve_requests_total", **labels, path="fast") == 4
    assert value(samples, "meta169_serve_requests_total", **labels, path="python") == 1
    assert value(samples, "meta169_serve_request_duration_seconds_count", path="fast") == 4
    # reading the C counters adds them to the scrape, never to the Python path's counts
    again = scrape(mport)
    assert value(again, "meta169_serve_requests_total", **labels, path="fast") == 4


def test_metrics_serve_rate_limited(serve: Serve) -> None:
    addr, mport = _ports(serve(rate_limit=RateLimit(rate=0.01, burst=2)))
    statuses = [get(addr, DOC)[0] for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    samples = scrape(mport)
    assert value(samples, "meta169_serve_rate_limited_total") == 2
    assert value(samples, "meta169_serve_requests_total", tree="ec2", kind="document", status="4xx", path="python") == 2


def test_metrics_serve_healthz_and_readyz(serve: Serve) -> None:
    running = serve()
    _, mport = _ports(running)
    assert fetch(mport, "/healthz")[::2] == (200, b"ok\n")
    status, ctype, body = fetch(mport, "/readyz")
    assert (status, ctype) == (200, "application/json")
    report = json.loads(body)
    assert report["ready"] is True and report["checks"]["registry"]["ok"] is True
    # a failing check: 503 with that check's detail in the JSON
    running.health.set("registry", False, "the last poll failed: database is locked")
    status, _, body = fetch(mport, "/readyz")
    report = json.loads(body)
    assert status == 503 and report["ready"] is False
    assert report["checks"]["registry"] == {
        "ok": False,
        "detail": "the last poll failed: database is locked",
        "since": report["checks"]["registry"]["since"],
    }
    assert fetch(mport, "/healthz")[0] == 200  # alive all the same
    assert fetch(mport, "/nothing")[0] == 404
    assert fetch(mport, "/metrics", method="POST")[0] == 405


def test_metrics_serve_access_log_every_request(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    addr, _ = _ports(serve(access_log_sample=1.0))
    # The access log does not depend on the loggers' level (the handler takes all).
    caplog.set_level(logging.WARNING)
    caplog.handler.setLevel(logging.NOTSET)
    for _ in range(3):
        assert get(addr, DOC)[0] == 200
    assert get(addr, "/nope")[0] == 404
    lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    fields = [r.__dict__["fields"] for r in lines]
    assert [(f["path"], f["status"]) for f in fields] == [(DOC, 200)] * 3 + [("/nope", 404)]
    assert [f["via"] for f in fields] == ["python", *(["fast"] * 2 if wire.compiled() else ["python"] * 2), "python"]
    for f in fields:
        assert (f["caller"], f["network"], f["router"], f["instance"], f["method"]) == (
            "127.0.0.1",
            "net-a",
            "",
            UUID,
            "GET",
        )
        assert f["bytes"] == (36 if f["status"] == 200 else 10) and f["duration"] >= 0


def test_metrics_serve_access_log_sample_zero_logs_nothing(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    addr, _ = _ports(serve(access_log_sample=0.0))
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        assert get(addr, DOC)[0] == 200
    assert [r for r in caplog.records if r.name == ACCESS_LOGGER] == []


def test_metrics_serve_access_log_names_the_stamped_caller(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind the proxy the caller and scope come from the stamp, on both paths."""
    running = serve(access_log_sample=1.0)
    _ports(running)
    sock_path = running.addresses[1].unix_path
    assert sock_path is not None
    request = (
        b"GET " + DOC.encode() + b" HTTP/1.1\r\nhost: metadata\r\n"
        b"x-meta169-caller-ip: 127.0.0.1\r\nx-meta169-network-id: net-a\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        for _ in range(2):
            s.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n\r\n" + UUID.encode()):
                chunk = s.recv(4096)
                assert chunk, reply
                reply += chunk
    fields = [r.__dict__["fields"] for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [(f["caller"], f["network"], f["instance"]) for f in fields] == [("127.0.0.1", "net-a", UUID)] * 2
    assert [f["via"] for f in fields] == ["python", "fast" if wire.compiled() else "python"]
