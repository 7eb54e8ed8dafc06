"""serve while its PostgreSQL registry goes away and comes back, under load.

The test stops the real server (``pg_ctl stop -m fast``) while a client keeps asking
for cached instances, and starts it again. Cached callers keep getting 200 (stale,
counted), a caller serve has not cached gets 503 with Retry-After at once (never
404: cloud-init would give up on the datasource), /readyz says the registry is
down, and once PostgreSQL is back the same serve, never restarted, answers the new
caller and serves a change written after the recovery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from meta169.api.config import ServeConfig
from meta169.api.server import RunningServer, start
from meta169.http.limits import Limits
from meta169.http.listen import Binding, ListenAddress, ListenerSpec
from meta169.model import Instance, Network, Port, Subnet, parse_ip
from meta169.registry import Registry, open_registry
from tests.integration.conftest_postgres import PostgresServer, _run_as
from tests.integration.serving import get
from tests.scrape import fetch, scrape, value

pytestmark = pytest.mark.postgres

CACHED = {"127.0.0.1": "11111111-1111-4111-8111-111111111111", "127.0.0.2": "22222222-2222-4222-8222-222222222222"}
UNCACHED = ("127.0.0.3", "33333333-3333-4333-8333-333333333333")
DOC = "/openstack/latest/meta_data.json"


def _instance(ip: str, uuid: str, name: str = "") -> Instance:
    mac = f"fa:16:3e:00:00:{int(ip.rsplit('.', 1)[1]):02x}"
    return Instance(
        uuid=uuid, name=name or f"vm-{ip}", project_id="proj-a", ports=(Port("net-a", mac, (parse_ip(ip),)),)
    )


def _pg_ctl(server: PostgresServer, *args: str) -> None:
    argv = [str(server.bindir / "pg_ctl"), *args, "-D", str(server.datadir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **_run_as())
    assert done.returncode == 0, done.stderr


@pytest.fixture
def registry(postgres_url: str) -> Iterator[Registry]:
    reg = open_registry(postgres_url)
    subnet = Subnet(cidr=ipaddress.ip_network("127.0.0.0/24"), gateway=parse_ip("127.0.0.254"))
    reg.put_network(Network(id="net-a", project_id="proj-a", subnets=(subnet,)))
    for ip, uuid in (*CACHED.items(), UNCACHED):
        reg.put_instance(_instance(ip, uuid))
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def serve(postgres_url: str) -> Iterator[Callable[..., RunningServer]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: list[RunningServer] = []

    def boot(**changes: object) -> RunningServer:
        config = ServeConfig(
            registry_url=postgres_url,
            listeners=(ListenerSpec(ListenAddress("127.0.0.1", 0), Binding("network", "net-a")),),
            limits=Limits(request_timeout=5.0, keepalive_timeout=2.0),
            poll_interval=0.2,
            metrics_listen=ListenAddress("127.0.0.1", 0),
            rate_limit=None,
        )
        config = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
        running = asyncio.run_coroutine_threadsafe(start(config), loop).result(10)
        started.append(running)
        return running

    try:
        yield boot
    finally:
        for running in started:
            asyncio.run_coroutine_threadsafe(running.close(), loop).result(10)
            running.cache.registry.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class Load:
    """A client asking for the cached instances over and over, on a thread."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for ip, uuid in CACHED.items():
                started = time.monotonic()
                try:
                    status, _, body = get(self.address, DOC, source=ip)
                except OSError as exc:  # a timeout (5 s) included: a hang
                    self.errors.append(f"{ip}: {exc!r}")
                    continue
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.statuses[status] += 1
                if status == 200 and json.loads(body)["uuid"] != uuid:
                    self.errors.append(f"{ip}: another instance's document")
            time.sleep(0.005)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _ready_checks(port: int) -> tuple[int, dict[str, dict[str, object]]]:
    status, _, body = fetch(port, "/readyz")
    return status, json.loads(body)["checks"]


def test_registry_outage_serves_cached_refuses_uncached_and_recovers(
    registry: Registry,
    serve: Callable[..., RunningServer],
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="meta169.cache")
    # Without rendering ahead: the third instance stays uncached until asked.
    running = serve(prerender=False)
    address = (running.addresses[0].host, running.addresses[0].port)
    assert running.ops is not None
    mport = running.ops.address.port
    _until("the first poll", lambda: value(scrape(mport), "meta169_serve_registry_polls_total", result="ok") >= 1)
    for ip in CACHED:
        assert get(address, DOC, source=ip)[0] == 200
    with Load(address) as load:
        time.sleep(0.3)
        _pg_ctl(postgres_server, "stop", "-m", "fast", "-w")
        try:
            _until("registry down", lambda: value(scrape(mport), "meta169_serve_registry_up") == 0)
            started = time.monotonic()
            status, headers, _ = get(address, DOC, source=UNCACHED[0])
            assert status == 503, "an uncached caller must get 503, never 404, while the registry is down"
            assert int(headers["retry-after"]) >= 1
            assert time.monotonic() - started < 2.0
            status, checks = _ready_checks(mport)
            assert status == 503 and checks["registry"]["ok"] is False
            time.sleep(1.0)  # cached callers keep being served meanwhile
        finally:
            _pg_ctl(
                postgres_server, "start", "-w", "-t", "30", "-l", str(postgres_server.datadir.parent / "postgres.log")
            )
        _until("the uncached caller served", lambda: get(address, DOC, source=UNCACHED[0])[0] == 200)
        assert json.loads(get(address, DOC, source=UNCACHED[0])[2])["uuid"] == UNCACHED[1]
        # A change written after the recovery is served, by the same process.
        ip, uuid = next(iter(CACHED.items()))
        registry.put_instance(_instance(ip, uuid, name="after-recovery"))
        _until("the change served", lambda: json.loads(get(address, DOC, source=ip)[2])["name"] == "after-recovery")
        time.sleep(0.3)
    assert load.errors == []
    assert set(load.statuses) == {200}, load.statuses
    assert load.slowest < 2.0
    samples = scrape(mport)
    assert value(samples, "meta169_serve_registry_up") == 1
    assert value(samples, "meta169_serve_stale_answers_total") > 0
    _until("ready again", lambda: _ready_checks(mport)[0] == 200)
    said = [r.getMessage() for r in caplog.records if r.name == "meta169.cache"]
    assert sum("registry unreachable" in m for m in said) == 1, said
    assert sum("registry reachable again" in m for m in said) == 1, said


def test_registry_outage_sites_rendered_ahead_are_served(
    registry: Registry, serve: Callable[..., RunningServer], postgres_server: PostgresServer
) -> None:
    # Rendered ahead (the default), an instance no guest asked for yet is cached too.
    running = serve()
    address = (running.addresses[0].host, running.addresses[0].port)
    _until("every site rendered ahead", lambda: running.cache.site_count == 3)
    _pg_ctl(postgres_server, "stop", "-m", "fast", "-w")
    try:
        _until("registry down", lambda: not running.cache.registry_up)
        for ip, uuid in (*CACHED.items(), UNCACHED):
            status, _, body = get(address, DOC, source=ip)
            assert status == 200 and json.loads(body)["uuid"] == uuid
        assert get(address, DOC, source="127.0.0.9")[0] == 503  # nobody's: not known, not 404
    finally:
        _pg_ctl(postgres_server, "start", "-w", "-t", "30", "-l", str(postgres_server.datadir.parent / "postgres.log"))
    _until("registry up", lambda: running.cache.registry_up)
