"""The OpenStack tree: listings, meta_data.json, network_data.json, vendor data."""

from __future__ import annotations

import base64
import json
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from meta169.model import HostRoute, Instance, Network, Port, SSHKey, Subnet
from meta169.render import Document, RenderOptions, Site, build_site, is_password_path
from meta169.render.openstack import network_data
from meta169.render.versions import OPENSTACK_VERSIONS

UUID = "6f1d0f5e-0d7e-4b55-8a0a-5d0c1c0d0001"
PORT_ID = "0c2d7f4e-1111-4222-8333-944455556666"

# net-a of examples/inventory.yaml: 10.0.0.0/24, gateway .1, DNS .2.
NET_A = Network(
    id="net-a",
    mtu=1450,
    subnets=(
        Subnet(
            cidr=ip_network("10.0.0.0/24"),
            gateway=ip_address("10.0.0.1"),
            dns=(ip_address("10.0.0.2"),),
        ),
    ),
)
PORT_A = Port(network_id="net-a", mac="fa:16:3e:00:00:05", ips=(ip_address("10.0.0.5"),), id=PORT_ID)


def instance(**overrides: Any) -> Instance:
    fields: dict[str, Any] = {"uuid": UUID, "name": "web-1", "project_id": "p1", "ports": (PORT_A,)}
    fields.update(overrides)
    return Instance(**fields)


def site(inst: Instance | None = None, networks: dict[str, Network] | None = None, **opts: Any) -> Site:
    return build_site(inst or instance(), networks if networks is not None else {"net-a": NET_A}, RenderOptions(**opts))


def doc(s: Site, path: str) -> Document:
    found = s.lookup(path)
    assert found is not None, path
    return found


def body_json(s: Site, path: str) -> Any:
    d = doc(s, path)
    assert d.content_type == "application/json"
    return json.loads(d.payload())


# -- listings ---------------------------------------------------------------------


def test_openstack_root_lists_versions_then_latest() -> None:
    d = doc(site(), "/openstack")
    assert d.content_type == "text/plain"
    assert d.body == b"\n".join(v.encode() for v in (*OPENSTACK_VERSIONS, "latest"))


@pytest.mark.parametrize("path", ["/openstack", "/openstack/"])
def test_openstack_root_answers_with_and_without_slash(path: str) -> None:
    assert doc(site(), path).body.startswith(b"2012-08-10\n")


@pytest.mark.parametrize("version", [*OPENSTACK_VERSIONS, "latest"])
def test_openstack_version_listing_names_only_servable_files(version: str) -> None:
    s = site(instance(user_data=b"#!/bin/sh\n"))
    names = doc(s, f"/openstack/{version}/").body.decode().split("\n")
    assert names[:2] == ["meta_data.json", "user_data"]
    for name in names:
        path = f"/openstack/{version}/{name}"
        assert is_password_path(path) if name == "password" else s.lookup(path) is not None


def test_openstack_latest_listing_is_newest() -> None:
    s = site()
    assert doc(s, "/openstack/latest").body == doc(s, "/openstack/2020-10-14").body
    assert doc(s, "/openstack/latest").body == (
        b"meta_data.json\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json"
    )


def test_openstack_unknown_version_is_404() -> None:
    s = site()
    assert s.lookup("/openstack/2025-04-04") is None
    assert s.lookup("/openstack/2025-04-04/meta_data.json") is None


def test_openstack_password_is_listed_but_not_a_document() -> None:
    s = site()
    assert b"password" in doc(s, "/openstack/latest").body
    assert s.lookup("/openstack/latest/password") is None
    assert not any(path.endswith("/password") for path in s.documents)


def test_openstack_files_gated_by_version_are_404_before() -> None:
    s = site()
    assert s.lookup("/openstack/2012-08-10/vendor_data.json") is None
    assert s.lookup("/openstack/2013-10-17/network_data.json") is None
    assert s.lookup("/openstack/2016-06-30/vendor_data2.json") is None
    assert s.lookup("/openstack/2016-10-06/vendor_data2.json") is not None


