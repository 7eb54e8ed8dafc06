"""``meta169 sync libvirt`` against a real libvirtd: domains defined and undefined
through the real API, their metadata, DHCP leases, events and reconnects.

The daemon is Debian's libvirtd, private to this module (tests/integration/
libvirt_daemon.py): its qemu driver in session mode, as 'nobody', everything under a
temporary directory. Networks are defined, never started, so no bridge is made.
"""

from __future__ import annotations

import base64
import itertools
import os
import signal
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meta169.cli import main
from meta169.errors import Conflict, InventoryError, Meta169Error
from meta169.model import Caller, Instance, Network, Port, SSHKey, Subnet, parse_ip, parse_network
from meta169.registry import Registry, open_registry
from meta169.registry.memory import MemoryRegistry
from meta169.sources import libvirt as lv
from meta169.sources.reconcile import SyncResult
from tests.integration import libvirt_daemon as daemons
from tests.integration.notify import manager_at
from tests.integration.serving import meta169_argv, run_cli
from tests.processes import stop

NS = lv.NAMESPACE
_names = itertools.count(1)


@pytest.fixture(scope="module")
def daemon() -> Iterator[daemons.LibvirtDaemon]:
    with daemons.libvirt_daemon() as started:
        yield started


@pytest.fixture
def conn(daemon: daemons.LibvirtDaemon) -> Iterator[Any]:
    import libvirt

    connection = libvirt.open(daemon.uri)
    try:
        yield connection
    finally:
        # Each test leaves the daemon as it found it.
        for dom in connection.listAllDomains():
            dom.undefineFlags(0)
        for net in connection.listAllNetworks():
            net.undefine()
        connection.close()


def _network(conn: Any, daemon: daemons.LibvirtDaemon, hosts: str = "") -> tuple[str, str]:
    n = next(_names)
    name, bridge = f"m169net{n}", f"m169br{n}"
    conn.networkDefineXML(
        f"""<network><name>{name}</name><bridge name='{bridge}'/><forward mode='nat'/>
        <ip address='10.55.{n}.1' netmask='255.255.255.0'>
          <dhcp><range start='10.55.{n}.100' end='10.55.{n}.200'/>{hosts.format(n=n)}</dhcp>
        </ip></network>"""
    )
    daemon.write_leases(bridge, [])
    return name, bridge


