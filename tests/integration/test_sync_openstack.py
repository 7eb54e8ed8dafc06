"""``meta169 sync openstack``: the real openstacksdk and keystoneauth, end to end,
against a loopback server answering with the API references' own samples
(tests/integration/openstack_cloud.py); once, and as a watch that re-reads the
cloud on a timer and runs as a service.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from meta169.cli import main
from meta169.errors import ConfigError, Conflict, Meta169Error, SourceError
from meta169.model import Caller, Instance, parse_ip
from meta169.registry import open_registry
from meta169.registry.memory import MemoryRegistry
from meta169.sources.openstack import WatchTiming, sync_openstack, watch_openstack
from meta169.sources.reconcile import SyncResult
from tests.integration.notify import Manager, manager_at
from tests.integration.openstack_cloud import (
    COMPUTE_PORT,
    NET1,
    NET2,
    PROJECT,
    ROUTER1,
    ROUTER2,
    FakeCloud,
    running_cloud,
    sample,
)
from tests.integration.serving import meta169_argv
from tests.processes import free_port, stop
from tests.scrape import Samples, fetch, parse, value


@pytest.fixture
def cloud(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    for name in [n for n in os.environ if n.startswith("OS_")]:
        monkeypatch.delenv(name)
    with running_cloud(tmp_path, getattr(request, "param", "2.52")) as fake:
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
        yield fake


SERVER_252 = "764e369e-a874-4401-b7ce-43e4760888da"


def test_sync_openstack_builds_networks_routers_and_servers_from_the_samples(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    result = sync_openstack(registry, "samples")
    assert result.source == "openstack:samples"
    # The SDK asked for the microversion this "Nova" advertised, for the servers.
    assert any(url.startswith(("/compute/v2.1/servers/detail", f"/compute/v2.1/{PROJECT}/servers/detail"))
               and asked == "2.52" for _m, url, asked in cloud.requests)  # fmt: skip
    assert any("os-keypairs" in url and "user_id=admin" in url for _m, url, _a in cloud.requests)

    net1, net2 = registry.get_network(NET1), registry.get_network(NET2)
    assert (net1.name, net1.project_id, net1.mtu, net1.source) == (
        "net1",
        "4fd44f30292945e481c7b8a0c8908869",
        1500,
        "openstack:samples",
    )
    v4, v6 = net1.subnets
    assert (str(v4.cidr), str(v4.gateway), v4.dhcp) == ("192.0.0.0/8", "192.0.0.1", True)
    assert (str(v6.cidr), v6.ipv6_mode, [str(d) for d in v6.dns]) == (
        "2001:db8:1::/64",
        "dhcpv6-stateless",
        ["2001:db8::53"],
    )
    assert [(str(r.destination), str(r.nexthop)) for r in v6.host_routes] == [("2001:db8:2::/64", "2001:db8:1::fe")]
    assert [str(s.cidr) for s in net2.subnets] == ["10.0.0.0/24"]
    assert registry.get_router(ROUTER1).network_ids == (NET2,)
    assert registry.get_router(ROUTER2).network_ids == ()

    server = registry.resolve(Caller(parse_ip("10.0.0.5"), router_id=ROUTER1))
    keypair = sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")["keypair"]
    assert server.uuid == SERVER_252
    assert (server.name, server.hostname, server.project_id, server.availability_zone, server.region) == (
        "new-server-test",
        "new-server-test",
        "6f70656e737461636b20342065766572",
        "us-west",
        "RegionOne",
    )
    assert (server.instance_type, server.image_id) == ("m1.tiny", "70a599e0-31e7-49b7-b260-868f441e862b")
    assert server.metadata == {"My Server Name": "Apache1"}
    assert server.user_data == base64.b64decode("IyEvYmluL2Jhc2gKL2Jpbi9zdQplY2hvICJJIGFtIGluIHlvdSEiCg==")
    assert server.tags == {"tag1": "", "tag2": ""}
    assert server.security_groups == ("default",)
    assert [(k.name, k.type, k.data) for k in server.keys] == [(keypair["name"], "ssh", keypair["public_key"])]
    assert server.created_at == datetime(2017, 2, 14, 19, 24, 42, tzinfo=UTC)
    assert [(p.id, p.network_id, p.mac, [str(i) for i in p.ips]) for p in server.ports] == [
        (COMPUTE_PORT, NET2, "fa:16:3e:11:11:5e", ["10.0.0.5"])
    ]
    assert server.source == "openstack:samples"

    revision = registry.revision()
    assert sync_openstack(registry, "samples").plan.changes == ()
    assert registry.revision() == revision


@pytest.mark.parametrize("cloud", ["2.16"], indirect=True)
def test_sync_openstack_before_2_47_looks_the_flavor_up(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    assert any("/flavors/detail" in url for _m, url, _a in cloud.requests)
    (server,) = registry.list_instances()
    assert server.instance_type == "m1.tiny"  # flavor "1" in the flavor list
    assert server.tags == {}  # tags came with 2.26
    assert server.user_data is not None


@pytest.mark.parametrize("cloud", [None], indirect=True)
def test_sync_openstack_negotiates_the_sdk_maximum_and_takes_the_non_admin_view(cloud: FakeCloud) -> None:
    # Nova's version sample advertises 2.104; the SDK asks for its own maximum, and
    # the sample made with 2.100 is a view without OS-EXT-SRV-ATTR:user_data.
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    (server,) = registry.list_instances()
    assert server.user_data is None
    assert server.hostname == "new-server-test"
    assert server.instance_type == "m1.tiny"


def test_sync_openstack_refuses_a_server_another_source_owns(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    registry.delete_instance(SERVER_252)
    registry.put_instance(Instance(uuid=SERVER_252, name="by-hand", source="admin"))
    revision = registry.revision()
    with pytest.raises(
        Conflict, match=rf"instance {SERVER_252} \(new-server-test\) from openstack:samples .* from admin"
    ):
        sync_openstack(registry, "samples")
    assert registry.revision() == revision


def test_sync_openstack_cli_dry_run_and_sync(cloud: FakeCloud, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    runner = CliRunner()
    dry = runner.invoke(main, ["--registry", url, "sync", "openstack", "--cloud", "samples", "--dry-run"])
    assert dry.exit_code == 2, dry.output  # a dry run creates no registry file
    done = runner.invoke(main, ["--registry", url, "sync", "openstack", "--cloud", "samples"])
    assert done.exit_code == 0, done.output
    assert f"openstack:samples: add instance {SERVER_252} (new-server-test)" in done.output
    dry = runner.invoke(main, ["--registry", url, "sync", "openstack", "--cloud", "samples", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: 0 to add, 0 to change, 0 to remove" in dry.output


def test_sync_openstack_unreachable_cloud_is_a_source_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCloud("2.52")  # never started: its port refuses
    fake.server.server_close()
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fake.clouds_yaml(tmp_path)))
    with pytest.raises(SourceError, match="openstack:samples: cannot"):
        sync_openstack(MemoryRegistry(), "samples")
    result = CliRunner().invoke(main, ["--registry", "memory://", "sync", "openstack", "--cloud", "samples"])
    assert result.exit_code == 5, result.output


# -- a cloud that does not answer ----------------------------------------------------------------


@pytest.mark.parametrize(("clouds_yaml", "ours"), [(None, 1.0), (1, 300.0)], ids=["default", "clouds.yaml"])
def test_sync_openstack_api_that_never_answers_fails_within_its_timeout(
    cloud: FakeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clouds_yaml: int | None, ours: float
) -> None:
    """Nova accepts the servers list and never answers: the sync fails as a source
    error after the request timeout (clouds.yaml's api_timeout when it sets one, else
    meta169's default), where openstacksdk alone waits for ever."""
    from meta169.sources import openstack as os_source

    if clouds_yaml is not None:
        path = tmp_path / "clouds.yaml"
        path.write_text(path.read_text() + f"    api_timeout: {clouds_yaml}\n")
    monkeypatch.setattr(os_source, "API_TIMEOUT_S", ours)
    cloud.stalled.add("/servers/detail")
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"openstack:samples: cannot .*timed out"):
        sync_openstack(MemoryRegistry(), "samples")
    assert time.monotonic() - started < 20
    cloud.release.set()
    cloud.stalled.clear()
    assert sync_openstack(MemoryRegistry(), "samples").changed