# -- user_data ----------------------------------------------------------------------


def test_openstack_user_data_is_raw_bytes() -> None:
    raw = b"\x00\xff#cloud-config\n"
    d = doc(site(instance(user_data=raw)), "/openstack/latest/user_data")
    assert (d.content_type, d.body) == ("application/octet-stream", raw)


def test_openstack_user_data_absent_is_unlisted_and_404() -> None:
    s = site()
    assert s.lookup("/openstack/latest/user_data") is None
    assert b"user_data" not in doc(s, "/openstack/latest").body


def test_openstack_empty_user_data_is_still_served() -> None:
    s = site(instance(user_data=b""))
    assert doc(s, "/openstack/latest/user_data").body == b""


# -- meta_data.json -------------------------------------------------------------------

COMMON = ["uuid", "hostname", "name", "launch_index", "availability_zone"]
META_KEYS = {
    "2012-08-10": COMMON,
    "2013-04-04": [*COMMON, "random_seed"],
    "2013-10-17": [*COMMON, "random_seed"],
    "2015-10-15": [*COMMON, "random_seed", "project_id"],
    "2016-06-30": [*COMMON, "random_seed", "project_id", "devices"],
    "2016-10-06": [*COMMON, "random_seed", "project_id", "devices"],
    "2017-02-22": [*COMMON, "random_seed", "project_id", "devices"],
    "2018-08-27": [*COMMON, "random_seed", "project_id", "devices"],
    "2020-10-14": [*COMMON, "random_seed", "project_id", "devices", "dedicated_cpus"],
    "latest": [*COMMON, "random_seed", "project_id", "devices", "dedicated_cpus"],
}


@pytest.mark.parametrize("version", list(META_KEYS))
def test_openstack_meta_data_fields_by_version_in_nova_order(version: str) -> None:
    data = body_json(site(), f"/openstack/{version}/meta_data.json")
    assert list(data) == META_KEYS[version]


def test_openstack_meta_data_values() -> None:
    keys = (SSHKey("k1", "ssh-ed25519 AAAA one"), SSHKey("cert", "-----BEGIN CERT", type="x509"))
    inst = instance(metadata={"role": "web"}, keys=keys, launch_index=2, availability_zone="az1")
    data = body_json(site(inst), "/openstack/latest/meta_data.json")
    seed = data.pop("random_seed")
    assert base64.b64decode(seed, validate=True)
    assert data == {
        "uuid": UUID,
        "meta": {"role": "web"},
        "public_keys": {"k1": "ssh-ed25519 AAAA one", "cert": "-----BEGIN CERT"},
        "keys": [
            {"name": "k1", "type": "ssh", "data": "ssh-ed25519 AAAA one"},
            {"name": "cert", "type": "x509", "data": "-----BEGIN CERT"},
        ],
        "hostname": "web-1",
        "name": "web-1",
        "launch_index": 2,
        "availability_zone": "az1",
        "project_id": "p1",
        "devices": [],
        "dedicated_cpus": [],
    }


def test_openstack_meta_data_without_keys_or_meta_omits_them() -> None:
    data = body_json(site(), "/openstack/2012-08-10/meta_data.json")
    assert "meta" not in data and "public_keys" not in data and "keys" not in data


def test_openstack_random_seed_is_fresh_512_bytes_per_request() -> None:
    d = doc(site(), "/openstack/latest/meta_data.json")
    assert d.fresh is not None
    first, second = d.payload(), d.payload()
    seeds = [json.loads(body)["random_seed"] for body in (first, second)]
    assert seeds[0] != seeds[1]
    assert all(len(base64.b64decode(seed, validate=True)) == 512 for seed in seeds)
    # body is one valid rendering of the same length, so HEAD can use it.
    assert len(d.body) == len(first) == len(second)
    assert json.loads(d.body)["uuid"] == UUID


