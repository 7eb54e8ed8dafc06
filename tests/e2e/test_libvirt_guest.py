"""The real guest as a libvirt domain, served as docs/libvirt.md says.

A system libvirtd boxed in namespaces of the test's own (``tests/e2e/libvirt_host.py``)
runs the NAT network of docs/libvirt.md (its XML, with the option-121 route for
libvirt's dnsmasq, and its network hook putting 169.254.169.254 on the bridge, both
read from the page itself, as is the firewall rule and serve's command line). The
instance is not imported: ``meta169 sync libvirt --watch`` makes it from the domain's
XML (UUID, name, MAC, the static DHCP host's address, and the ``<meta169:instance>``
element that :func:`meta169.sources.libvirt.metadata_element` renders), and
``meta169 serve --listen 169.254.169.254:80 --network default`` answers the guest.
The Debian 12 image of the lab boots under TCG with Nova's SMBIOS, so its own
ds-identify picks OpenStack; the tests read the result through qemu-guest-agent,
as libvirt reaches it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meta169.errors import Meta169Error
from meta169.lab.image import GuestImage
from meta169.lab.qemu import KERNEL_CMDLINE, overlay_argv
from meta169.model import Instance, SSHKey
from meta169.plumbing import netns
from meta169.registry import open_registry
from meta169.sources.libvirt import NAMESPACE, metadata_element, source_name
from tests.counters import SUMMARY
from tests.e2e.guest_image import guest_image
from tests.e2e.libvirt_host import DomainAgent, LibvirtHost, libvirt_host

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "libvirt.md"
BOOT_WAIT = 900.0  # seconds until the agent answers (TCG; another guest may boot alongside)
CLOUD_INIT_WAIT = 900.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@example"
USER_DATA_MARK = "/run/meta169-libvirt-user-data"

pytestmark = pytest.mark.timeout(2400)


# -- what docs/libvirt.md says to do -----------------------------------------------------------


def doc_blocks(language: str) -> list[str]:
    """The page's fenced blocks in ``language``, their indentation removed."""
    blocks = []
    for match in re.finditer(rf"^( *)```{language}\n(.*?)^\1```", DOCS.read_text(), re.S | re.M):
        indent = len(match.group(1))
        blocks.append("".join(line[indent:] + "\n" for line in match.group(2).splitlines()))
    return blocks


def doc_block(language: str, containing: str) -> str:
    found = [b for b in doc_blocks(language) if containing in b]
    assert len(found) == 1, f"docs/libvirt.md: {len(found)} {language} blocks contain {containing!r}"
    return found[0]


def doc_network_hook() -> str:
    return doc_block("sh", "/etc/libvirt/hooks/network")


def doc_network_xml() -> str:
    return doc_block("xml", "<network")


def doc_firewall() -> list[str]:
    (line,) = [x for x in doc_block("sh", "iptables -I INPUT").splitlines() if x.startswith("iptables")]
    return shlex.split(line)


