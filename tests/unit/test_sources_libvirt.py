"""The pure half of the libvirt source: domain and network XML to model objects, the
<meta169:instance> element both ways, and where an interface's IPs come from."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from meta169.errors import InventoryError
from meta169.model import Instance, Port, SSHKey, parse_ip
from meta169.sources import libvirt as lv
from meta169.sources.libvirt import NAMESPACE, Domain, Interface, LibvirtNetwork

SRC = "libvirt:test:///default"
UUID = "6f1d0f5e-0d7e-4b55-8a0a-5d0c1c0d0001"


def domain_xml(metadata: str = "", interfaces: str = "") -> str:
    return f"""<domain type='kvm'><name>web</name><uuid>{UUID}</uuid>
      <os><type arch='aarch64' machine='virt'>hvm</type></os>
      <metadata><other xmlns="urn:someone-else"><x/></other>{metadata}</metadata>
      <devices>{interfaces}</devices></domain>"""


def meta(body: str) -> str:
    return f'<meta169:instance xmlns:meta169="{NAMESPACE}">{body}</meta169:instance>'


NAT = """<network><name>default</name><forward mode='nat'/><bridge name='virbr0'/><mtu size='9000'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/>
      <host mac='52:54:00:AA:00:01' name='web' ip='192.168.122.10'/></dhcp>
  </ip>
  <ip family='ipv6' address='2001:db8:ca2:2::1' prefix='64'/>
