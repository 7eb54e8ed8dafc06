"""The pure half of the OpenStack source: Nova's and Neutron's JSON, as the API
references print it (tests/fixtures/openstack), to networks, routers and instances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meta169.errors import InventoryError
from meta169.sources.openstack import (
    CloudData,
    WatchTiming,
    describe,
    instance_from,
    network_from,
    router_from,
    unanswered_servers,
)

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "openstack"
SRC = "openstack:test"


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


def test_sources_openstack_neutron_networks_and_subnets_sample() -> None:
    networks = sample("neutron/networks_networks-list-response.json")["networks"]
    subnets = sample("neutron/subnets_subnets-list-response.json")["subnets"]
    inventory = describe(CloudData(networks=networks, subnets=subnets), SRC)
    net1, net2 = inventory.networks
    assert (net1.id, net1.name, net1.project_id, net1.mtu) == (
        "d32019d3-bc6e-4319-9c1d-6722fc136a22",
        "net1",
        "4fd44f30292945e481c7b8a0c8908869",
        1500,
    )
    assert [(str(s.cidr), str(s.gateway), s.dhcp) for s in net1.subnets] == [("192.0.0.0/8", "192.0.0.1", True)]
    assert [str(s.cidr) for s in net2.subnets] == ["10.0.0.0/24"]
    assert {n.source for n in inventory.networks} == {SRC}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ipv6_address_mode": "slaac", "ipv6_ra_mode": "slaac"}, "slaac"),
        ({"ipv6_address_mode": None, "ipv6_ra_mode": "dhcpv6-stateless"}, "dhcpv6-stateless"),
        ({"ipv6_address_mode": "dhcpv6-stateful", "ipv6_ra_mode": None}, "dhcpv6-stateful"),
        ({"ipv6_address_mode": None, "ipv6_ra_mode": None}, None),
    ],
)
def test_sources_openstack_subnet_ipv6_modes_routes_and_dns(fields: dict[str, Any], expected: str | None) -> None:
    subnet = {
        "id": "s6",
        "network_id": "n6",
        "cidr": "2001:db8:6::/64",
        "gateway_ip": None,
        "enable_dhcp": False,
        "dns_nameservers": ["2001:db8::53", "2001:db8::54"],
        "host_routes": [{"destination": "2001:db8:7::/64", "nexthop": "2001:db8:6::fe"}],
        **fields,
    }
    network = network_from({"id": "n6", "subnets": ["s6"], "mtu": 1450}, [subnet], SRC)
    (parsed,) = network.subnets
    assert (parsed.gateway, parsed.dhcp, parsed.ipv6_mode, network.mtu) == (None, False, expected, 1450)
    assert [str(d) for d in parsed.dns] == ["2001:db8::53", "2001:db8::54"]
    assert [(str(r.destination), str(r.nexthop)) for r in parsed.host_routes] == [("2001:db8:7::/64", "2001:db8:6::fe")]


def test_sources_openstack_router_networks_come_from_interface_ports_only() -> None:
    ports = sample("neutron/ports_ports-list-response.json")["ports"]
    router_id = "9ae135f4-b6e0-4dad-9e91-3c223e385824"  # both sample ports' device
    router = router_from({"id": router_id, "project_id": "p"}, ports, SRC)
    # The router_gateway port is the outside; the router_interface port's network is inside.
    assert router.network_ids == ("f27aa545-cbdd-4907-b0c6-c9e8b039dcc2",)
    routers = sample("neutron/routers_routers-list-response.json")["routers"]
    assert [router_from(r, ports, SRC).network_ids for r in routers] == [(), ()]


def test_sources_openstack_server_sample_v2_52_with_its_port() -> None:
    (server,) = sample("nova/servers_v2.52_servers-details-resp.json")["servers"]
    port = sample("neutron/ports_port-update-response.json")["port"]
    port["device_id"] = server["id"]
    keypair = sample("nova/os-keypairs_v2.10_keypairs-get-resp.json")["keypair"]
    server = {**server, "key_name": keypair["name"]}
    instance = instance_from(server, [port], {}, {("admin", keypair["name"]): keypair}, "RegionTwo", SRC)
    assert (instance.uuid, instance.hostname, instance.instance_type, instance.region) == (
        "764e369e-a874-4401-b7ce-43e4760888da",
        "new-server-test",
        "m1.tiny",
        "RegionTwo",
    )
    assert instance.user_data == b'#!/bin/bash\n/bin/su\necho "I am in you!"\n'
    assert instance.tags == {"tag1": "", "tag2": ""}
    assert instance.keys[0].data == keypair["public_key"]
    assert [(p.network_id, p.mac, [str(i) for i in p.ips]) for p in instance.ports] == [
        ("883fc383-5ea1-4c8b-8916-e1ddb0a9f365", "fa:16:3e:11:11:5e", ["20.20.0.4"])
    ]


def test_sources_openstack_server_sample_v2_16_flavor_by_id_and_missing_key() -> None:
    (server,) = sample("nova/servers_v2.16_servers-details-resp.json")["servers"]
    flavors = {f["id"]: f["name"] for f in sample("nova/flavors_flavors-detail-resp.json")["flavors"]}
    instance = instance_from({**server, "key_name": "deleted-key"}, [], flavors, {}, "", SRC)
    assert instance.instance_type == flavors[server["flavor"]["id"]]
    assert (instance.keys, instance.tags, instance.region) == ((), {}, "RegionOne")


def test_sources_openstack_invalid_server_field_names_the_server_and_nova_field() -> None:
    (server,) = sample("nova/servers_v2.52_servers-details-resp.json")["servers"]
    with pytest.raises(InventoryError) as refused:
        instance_from({**server, "OS-EXT-SRV-ATTR:user_data": "not base64!"}, [], {}, {}, "", SRC)
    assert (refused.value.entry, refused.value.field) == (
        "server new-server-test (764e369e-a874-4401-b7ce-43e4760888da)",
        "OS-EXT-SRV-ATTR:user_data",
    )
    with pytest.raises(InventoryError, match=r"field OS-EXT-SRV-ATTR:hostname: .*not a valid host name"):
        instance_from({**server, "OS-EXT-SRV-ATTR:hostname": "under_score"}, [], {}, {}, "", SRC)


def test_sources_openstack_server_of_a_cell_that_does_not_answer_is_no_instance() -> None:
    down = sample("nova/servers_v2.69_servers-details-resp.json")["servers"][0]
    # openstacksdk's to_dict gives every field of its Server, None where Nova said nothing.
    as_sdk_gives = {"name": None, "addresses": None, "key_name": None, "flavor": None, **down}
    up = sample("nova/servers_v2.52_servers-details-resp.json")["servers"][0]
    data = CloudData(servers=[as_sdk_gives, up])
    assert unanswered_servers(data) == (down["id"],)
    assert [i.uuid for i in describe(data, SRC).instances] == [up["id"]]
    # A server whose cell answers is described even in status UNKNOWN.
    unknown = {**up, "status": "UNKNOWN"}
    assert unanswered_servers(CloudData(servers=[unknown])) == ()
    assert [i.uuid for i in describe(CloudData(servers=[unknown]), SRC).instances] == [up["id"]]


@pytest.mark.parametrize(
    ("timing", "failures", "seconds"),
    [
        (WatchTiming(interval=30), 0, 30),
        (WatchTiming(interval=30), 1, 30),
        (WatchTiming(interval=30), 2, 60),
        (WatchTiming(interval=30), 4, 240),
        (WatchTiming(interval=30), 5, 300),
        (WatchTiming(interval=30), 10_000, 300),
        (WatchTiming(interval=600), 3, 600),
        (WatchTiming(interval=5), 7, 300),
    ],
)
def test_sources_openstack_watch_timing_doubles_the_wait_after_each_failure(
    timing: WatchTiming, failures: int, seconds: float
) -> None:
    assert timing.delay(failures) == seconds
    assert timing.delay(failures) <= timing.longest