# -- a cell that does not answer ------------------------------------------------------------------


@pytest.mark.parametrize("cloud", [None], indirect=True)
def test_sync_openstack_a_cell_that_does_not_answer_keeps_its_servers_instances(
    cloud: FakeCloud, caplog: pytest.LogCaptureFixture
) -> None:
    registry = MemoryRegistry()
    sync_openstack(registry, "samples")
    before = registry.get_instance(cloud.server_id)
    revision = registry.revision()
    # Nova lists the server without its name, addresses or anything else: not a
    # server gone, a partial read.
    cloud.cell_down = True
    with caplog.at_level(logging.WARNING, "meta169.sources.openstack"):
        result = sync_openstack(registry, "samples")
    assert result.plan.changes == ()
    assert registry.revision() == revision
    assert registry.get_instance(cloud.server_id) == before
    assert "1 servers are in a Nova cell that does not answer" in caplog.text
    # Once the cell answers and the server is really gone, it goes.
    cloud.cell_down, cloud.servers_gone = False, True
    gone = sync_openstack(registry, "samples")
    assert [str(c) for c in gone.plan.changes] == [f"remove instance {before.uuid} ({before.name})"]


# -- the watch ----------------------------------------------------------------------------------


def _wait(condition: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.02)


class Watcher:
    """watch_openstack in a thread; its results and its errors, with when they came."""

    def __init__(self, registry: MemoryRegistry, timing: WatchTiming) -> None:
        self.stop = threading.Event()
        self.results: list[SyncResult] = []
        self.errors: list[tuple[float, Meta169Error]] = []
        self.thread = threading.Thread(
            target=watch_openstack,
            args=(registry, "samples"),
            kwargs={
                "stop": self.stop,
                "on_result": self.results.append,
                "on_error": lambda exc: self.errors.append((time.monotonic(), exc)),
                "timing": timing,
            },
            daemon=True,
        )

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def _instances(registry: MemoryRegistry) -> set[str]:
    return {i.uuid for i in registry.list_instances()}