def doc_serve_args() -> list[str]:
    """What the page's serve unit runs after ``meta169``."""
    (line,) = [x for x in doc_block("ini", "meta169-serve-libvirt").splitlines() if x.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == "/usr/bin/meta169", argv
    return argv[1:]


@dataclass(frozen=True)
class StaticHost:
    """The network's static DHCP host: the guest takes its MAC, name and address."""

    mac: str
    name: str
    ip: str


def doc_static_host() -> StaticHost:
    host = ET.fromstring(doc_network_xml()).find("./ip/dhcp/host")
    assert host is not None
    return StaticHost(host.get("mac", ""), host.get("name", ""), host.get("ip", ""))


# -- the domain ----------------------------------------------------------------------------------


def domain_xml(instance: Instance, mac: str, image: GuestImage, directory: Path) -> str:
    """The image booted as a libvirt domain on network ``default``: its kernel directly
    (as the lab's QEMU guests), a copy-on-write disk, the serial console to a file,
    the guest agent's channel, and the SMBIOS Nova's libvirt driver writes (so
    ds-identify finds OpenStack)."""
    return f"""\
<domain type='qemu'>
  <name>{instance.name}</name>
  <uuid>{instance.uuid}</uuid>
  <metadata>{metadata_element(instance)}</metadata>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>OpenStack Foundation</entry>
      <entry name='product'>OpenStack Nova</entry>
      <entry name='serial'>{instance.uuid}</entry>
      <entry name='uuid'>{instance.uuid}</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{KERNEL_CMDLINE}</cmdline>
    <smbios mode='sysinfo'/>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{directory / "disk.qcow2"}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='default'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <serial type='file'><source path='{directory / "console.log"}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def wait_for(what: str, ok: Callable[[], bool], timeout: float, why: Callable[[], str] = lambda: "") -> float:
    started = time.monotonic()
    while not ok():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g}s {why()}")
        time.sleep(0.2)
    return time.monotonic() - started


@dataclass
class Booted:
    host: LibvirtHost
    domain: Any
    agent: DomainAgent
    instance: Instance
    registry_url: str
    static: StaticHost
    closer: ExitStack

    def run(self, *argv: str, timeout: float = 120.0) -> str:
        done = self.agent.exec(list(argv), timeout=timeout)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout

    def registered(self) -> Instance | None:
        registry = open_registry(self.registry_url)
        try:
            return registry.get_instance(self.instance.uuid)
        except Meta169Error:
            return None
        finally:
            registry.close()


def meta169(*args: str) -> list[str]:
    return [sys.executable, "-m", "meta169", "--config", "/dev/null", *args]


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    import libvirt

    image = guest_image()
    with ExitStack() as stack:
        host = stack.enter_context(libvirt_host(network_hook=doc_network_hook()))
        conn = libvirt.open(host.uri)
        stack.callback(conn.close)
        conn.networkDefineXML(doc_network_xml()).create()
        netns.exec_in(host.netns, doc_firewall())
        registry_url = f"sqlite:///{host.root / 'registry.db'}"
        sync = host.popen_in_netns(
            "sync", meta169("--registry", registry_url, "sync", "libvirt", "--uri", host.uri, "--watch")
        )

        static = doc_static_host()
        instance = Instance(
            uuid=str(uuidlib.uuid4()),
            name=static.name,
            hostname=f"lv-{static.name}",  # not the DHCP host name: cloud-init must set it
            keys=(SSHKey("alice", KEY),),
            user_data=f"#!/bin/sh\necho from-the-domain-xml > {USER_DATA_MARK}\n".encode(),
        )
        subprocess.run(overlay_argv(image, host.root / "disk.qcow2"), check=True)
        domain = conn.defineXML(domain_xml(instance, static.mac, image, host.root))
        booted = Booted(host, domain, DomainAgent(domain), instance, registry_url, static, stack)
        took = wait_for(
            "the sync registers the defined domain",
            lambda: booted.registered() is not None or sync.poll() is not None,
            30,
            lambda: host.tail("sync.log"),
        )
        assert sync.poll() is None, host.tail("sync.log")
        SUMMARY["libvirt sync: domain defined to registered"] = f"{took:.2f}s"

        serve = host.popen_in_netns("serve", meta169("--registry", registry_url, *doc_serve_args()))
        wait_for(
            "serve listens on 169.254.169.254:80",
            lambda: "listening on" in host.tail("serve.log") or serve.poll() is not None,
            60,
        )
        assert serve.poll() is None, host.tail("serve.log")

        started = time.monotonic()
        domain.create()
        wait_for(
            "the guest agent answers",
            booted.agent.ping,
            BOOT_WAIT,
            lambda: f"console:\n{host.tail('console.log')}\nlibvirtd:\n{host.tail('libvirtd.log')}",
        )
        SUMMARY["libvirt guest boot"] = f"{time.monotonic() - started:.0f}s to the agent answering (TCG)"
        yield booted


def test_libvirt_guest_cloud_init_finishes_with_the_openstack_datasource(booted: Booted) -> None:
    started = time.monotonic()
    status = booted.agent.exec(["cloud-init", "status", "--wait", "--long"], timeout=CLOUD_INIT_WAIT)
    SUMMARY["libvirt guest cloud-init done"] = f"{time.monotonic() - started:.0f}s after the agent answered"
    assert status.returncode == 0, (status.stdout, status.stderr, booted.host.tail("console.log"))
    assert "status: done" in status.stdout
    assert "DataSourceOpenStackLocal" in status.stdout
    result = json.loads(booted.run("cat", "/run/cloud-init/result.json"))["v1"]
    assert result["errors"] == [], result


def test_libvirt_guest_instance_is_the_domain_the_sync_registered(booted: Booted) -> None:
    registered = booted.registered()
    assert registered is not None
    assert registered.source == source_name(booted.host.uri)
    assert [str(ip) for port in registered.ports for ip in port.ips] == [booted.static.ip]
    assert [port.mac for port in registered.ports] == [booted.static.mac]
    data = json.loads(booted.run("cat", "/run/cloud-init/instance-data.json"))["v1"]
    assert (data["platform"], data["instance_id"]) == ("openstack", booted.instance.uuid)


def test_libvirt_guest_takes_the_route_libvirts_dnsmasq_pushes(booted: Booted) -> None:
    address = json.loads(booted.run("ip", "-j", "-4", "addr", "show", "dev", "eth0"))
    assert [a["local"] for a in address[0]["addr_info"]] == [booted.static.ip]
    # Option 121's own /32 (a default route alone would also lead to the bridge).
    routes = json.loads(booted.run("ip", "-j", "route", "show", "to", "exact", "169.254.169.254/32"))
    assert [(r["dst"], r.get("gateway")) for r in routes] == [("169.254.169.254", "192.168.122.1")]
    used = json.loads(booted.run("ip", "-j", "route", "get", "169.254.169.254"))
    assert used[0]["gateway"] == "192.168.122.1"


def test_libvirt_guest_hostname_key_and_user_data_are_the_domains(booted: Booted) -> None:
    assert booted.run("hostname").strip() == booted.instance.hostname
    keys = booted.run("cat", "/home/debian/.ssh/authorized_keys")
    assert [line for line in keys.splitlines() if line and not line.startswith("#")] == [KEY]
    assert booted.run("cat", USER_DATA_MARK).strip() == "from-the-domain-xml"


_GET = """\
import http.client, json
conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
conn.request("GET", "/openstack/latest/meta_data.json")
reply = conn.getresponse()
print(json.dumps({"status": reply.status, "body": reply.read().decode()}))
"""


def test_libvirt_guest_sees_a_metadata_change_made_through_libvirt(booted: Booted) -> None:
    """``virsh metadata --set`` (the same call) on the running domain: the watching sync
    writes it and the guest's next request has it."""
    import libvirt

    changed = metadata_element(
        Instance(
            uuid=booted.instance.uuid,
            name=booted.instance.name,
            hostname=booted.instance.hostname,
            keys=booted.instance.keys,
            user_data=booted.instance.user_data,
            metadata={"role": "web"},
        ),
        bare=True,
    )
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    booted.domain.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, changed, "meta169", NAMESPACE, flags)
    took = wait_for(
        "the sync writes the change",
        lambda: (found := booted.registered()) is not None and dict(found.metadata) == {"role": "web"},
        5,
        lambda: booted.host.tail("sync.log"),
    )
    SUMMARY["libvirt sync: metadata changed to registered"] = f"{took:.2f}s"
    seen: dict[str, Any] = {}

    def guest_sees_it() -> bool:
        reply = json.loads(booted.run("python3", "-c", _GET))
        seen.update(reply)
        return reply["status"] == 200 and json.loads(reply["body"]).get("meta") == {"role": "web"}

    wait_for("the guest sees meta role=web", guest_sees_it, 60, lambda: repr(seen))
    assert json.loads(seen["body"])["uuid"] == booted.instance.uuid


def test_libvirt_guest_teardown_leaves_no_process_namespace_or_file(booted: Booted) -> None:
    host = booted.host
    booted.closer.close()
    assert not netns.exists(host.netns)
    assert not host.root.exists()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(host.root).encode() not in cmdline, (proc.name, cmdline)