</network>"""


def test_sources_libvirt_network_xml_becomes_a_network_with_static_hosts() -> None:
    parsed = lv.parse_network(NAT, SRC)
    assert (parsed.name, parsed.bridge) == ("default", "virbr0")
    assert parsed.hosts == {"52:54:00:aa:00:01": (parse_ip("192.168.122.10"),)}
    assert parsed.network is not None
    assert (parsed.network.id, parsed.network.mtu, parsed.network.source) == ("default", 9000, SRC)
    v4, v6 = parsed.network.subnets
    assert (str(v4.cidr), str(v4.gateway), v4.dhcp, [str(d) for d in v4.dns]) == (
        "192.168.122.0/24",
        "192.168.122.1",
        True,
        ["192.168.122.1"],
    )
    assert (str(v6.cidr), v6.dhcp, v6.ipv6_mode) == ("2001:db8:ca2:2::/64", False, "slaac")


def test_sources_libvirt_isolated_network_has_no_gateway_and_a_bridge_only_network_no_subnet() -> None:
    isolated = lv.parse_network(
        "<network><name>iso</name><dns enable='no'/><ip address='10.9.0.1' prefix='24'/></network>", SRC
    )
    assert isolated.network is not None
    (subnet,) = isolated.network.subnets
    assert (subnet.gateway, subnet.dns, subnet.dhcp) == (None, (), False)
    bridged = lv.parse_network("<network><name>br</name><forward mode='bridge'/><bridge name='br0'/></network>", SRC)
    assert bridged.network is None and bridged.bridge == "br0"


def test_sources_libvirt_metadata_element_round_trips_through_parse() -> None:
    instance = Instance(
        uuid=UUID,
        name="web",
        hostname="web-1.example",
        project_id="demo",
        availability_zone="rack-3",
        region="lab",
        instance_type="m1.large",
        image_id="debian-12",
        metadata={"team": "blue"},
        keys=(SSHKey("alice", "ssh-ed25519 AAAA alice"), SSHKey("ca", "-----BEGIN CERTIFICATE-----", "x509")),
        user_data=b"\x00\xffbinary",
        vendor_data={"motd": ["hello"]},
        tags={"role": "web", "": "empty"},
        ports=(Port("net-a", "52:54:00:aa:00:01", (parse_ip("10.0.0.5"), parse_ip("2001:db8::5"))),),
    )
    element = lv.metadata_element(instance, network="net-a")
    domain = lv.parse_domain(
        domain_xml(element, "<interface type='bridge'><mac address='52:54:00:aa:00:01'/></interface>"), SRC
    )
    built = lv.build_instance(domain, {}, {}, SRC)
    assert built == dataclasses.replace(instance, architecture="aarch64", source=SRC)


def test_sources_libvirt_interface_ips_come_from_metadata_then_static_hosts_and_leases() -> None:
    networks = {"default": lv.parse_network(NAT, SRC)}
    interfaces = (
        "<interface type='network'><source network='default'/><mac address='52:54:00:aa:00:01'/></interface>"
        "<interface type='bridge'><source bridge='virbr0'/><mac address='52:54:00:aa:00:02'/></interface>"
        "<interface type='network'><source network='default'/><mac address='52:54:00:aa:00:03'/></interface>"
        "<interface type='user'><mac address='52:54:00:aa:00:04'/></interface>"
    )
    leases = {
        ("default", "52:54:00:aa:00:01"): (parse_ip("192.168.122.77"),),
        ("default", "52:54:00:aa:00:02"): (parse_ip("192.168.122.78"),),
    }
    override = meta(
        '<meta169:port mac="52:54:00:aa:00:03" network="elsewhere"><meta169:ip>10.7.0.3</meta169:ip></meta169:port>'
    )
    built = lv.build_instance(lv.parse_domain(domain_xml(override, interfaces), SRC), networks, leases, SRC)
    assert [(p.network_id, p.mac, [str(i) for i in p.ips], p.device_number) for p in built.ports] == [
        # The static host first, then the lease: both are the guest's.
        ("default", "52:54:00:aa:00:01", ["192.168.122.10", "192.168.122.77"], 0),
        # A bridge that is a libvirt network's bridge is on that network.
        ("default", "52:54:00:aa:00:02", ["192.168.122.78"], 1),
        ("elsewhere", "52:54:00:aa:00:03", ["10.7.0.3"], 2),
        # The user-mode interface has neither network nor address: no port.
    ]
    no_lease = lv.build_instance(
        lv.parse_domain(domain_xml("", interfaces), SRC), {"default": networks["default"]}, {}, SRC
    )
    assert [p.mac for p in no_lease.ports] == ["52:54:00:aa:00:01"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ("<meta169:hostnme>x</meta169:hostnme>", "metadata.meta169:hostnme", "did you mean meta169:hostname"),
        ("<meta169:hostname>bad_host!</meta169:hostname>", "metadata.meta169:hostname", "not a valid host name"),
        ("<meta169:hostname>a</meta169:hostname><meta169:hostname>b</meta169:hostname>",
         "metadata.meta169:hostname", "given twice"),
        ("<meta169:key>ssh-ed25519 AAAA</meta169:key>", "metadata.meta169:key[0]", "needs a name= attribute"),
        ('<meta169:user-data encoding="base64">%%%</meta169:user-data>', "metadata.meta169:user-data",
         "not valid base64"),
        ("<meta169:vendor-data>[1, 2]</meta169:vendor-data>", "metadata.meta169:vendor-data", "must be a mapping"),
        ("<meta169:vendor-data>{nope</meta169:vendor-data>", "metadata.meta169:vendor-data", "is not JSON"),
        ("<meta169:ip>10.0.0.300</meta169:ip>", "metadata.meta169:ip[0]", "not an IP address"),
        ('<meta169:port mac="52:54:00:00:00:99"/>', "metadata.meta169:port", "on no interface"),
        ("<meta169:tag>v</meta169:tag>", "metadata.meta169:tag[0]", "needs a name= attribute"),
        ('<elsewhere xmlns="urn:x"/>', "metadata", "not in the https://meta169.dev/xmlns/instance/1 namespace"),
        ("<meta169:ip>10.0.0.5</meta169:ip>", "devices/interface[0]", "add meta169:network"),
    ],
)  # fmt: skip
def test_sources_libvirt_invalid_metadata_names_domain_and_element(body: str, field: str, message: str) -> None:
    interfaces = "<interface type='user'><mac address='52:54:00:aa:00:01'/></interface>"
    with pytest.raises(InventoryError) as refused:
        lv.build_instance(lv.parse_domain(domain_xml(meta(body), interfaces), SRC), {}, {}, SRC)
    assert (refused.value.source, refused.value.entry, refused.value.field) == (SRC, f"domain web ({UUID})", field)
    assert message in str(refused.value)


def test_sources_libvirt_describe_orders_and_owns_everything() -> None:
    other = Domain(
        uuid="00000000-0000-4000-8000-000000000001", name="a", interfaces=(Interface("52:54:00:00:00:01", "default"),)
    )
    first = Domain(uuid=UUID, name="web")
    inventory = lv.describe([first, other], [lv.parse_network(NAT, SRC), LibvirtNetwork("bare")], {
        ("default", "52:54:00:00:00:01"): (ipaddress.ip_address("192.168.122.5"),)
    }, SRC)  # fmt: skip
    assert [n.id for n in inventory.networks] == ["default"]
    assert [i.name for i in inventory.instances] == ["a", "web"]
    assert {i.source for i in inventory.instances} == {SRC}
    assert inventory.instances[0].ports[0].ips == (ipaddress.ip_address("192.168.122.5"),)


def test_sources_libvirt_malformed_xml_names_the_source() -> None:
    with pytest.raises(InventoryError, match=f"{SRC}, entry a domain: is not well-formed XML"):
        lv.parse_domain("<domain>", SRC)