def test_sync_openstack_watch_resyncs_on_its_interval_on_one_connection(cloud: FakeCloud) -> None:
    registry = MemoryRegistry()
    with Watcher(registry, WatchTiming(interval=0.2)) as watcher:
        _wait(lambda: watcher.results, 20)
        assert _instances(registry) == {SERVER_252}
        cloud.servers_gone = True
        _wait(lambda: not _instances(registry), 10)
        synced = len(watcher.results)
        _wait(lambda: len(watcher.results) >= synced + 2, 10)  # and again, writing nothing
    assert watcher.errors == []
    assert [str(c) for r in watcher.results for c in r.plan.changes if c.kind == "instance"] == [
        f"add instance {SERVER_252} (new-server-test)",
        f"remove instance {SERVER_252} (new-server-test)",
    ]
    # One connection, one token, however many syncs.
    assert sum(1 for method, url, _ in cloud.requests if method == "POST" and "auth/tokens" in url) == 1


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param({"failing": {"/servers/detail": 503}}, id="servers-unavailable"),
        pytest.param({"failing": {"/v2.0/ports": 500}}, id="ports-fail"),
        pytest.param({"fail_second_page": True}, id="servers-fail-on-page-2"),
    ],
)
def test_sync_openstack_watch_a_failed_read_removes_nothing_and_backs_off(
    cloud: FakeCloud, breakage: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    registry = MemoryRegistry()
    with (
        caplog.at_level(logging.WARNING, "meta169.sources.openstack"),
        Watcher(registry, WatchTiming(interval=0.2, backoff_limit=1.6)) as watcher,
    ):
        _wait(lambda: watcher.results, 20)
        before, revision = registry.get_instance(SERVER_252), registry.revision()
        for knob, value in breakage.items():
            setattr(cloud, knob, value)
        _wait(lambda: len(watcher.errors) >= 4, 20)
        # Nothing written, nothing removed: the instance keeps its ports and keys.
        assert registry.revision() == revision
        assert registry.get_instance(SERVER_252) == before
        cloud.failing, cloud.fail_second_page = {}, False
        synced = len(watcher.results)
        _wait(lambda: len(watcher.results) > synced, 20)
    assert all(isinstance(exc, SourceError) and "openstack:samples: cannot list" in str(exc)
               for _, exc in watcher.errors), watcher.errors  # fmt: skip
    # Waits of 0.2, 0.4, 0.8 s between attempts (each plus the attempt itself).
    times = [at for at, _ in watcher.errors]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[2] > gaps[0] + 0.4, gaps
    assert (
        "openstack:samples: cannot sync; 1 failed in a row, nothing written or removed; next attempt in 0.2 s"
        in caplog.text
    )
    assert (
        "openstack:samples: cannot sync; 3 failed in a row, nothing written or removed; next attempt in 0.8 s"
        in caplog.text
    )
    assert registry.get_instance(SERVER_252) == before


def test_sync_openstack_watch_unknown_cloud_is_a_configuration_error(cloud: FakeCloud) -> None:
    with pytest.raises(ConfigError, match="no-such-cloud"):
        watch_openstack(
            MemoryRegistry(),
            "no-such-cloud",
            stop=threading.Event(),
            on_result=lambda _r: None,
            on_error=lambda _e: None,
        )


def test_sync_openstack_watch_service_ready_after_its_first_success_with_metrics(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.failing = {"/v2.0/networks": 503}  # Neutron is not up yet
    url = f"sqlite://{tmp_path / 'registry.db'}"
    port = free_port()
    log = tmp_path / "sync.log"
    argv = meta169_argv(
        "--registry", url, "sync", "openstack", "--cloud", "samples", "--watch", "--interval", "3600",
        "--metrics-listen", f"127.0.0.1:{port}",
    )  # fmt: skip
    with manager_at(tmp_path / "notify") as manager, log.open("wb") as out:
        env = {**os.environ, "NOTIFY_SOCKET": str(manager.path)}
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            waiting = _status_containing(manager, proc, log, "waiting for a first successful sync")
            assert "openstack:samples: cannot list networks" in waiting["STATUS"], waiting
            assert not [m for m in manager.messages if "READY" in m]
            status, _, body = fetch(port, "/readyz")
            assert status == 503 and b"cannot list networks" in body
            assert value(scrape(port), "meta169_sync_runs_total", outcome="failed") == 1
            # Neutron answers; SIGHUP syncs at once instead of in an hour.
            cloud.failing = {}
            proc.send_signal(signal.SIGHUP)
            ready = manager.wait_for("READY", proc, log)
            assert re.fullmatch(r"openstack:samples in sync at registry revision \d+", ready["STATUS"]), ready
            # At READY=1 the registry is filled.
            registry = open_registry(url)
            try:
                assert {i.uuid for i in registry.list_instances()} == {SERVER_252}
            finally:
                registry.close()
            assert fetch(port, "/readyz")[0] == 200
            metrics = scrape(port)
            assert value(metrics, "meta169_sync_runs_total", outcome="changed") == 1
            assert value(metrics, "meta169_sync_objects_total", action="add", kind="instance") == 1
            assert value(metrics, "meta169_sync_objects_total", action="add", kind="network") == 2
            assert value(metrics, "meta169_sync_up") == 1
            assert abs(value(metrics, "meta169_sync_last_success_timestamp_seconds") - time.time()) < 60
            assert next(labels for name, labels in metrics if name == "meta169_info") >= {("role", "sync")}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()
        finally:
            stop(proc)
        stopping = manager.drain()
    assert any(m.get("STOPPING") == "1" for m in stopping), stopping
    assert f"openstack:samples: add instance {SERVER_252} (new-server-test)" in log.read_text()


def scrape(port: int) -> Samples:
    status, _, body = fetch(port, "/metrics")
    assert status == 200
    return parse(body.decode())


def _status_containing(manager: Manager, proc: subprocess.Popen[bytes], log: Path, text: str) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fields = manager.wait_for("STATUS", proc, log, timeout=max(0.1, deadline - time.monotonic()))
        if text in fields["STATUS"]:
            return fields
    pytest.fail(f"no STATUS with {text!r}: {manager.messages}")