def test_openstack_random_seed_splice_survives_awkward_values() -> None:
    inst = instance(metadata={'x"}, "random_seed": "': '\\"\u00e9\n'}, name='we"ird')
    data = body_json(site(inst), "/openstack/latest/meta_data.json")
    assert data["meta"] == {'x"}, "random_seed": "': '\\"\u00e9\n'}
    assert data["name"] == 'we"ird'
    assert len(base64.b64decode(data["random_seed"])) == 512


def test_openstack_meta_data_before_grizzly_has_no_fresh_seed() -> None:
    d = doc(site(), "/openstack/2012-08-10/meta_data.json")
    assert d.fresh is None and "random_seed" not in json.loads(d.body)


# -- network_data.json ----------------------------------------------------------------


def test_openstack_network_data_inventory_example() -> None:
    data = body_json(site(), "/openstack/latest/network_data.json")
    link = "tap0c2d7f4e-11"
    assert data == {
        "links": [
            {
                "id": link,
                "vif_id": PORT_ID,
                "type": "phy",
                "mtu": 1450,
                "ethernet_mac_address": "fa:16:3e:00:00:05",
            }
        ],
        # DHCP subnets get Nova's short form [netutils._get_nets].
        "networks": [{"id": "network0", "type": "ipv4_dhcp", "link": link, "network_id": "net-a"}],
        "services": [{"type": "dns", "address": "10.0.0.2"}],
    }


def test_openstack_network_data_static_ipv4_has_address_routes_services() -> None:
    subnet = Subnet(
        cidr=ip_network("192.168.7.0/24"),
        gateway=ip_address("192.168.7.1"),
        dhcp=False,
        dns=(ip_address("192.168.7.53"), ip_address("8.8.8.8")),
        host_routes=(HostRoute(ip_network("172.16.0.0/12"), ip_address("192.168.7.254")),),
    )
    net = Network(id="net-s", subnets=(subnet,))
    port = Port(network_id="net-s", mac="fa:16:3e:00:00:07", ips=(ip_address("192.168.7.9"),), id="p7")
    data = network_data(instance(ports=(port,)), {"net-s": net})
    assert data["networks"] == [
        {
            "id": "network0",
            "type": "ipv4",
            "link": "tapp7",
            "ip_address": "192.168.7.9",
            "netmask": "255.255.255.0",
            "routes": [
                {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "192.168.7.1"},
                {"network": "172.16.0.0", "netmask": "255.240.0.0", "gateway": "192.168.7.254"},
            ],
            "network_id": "net-s",
            "services": [
                {"type": "dns", "address": "192.168.7.53"},
                {"type": "dns", "address": "8.8.8.8"},
            ],
        }
    ]
    assert data["services"] == data["networks"][0]["services"]


def test_openstack_network_data_static_without_gateway_has_no_default_route() -> None:
    net = Network(id="n", subnets=(Subnet(cidr=ip_network("10.9.0.0/16"), dhcp=False),))
    port = Port(network_id="n", mac="fa:16:3e:00:00:09", ips=(ip_address("10.9.1.1"),), id="p9")
    (entry,) = network_data(instance(ports=(port,)), {"n": net})["networks"]
    assert (entry["netmask"], entry["routes"], entry["services"]) == ("255.255.0.0", [], [])


@pytest.mark.parametrize(
    ("mode", "dhcp", "expected_type", "short"),
    [
        ("slaac", True, "ipv6_slaac", False),
        ("dhcpv6-stateful", True, "ipv6_dhcpv6-stateful", False),
        ("dhcpv6-stateless", True, "ipv6_dhcpv6-stateless", False),
        (None, False, "ipv6", False),
        (None, True, "ipv6_dhcp", True),
    ],
)
def test_openstack_network_data_ipv6_types(mode: Any, dhcp: bool, expected_type: str, short: bool) -> None:
    subnet = Subnet(
        cidr=ip_network("2001:db8:1::/64"),
        gateway=ip_address("2001:db8:1::1"),
        dhcp=dhcp,
        dns=(ip_address("2001:db8::53"),),
        ipv6_mode=mode,
    )
    net = Network(id="n6", subnets=(subnet,))
    port = Port(network_id="n6", mac="fa:16:3e:00:00:06", ips=(ip_address("2001:db8:1::6"),), id="p6")
    data = network_data(instance(ports=(port,)), {"n6": net})
    (entry,) = data["networks"]
    assert entry["type"] == expected_type
    if short:
        assert entry == {"id": "network0", "type": "ipv6_dhcp", "link": "tapp6", "network_id": "n6"}
    else:
        assert entry["ip_address"] == "2001:db8:1::6"
        assert entry["netmask"] == "ffff:ffff:ffff:ffff::"
        assert entry["routes"] == [{"network": "::", "netmask": "::", "gateway": "2001:db8:1::1"}]
        assert entry["services"] == [{"type": "dns", "address": "2001:db8::53"}]
    assert data["services"] == [{"type": "dns", "address": "2001:db8::53"}]