def _domain_xml(name: str, uuid: str, macs: list[str], network: str, metadata: str = "") -> str:
    interfaces = "".join(
        f"<interface type='network'><source network='{network}'/><mac address='{mac}'/></interface>" for mac in macs
    )
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>
      <os><type arch='x86_64'>hvm</type></os>
      <metadata>{metadata}</metadata>
      <devices>{interfaces}</devices></domain>"""


def _meta(body: str) -> str:
    return f'<m:instance xmlns:m="{NS}">{body}</m:instance>'


def _lease(mac: str, ip: str) -> dict[str, object]:
    return {"ip-address": ip, "mac-address": mac, "hostname": "guest", "expiry-time": 4102444800}


def _wait(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_sync_libvirt_domains_become_instances_and_leave_when_undefined(
    daemon: daemons.LibvirtDaemon, conn: Any
) -> None:
    network, bridge = _network(conn, daemon, hosts="<host mac='52:54:00:00:01:02' ip='10.55.{n}.9'/>")
    n = network.removeprefix("m169net")
    web, db = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    user_data = "#cloud-config\nhostname: web-1\n"
    conn.defineXML(
        _domain_xml(
            "web",
            web,
            ["52:54:00:00:01:01"],
            network,
            _meta(
                "<m:hostname>web-1</m:hostname><m:project>demo</m:project>"
                '<m:key name="alice">ssh-ed25519 AAAAC3Nza alice@example</m:key>'
                '<m:tag name="role">web</m:tag>'
                f'<m:user-data encoding="base64">{base64.b64encode(user_data.encode()).decode()}</m:user-data>'
            ),
        )
    )
    conn.defineXML(_domain_xml("db", db, ["52:54:00:00:01:02"], network))
    daemon.write_leases(bridge, [_lease("52:54:00:00:01:01", f"10.55.{n}.150")])
    registry = MemoryRegistry()
    result = lv.sync_libvirt(registry, daemon.uri)
    source = f"libvirt:{daemon.uri}"
    assert result.source == source
    assert [str(c) for c in result.plan.changes] == [
        f"add network {network}",
        *sorted([f"add instance {web} (web)", f"add instance {db} (db)"], key=lambda c: c.split()[2]),
    ]
    net = registry.get_network(network)
    assert net.source == source
    assert net.subnets == (
        Subnet(
            cidr=parse_network(f"10.55.{n}.0/24"),
            gateway=parse_ip(f"10.55.{n}.1"),
            dhcp=True,
            dns=(parse_ip(f"10.55.{n}.1"),),
        ),
    )
    found = registry.resolve(Caller(parse_ip(f"10.55.{n}.150"), network_id=network))
    assert (found.uuid, found.name, found.hostname, found.project_id, found.source) == (
        web,
        "web",
        "web-1",
        "demo",
        source,
    )
    assert [(k.name, k.data) for k in found.keys] == [("alice", "ssh-ed25519 AAAAC3Nza alice@example")]
    assert found.tags == {"role": "web"}
    assert found.user_data == user_data.encode()
    assert found.architecture == "x86_64"
    # The static DHCP host gives db its address before it ever boots.
    assert registry.resolve(Caller(parse_ip(f"10.55.{n}.9"), network_id=network)).uuid == db

    revision = registry.revision()
    again = lv.sync_libvirt(registry, daemon.uri)
    assert again.plan.changes == ()
    assert registry.revision() == revision

    conn.lookupByUUIDString(db).undefine()
    gone = lv.sync_libvirt(registry, daemon.uri)
    assert [str(c) for c in gone.plan.changes] == [f"remove instance {db} (db)"]
    assert [i.uuid for i in registry.list_instances()] == [web]


def test_sync_libvirt_never_touches_what_another_source_owns(daemon: daemons.LibvirtDaemon, conn: Any) -> None:
    network, bridge = _network(conn, daemon)
    n = network.removeprefix("m169net")
    registry = MemoryRegistry()
    # The operator's own instance, imported from a file, on the same network id.
    mine = Instance(uuid=str(uuidlib.uuid4()), name="imported")
    registry.put_instance(mine)
    domain = str(uuidlib.uuid4())
    conn.defineXML(_domain_xml("guest", domain, ["52:54:00:00:02:01"], network))
    daemon.write_leases(bridge, [_lease("52:54:00:00:02:01", f"10.55.{n}.120")])
    lv.sync_libvirt(registry, daemon.uri)
    assert registry.get_instance(mine.uuid) == mine

    # A domain with the uuid of the inventory's instance: refused, naming both.
    conn.defineXML(_domain_xml("clash", mine.uuid, ["52:54:00:00:02:02"], network))
    revision = registry.revision()
    with pytest.raises(Conflict) as refused:
        lv.sync_libvirt(registry, daemon.uri)
    assert f"instance {mine.uuid} (clash) from libvirt:{daemon.uri}" in str(refused.value)
    assert f"already in the registry from inventory (as instance {mine.uuid} (imported))" in str(refused.value)
    assert registry.revision() == revision
    assert registry.get_instance(mine.uuid) == mine
    conn.lookupByUUIDString(mine.uuid).undefine()

    # An inventory instance holding the IP a lease gives a domain: refused too.
    registry.put_instance(
        Instance(
            uuid=str(uuidlib.uuid4()),
            name="squatter",
            ports=(Port(network, "fa:16:3e:00:00:99", (parse_ip(f"10.55.{n}.121"),)),),
        )
    )
    other = str(uuidlib.uuid4())
    conn.defineXML(_domain_xml("late", other, ["52:54:00:00:02:03"], network))
    daemon.write_leases(
        bridge, [_lease("52:54:00:00:02:01", f"10.55.{n}.120"), _lease("52:54:00:00:02:03", f"10.55.{n}.121")]
    )
    with pytest.raises(Conflict, match=rf"IP 10\.55\.{n}\.121 on network {network} already belongs to .*squatter"):
        lv.sync_libvirt(registry, daemon.uri)
    # Undefining every domain removes the libvirt-owned instance only.
    for dom in conn.listAllDomains():
        dom.undefine()
    result = lv.sync_libvirt(registry, daemon.uri)
    assert [str(c) for c in result.plan.changes] == [f"remove instance {domain} (guest)"]
    assert sorted(i.name for i in registry.list_instances()) == ["imported", "squatter"]


def test_sync_libvirt_invalid_metadata_names_the_domain_and_element_and_writes_nothing(
    daemon: daemons.LibvirtDaemon, conn: Any
) -> None:
    network, _bridge = _network(conn, daemon)
    good, bad = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    conn.defineXML(_domain_xml("good", good, ["52:54:00:00:03:01"], network))
    conn.defineXML(_domain_xml("bad", bad, ["52:54:00:00:03:02"], network, _meta("<m:hostname>no_way!</m:hostname>")))
    registry = MemoryRegistry()
    with pytest.raises(InventoryError) as refused:
        lv.sync_libvirt(registry, daemon.uri)
    assert refused.value.entry == f"domain bad ({bad})"
    assert refused.value.field == "metadata.meta169:hostname"
    assert registry.revision() == 0


def test_sync_libvirt_metadata_element_bare_is_what_set_metadata_takes(
    daemon: daemons.LibvirtDaemon, conn: Any
) -> None:
    """``virDomainSetMetadata`` (``virsh metadata --set``) puts the element in the
    namespace it is given and refuses one that declares its own: the bare element
    is the one a program passes it."""
    import libvirt

    network, _bridge = _network(conn, daemon, "<host mac='52:54:00:00:07:01' ip='10.55.{n}.70'/>")
    guest = str(uuidlib.uuid4())
    dom = conn.defineXML(_domain_xml("set-by-api", guest, ["52:54:00:00:07:01"], network))
    instance = Instance(
        uuid=guest,
        name="set-by-api",
        hostname="set-by-api-1",
        metadata={"role": "web"},
        keys=(SSHKey("alice", "ssh-ed25519 AAAA alice"),),
        user_data=b"#cloud-config\n",
    )
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    with pytest.raises(libvirt.libvirtError, match="namespace"):
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, lv.metadata_element(instance), "meta169", NS, flags)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, lv.metadata_element(instance, bare=True), "meta169", NS, flags)
    registry = MemoryRegistry()
    lv.sync_libvirt(registry, daemon.uri)
    got = registry.get_instance(guest)
    assert (got.hostname, dict(got.metadata), got.keys, got.user_data) == (
        instance.hostname,
        {"role": "web"},
        instance.keys,
        instance.user_data,
    )


def test_sync_libvirt_cli_dry_run_then_sync_into_sqlite(
    daemon: daemons.LibvirtDaemon, conn: Any, tmp_path: Path
) -> None:
    network, bridge = _network(conn, daemon)
    n = network.removeprefix("m169net")
    guest = str(uuidlib.uuid4())
    conn.defineXML(_domain_xml("cli-guest", guest, ["52:54:00:00:04:01"], network))
    daemon.write_leases(bridge, [_lease("52:54:00:00:04:01", f"10.55.{n}.130")])
    url = f"sqlite://{tmp_path / 'registry.db'}"
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(main, ["--registry", url, *args])
        assert result.exit_code == 0, result.output
        return result.output

    cli("import", str(_empty_inventory(tmp_path)))
    dry = cli("sync", "libvirt", "--uri", daemon.uri, "--dry-run")
    assert f"add instance {guest} (cli-guest)" in dry
    assert "nothing written" in dry
    done = cli("sync", "libvirt", "--uri", daemon.uri)
    assert f"libvirt:{daemon.uri}: add instance {guest} (cli-guest)" in done
    shown = cli("instance", "show", guest, "--format", "inventory")
    assert f"source: libvirt:{daemon.uri}" in shown
    assert f"10.55.{n}.130" in shown


def _empty_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("networks: []\n")
    return path


class Watcher:
    """watch_libvirt in a thread, its results and errors collected."""

    def __init__(self, registry: Registry, uri: str, timing: lv.WatchTiming | None = None) -> None:
        self.stop = threading.Event()
        self.results: list[SyncResult] = []
        self.errors: list[Meta169Error] = []
        self.thread = threading.Thread(
            target=lv.watch_libvirt,
            args=(registry, uri),
            kwargs={
                "stop": self.stop,
                "on_result": self.results.append,
                "on_error": self.errors.append,
                "timing": timing or lv.WatchTiming(poll=0.2, reconnect=0.2),
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


def test_sync_libvirt_watch_applies_define_metadata_and_undefine_within_a_second(
    daemon: daemons.LibvirtDaemon, conn: Any
) -> None:
    import libvirt

    network, bridge = _network(conn, daemon)
    n = network.removeprefix("m169net")
    registry = MemoryRegistry()
    # Leases only every 30 s: what follows must come from events.
    with Watcher(registry, daemon.uri, lv.WatchTiming(poll=30, resync=300)) as watcher:
        _wait(lambda: bool(watcher.results), 10)
        guest = str(uuidlib.uuid4())
        daemon.write_leases(bridge, [_lease("52:54:00:00:05:01", f"10.55.{n}.140")])

        def present() -> bool:
            try:
                registry.get_instance(guest)
            except Meta169Error:
                return False
            return True

        dom = conn.defineXML(_domain_xml("watched", guest, ["52:54:00:00:05:01"], network))
        assert _wait(present, 1.0) < 1.0
        assert registry.get_instance(guest).ports[0].ips == (parse_ip(f"10.55.{n}.140"),)

        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            "<instance><hostname>renamed</hostname></instance>",
            "m",
            NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
        assert _wait(lambda: registry.get_instance(guest).hostname == "renamed", 1.0) < 1.0

        dom.undefine()
        assert _wait(lambda: not present(), 1.0) < 1.0
    assert watcher.errors == []


def test_sync_libvirt_watch_picks_up_lease_changes_by_polling(daemon: daemons.LibvirtDaemon, conn: Any) -> None:
    network, bridge = _network(conn, daemon)
    n = network.removeprefix("m169net")
    guest = str(uuidlib.uuid4())
    conn.defineXML(_domain_xml("leased", guest, ["52:54:00:00:06:01"], network))
    registry = MemoryRegistry()
    with Watcher(registry, daemon.uri) as watcher:
        _wait(lambda: bool(watcher.results), 10)
        assert registry.get_instance(guest).ports == ()  # no lease yet, no port
        daemon.write_leases(bridge, [_lease("52:54:00:00:06:01", f"10.55.{n}.160")])
        _wait(lambda: registry.get_instance(guest).ports != (), 2.0)
    found = registry.resolve(Caller(parse_ip(f"10.55.{n}.160"), network_id=network))
    assert found.uuid == guest


def test_sync_libvirt_watch_reconnects_and_rereads_after_a_daemon_restart() -> None:
    import libvirt

    registry = MemoryRegistry()
    registry.put_network(Network("elsewhere", subnets=(Subnet(parse_network("10.99.0.0/24")),)))
    with daemons.libvirt_daemon() as daemon, Watcher(registry, daemon.uri) as watcher:
        _wait(lambda: bool(watcher.results), 10)
        daemons.stop(daemon)
        _wait(lambda: bool(watcher.errors), 10)  # the lost connection, reported
        daemons.start(daemon)
        conn = libvirt.open(daemon.uri)
        try:
            guest = str(uuidlib.uuid4())
            conn.defineXML(
                _domain_xml("after-restart", guest, ["52:54:00:00:07:01"], "none").replace(
                    "<interface type='network'><source network='none'/>", "<interface type='user'>"
                )
            )
            _wait(lambda: guest in {i.uuid for i in registry.list_instances()}, 10)
        finally:
            conn.close()
    assert any(isinstance(e, Meta169Error) for e in watcher.errors)


def test_sync_libvirt_watch_cli_is_ready_after_its_first_sync_and_stops_on_sigterm(
    daemon: daemons.LibvirtDaemon, conn: Any, tmp_path: Path
) -> None:
    network, bridge = _network(conn, daemon)
    n = network.removeprefix("m169net")
    url = f"sqlite://{tmp_path / 'registry.db'}"
    run_cli(url, "import", str(_empty_inventory(tmp_path)))
    log = tmp_path / "sync.log"
    with manager_at(tmp_path / "notify") as manager, log.open("wb") as out:
        env = dict(os.environ, NOTIFY_SOCKET=str(manager.path))
        argv = meta169_argv("--registry", url, "sync", "libvirt", "--uri", daemon.uri, "--watch")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            ready = manager.wait_for("READY", proc, log)  # the first sync is done
            assert ready["STATUS"].startswith(f"libvirt:{daemon.uri} in sync at registry revision "), ready
            guest = str(uuidlib.uuid4())
            daemon.write_leases(bridge, [_lease("52:54:00:00:08:01", f"10.55.{n}.180")])
            conn.defineXML(_domain_xml("unit", guest, ["52:54:00:00:08:01"], network))
            _wait(lambda: guest in _listed(url), 10)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()
        finally:
            stop(proc)
        assert any(m.get("STOPPING") == "1" for m in [*manager.messages, *manager.drain()]), manager.messages
    assert f"add instance {guest} (unit)" in log.read_text()


def _listed(url: str) -> set[str]:
    registry = open_registry(url)
    try:
        return {i.uuid for i in registry.list_instances()}
    finally:
        registry.close()


def test_sync_libvirt_watch_cli_is_not_ready_until_libvirtd_answers(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'registry.db'}"
    log = tmp_path / "sync.log"
    with (
        daemons.libvirt_daemon() as daemon,
        manager_at(tmp_path / "notify") as manager,
        log.open("wb") as out,
    ):
        daemons.stop(daemon)  # libvirtd is not up yet
        env = dict(os.environ, NOTIFY_SOCKET=str(manager.path))
        argv = meta169_argv("--registry", url, "sync", "libvirt", "--uri", daemon.uri, "--watch")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not any("waiting for a first successful sync (2 failed)" in m.get("STATUS", "")
                          for m in manager.messages):  # fmt: skip
                assert time.monotonic() < deadline, manager.messages
                manager.wait_for("STATUS", proc, log)
            assert f"libvirt:{daemon.uri}: cannot connect" in manager.messages[-1]["STATUS"]
            assert not [m for m in manager.messages if "READY" in m]
            daemons.start(daemon)
            ready = manager.wait_for("READY", proc, log)
            assert ready["STATUS"].startswith(f"libvirt:{daemon.uri} in sync"), ready
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()
        finally:
            stop(proc)
