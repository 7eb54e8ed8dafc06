"""Interfaces and neighbour entries from ip JSON, ip text and /proc/net/arp."""

from __future__ import annotations

import ipaddress

from meta169.doctor.links import (
    parse_ip_addr_json,
    parse_ip_addr_text,
    parse_ip_neigh_json,
    parse_ip_neigh_text,
    parse_proc_net_arp,
)

IP = ipaddress.ip_address


def test_doctor_links_neighbour_states_from_every_source() -> None:
    text = parse_ip_neigh_text(
        "169.254.169.254 dev eth0  FAILED\n10.0.0.1 dev eth0 lladdr fa:16:3e:5c:2a:01 REACHABLE\n"
        "10.0.0.3 dev eth0  INCOMPLETE\nfe80::1 dev eth0 lladdr 52:54:00:12:35:02 router STALE\n"
    )
    assert [(str(n.address), n.state, n.unanswered, n.answered) for n in text] == [
        ("169.254.169.254", "FAILED", True, False),
        ("10.0.0.1", "REACHABLE", False, True),
        ("10.0.0.3", "INCOMPLETE", True, False),
        ("fe80::1", "STALE", False, True),
    ]
    assert text[0].evidence == "169.254.169.254 dev eth0  FAILED"
    js = parse_ip_neigh_json('[{"dst":"169.254.169.254","dev":"ens3","state":["INCOMPLETE"]}]')
    assert js[0].unanswered and js[0].evidence == "169.254.169.254 dev ens3 INCOMPLETE"
    arp = parse_proc_net_arp(
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "169.254.169.254  0x1         0x0         00:00:00:00:00:00     *        eth0\n"
        "10.0.0.1         0x1         0x2         fa:16:3e:5c:2a:01     *        eth0\n"
        "10.0.0.9         0x1         0x6         fa:16:3e:00:00:09     *        eth0\n"
    )
    assert [(n.state, n.lladdr) for n in arp] == [("INCOMPLETE", ""), ("REACHABLE", "fa:16:3e:5c:2a:01"),
                                                   ("PERMANENT", "fa:16:3e:00:00:09")]  # fmt: skip


def test_doctor_links_addresses_from_text_and_json() -> None:
    text = parse_ip_addr_text(
        "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536\n    inet 127.0.0.1/8 scope host lo\n"
        "7: eth0@if8: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500\n"
        "    link/ether fa:16:3e:00:00:0b brd ff:ff:ff:ff:ff:ff\n"
        "    inet 10.0.0.11/24 brd 10.0.0.255 scope global eth0\n    inet6 fe80::f816:3eff:fe00:b/64 scope link\n"
        "8: eth1: <BROADCAST,MULTICAST> mtu 1500\n"
    )
    lo, eth0, eth1 = text
    assert lo.is_loopback and not eth0.is_loopback
    assert (eth0.name, eth0.index, eth0.mac, eth0.up) == ("eth0", 7, "fa:16:3e:00:00:0b", True)
    assert [str(a) for a in eth0.addresses] == ["10.0.0.11/24", "fe80::f816:3eff:fe00:b/64"]
    assert not eth1.up and eth1.addresses == ()
    (js,) = parse_ip_addr_json('[{"ifindex":2,"ifname":"ens3","flags":["UP"],"address":"fa:16:3e:00:00:01",'
                               '"addr_info":[{"family":"inet","local":"10.0.0.5","prefixlen":24}]}]')  # fmt: skip
    assert js.ipv4[0].ip == IP("10.0.0.5") and js.ipv6 == ()