def test_openstack_network_data_multiple_ports_and_dual_stack() -> None:
    v4 = Subnet(cidr=ip_network("10.0.1.0/24"), dns=(ip_address("10.0.0.2"),))
    v6 = Subnet(cidr=ip_network("fd00:1::/64"), ipv6_mode="slaac")
    net_b = Network(id="net-b", mtu=9000, subnets=(v6, v4))
    eth1 = Port(
        network_id="net-b",
        mac="fa:16:3e:00:00:11",
        ips=(ip_address("fd00:1::11"), ip_address("10.0.1.11")),
        id="port-b",
        device_number=1,
    )
    stray = Port(network_id="net-x", mac="fa:16:3e:00:00:99", ips=(ip_address("10.99.0.1"),), id="px", device_number=2)
    inst = instance(ports=(stray, eth1, PORT_A))  # out of device order on purpose
    data = network_data(inst, {"net-a": NET_A, "net-b": net_b})
    assert [(link["id"], link["mtu"]) for link in data["links"]] == [("tap0c2d7f4e-11", 1450), ("tapport-b", 9000)]
    assert [(n["id"], n["type"], n["link"]) for n in data["networks"]] == [
        ("network0", "ipv4_dhcp", "tap0c2d7f4e-11"),
        ("network1", "ipv4_dhcp", "tapport-b"),  # IPv4 first, as Nova
        ("network2", "ipv6_slaac", "tapport-b"),
    ]
    # 10.0.0.2 is on both IPv4 subnets: listed once.
    assert data["services"] == [{"type": "dns", "address": "10.0.0.2"}]


def test_openstack_network_data_port_outside_known_subnets_has_no_link() -> None:
    port = Port(network_id="net-a", mac="fa:16:3e:00:00:42", ips=(ip_address("10.50.0.1"),), id="p42")
    assert network_data(instance(ports=(port,)), {"net-a": NET_A}) == {"links": [], "networks": [], "services": []}


def test_openstack_network_data_without_ports_is_empty_object() -> None:
    assert body_json(site(instance(ports=())), "/openstack/latest/network_data.json") == {}


# -- vendor data -----------------------------------------------------------------------


def test_openstack_vendor_data_instance_overrides_static() -> None:
    inst = instance(vendor_data={"cloud-init": "#cloud-config\n", "a": 2})
    s = site(inst, static_vendor_data={"a": 1, "b": 1})
    assert body_json(s, "/openstack/latest/vendor_data.json") == {"a": 2, "b": 1, "cloud-init": "#cloud-config\n"}


def test_openstack_vendor_data_defaults_to_empty_object() -> None:
    s = site()
    assert body_json(s, "/openstack/2013-10-17/vendor_data.json") == {}
    assert body_json(s, "/openstack/latest/vendor_data2.json") == {"static": {}}


def test_openstack_vendor_data2_merges_dynamic_under_names() -> None:
    s = site(
        instance(vendor_data={"x": 1}),
        static_vendor_data={"y": 2},
        vendor_data2_dynamic={"join": {"token": "t"}, "static": {"spoof": True}},
    )
    # A provider named "static" is dropped, as Nova drops duplicate keys.
    assert body_json(s, "/openstack/latest/vendor_data2.json") == {"static": {"y": 2, "x": 1}, "join": {"token": "t"}}
