"""Route tables from every format, and the route the kernel picks for 169.254.169.254."""

from __future__ import annotations

import ipaddress

import pytest

from meta169.doctor.routes import (
    METADATA_V4,
    Route,
    parse_ip_route_json,
    parse_ip_route_line,
    parse_ip_route_text,
    parse_ip_rule_json,
    parse_ip_rule_text,
    parse_proc_net_route,
    parse_route_print,
    select_route,
)

V4 = ipaddress.IPv4Address
NET = ipaddress.ip_network


def _routes(text: str) -> tuple[Route, ...]:
    return parse_ip_route_text(text, 4)


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "dest", "gateway", "dev", "metric", "rtype", "table"),
    [
        ("169.254.0.0/16 dev eth0  scope link  metric 1002 ", "169.254.0.0/16", None, "eth0", 1002, "unicast", "main"),
        ("default via 10.0.0.1 dev eth0 proto dhcp src 10.0.0.5 metric 100", "0.0.0.0/0", "10.0.0.1", "eth0", 100,
         "unicast", "main"),
        ("169.254.169.254 via 10.0.0.1 dev ens3 proto dhcp src 10.0.0.13 metric 100", "169.254.169.254/32",
         "10.0.0.1", "ens3", 100, "unicast", "main"),
        ("local 10.0.0.5 dev eth0 table local proto kernel scope host src 10.0.0.5", "10.0.0.5/32", None, "eth0", 0,
         "local", "local"),
        ("unreachable 169.254.169.254 metric 5", "169.254.169.254/32", None, "", 5, "unreachable", "main"),
        ("default via 10.0.0.1 dev eth0  metric 202 mtu 1400 expires 300sec pref medium", "0.0.0.0/0", "10.0.0.1",
         "eth0", 202, "unicast", "main"),
        ("10.1.0.0/16 via 10.0.0.254 dev eth0 onlink linkdown", "10.1.0.0/16", "10.0.0.254", "eth0", 0, "unicast",
         "main"),
    ],
)  # fmt: skip
def test_doctor_routes_parse_ip_route_lines(
    line: str, dest: str, gateway: str | None, dev: str, metric: int, rtype: str, table: str
) -> None:
    route = parse_ip_route_line(line, 4)
    assert route is not None
    assert (str(route.destination), route.gateway, route.dev, route.metric, route.type, route.table) == (
        dest, V4(gateway) if gateway else None, dev, metric, rtype, table,
    )  # fmt: skip
    assert route.text == line.rstrip()


def test_doctor_routes_text_multipath_takes_the_first_next_hop() -> None:
    routes = _routes("default proto static metric 100 \n\tnexthop via 10.0.0.1 dev eth0 weight 1 \n"
                     "\tnexthop via 10.0.1.1 dev eth1 weight 1 \n")  # fmt: skip
    assert len(routes) == 1
    assert (routes[0].gateway, routes[0].dev) == (V4("10.0.0.1"), "eth0")


def test_doctor_routes_evidence_keeps_the_exact_line() -> None:
    route = _routes("169.254.0.0/16 dev eth0  scope link  metric 1002 \n")[0]
    assert route.evidence == "169.254.0.0/16 dev eth0  scope link  metric 1002"
    assert route.render() == "169.254.0.0/16 dev eth0 scope link metric 1002"


def test_doctor_routes_parse_ip_json_with_tables_multipath_and_v6_default() -> None:
    v4 = parse_ip_route_json(
        '[{"dst":"default","nexthops":[{"gateway":"10.0.0.1","dev":"eth0","weight":1}],"metric":5},'
        '{"type":"local","dst":"10.0.0.5","table":"local","dev":"eth0","protocol":"kernel","scope":"host",'
        '"prefsrc":"10.0.0.5","flags":[]},{"dst":"169.254.0.0/16","dev":"eth0","scope":"link","metric":1002,'
        '"flags":["linkdown"]}]',
        4,
    )
    assert [str(r.destination) for r in v4] == ["0.0.0.0/0", "10.0.0.5/32", "169.254.0.0/16"]
    assert v4[0].gateway == V4("10.0.0.1") and v4[0].dev == "eth0"
    assert v4[1].table == "local" and v4[1].type == "local"
    assert v4[2].flags == ("linkdown",)
    assert v4[2].render() == "169.254.0.0/16 dev eth0 scope link metric 1002 linkdown"
    v6 = parse_ip_route_json('[{"dst":"default","gateway":"fe80::1","dev":"eth0","metric":100}]', 6)
    assert str(v6[0].destination) == "::/0"


def test_doctor_routes_parse_proc_net_route_little_endian_hex() -> None:
    text = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t0000FEA9\t00000000\t0001\t0\t0\t1002\t0000FFFF\t0\t0\t0\n"
        "eth0\tFEA9FEA9\t00000000\t0201\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n"
        "eth1\t0032A8C0\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # not RTF_UP: skipped
    )
    routes = parse_proc_net_route(text)
    assert [r.render() for r in routes] == [
        "default via 10.0.0.1 dev eth0",
        "169.254.0.0/16 dev eth0 metric 1002",
        "unreachable 169.254.169.254 dev eth0",
    ]


def test_doctor_routes_parse_windows_route_print() -> None:
    text = (
        "IPv4 Route Table\n===\nActive Routes:\nNetwork Destination        Netmask          Gateway       Interface  "
        "Metric\n          0.0.0.0          0.0.0.0         10.0.0.1        10.0.0.18     15\n"
        "      169.254.0.0      255.255.0.0         On-link     169.254.3.9    281\n"
        "===\nPersistent Routes:\n  Network Address          Netmask  Gateway Address  Metric\n"
        "  169.254.169.254  255.255.255.255         10.0.0.1       1\n"
        "IPv6 Route Table\n"
    )
    routes = parse_route_print(text)
    assert [(str(r.destination), r.gateway, r.dev, r.metric) for r in routes] == [
        ("0.0.0.0/0", V4("10.0.0.1"), "10.0.0.18", 15),
        ("169.254.0.0/16", None, "169.254.3.9", 281),
    ]


def test_doctor_routes_parse_rules_json_and_text() -> None:
    js = parse_ip_rule_json(
        '[{"priority":0,"src":"all","table":"local"},{"priority":100,"src":"all","dst":"169.254.169.254",'
        '"dstlen":32,"table":"7"},{"priority":32765,"not":null,"src":"all","fwmark":"0xca6c","table":"51820"},'
        '{"priority":32766,"src":"all","table":"main"}]'
    )
    assert [r.priority for r in js] == [0, 100, 32765, 32766]
    assert js[1].dst == NET("169.254.169.254/32") and js[1].table == "7"
    assert js[2].invert and js[2].fwmark == 0xCA6C
    txt = parse_ip_rule_text(
        "0:\tfrom all lookup local\n32764:\tfrom all lookup main suppress_prefixlength 0\n"
        "32765:\tnot from all fwmark 0xca6c lookup 51820\n32766:\tfrom all lookup main\n"
        "32767:\tfrom all lookup default\n40000:\tfrom all uidrange 1000-2000 lookup 9\n"
    )
    assert txt[1].suppress_prefixlength == 0
    assert txt[2].invert and txt[2].fwmark == 0xCA6C
    assert txt[5].unsupported == ("uidrange",)


# --- selection ------------------------------------------------------------------------------------


def test_doctor_routes_longest_prefix_beats_metric() -> None:
    routes = _routes("default via 10.0.0.1 dev eth0 metric 0\n169.254.0.0/16 dev eth0 scope link metric 1002\n")
    choice = select_route(routes, METADATA_V4)
    assert choice.verdict == "route" and str(choice.route.destination) == "169.254.0.0/16"  # type: ignore[union-attr]
    assert choice.runner_up is not None and choice.runner_up.is_default


def test_doctor_routes_host_route_beats_the_zeroconf_route() -> None:
    routes = _routes("169.254.0.0/16 dev eth0 scope link metric 1002\n169.254.169.254 via 10.0.0.1 dev eth0\n")
    route = select_route(routes, METADATA_V4).route
    assert route is not None and route.gateway == V4("10.0.0.1")


def test_doctor_routes_equal_prefixes_lowest_metric_wins() -> None:
    routes = _routes("169.254.0.0/16 dev eth1 scope link metric 1003\n169.254.0.0/16 dev eth0 scope link metric 1002\n")
    route = select_route(routes, METADATA_V4).route
    assert route is not None and route.dev == "eth0"


def test_doctor_routes_no_route_and_reject_routes() -> None:
    assert select_route(_routes("10.0.0.0/24 dev eth0\n"), METADATA_V4).verdict == "none"
    choice = select_route(_routes("default via 10.0.0.1 dev eth0\nprohibit 169.254.169.254\n"), METADATA_V4)
    assert choice.verdict == "prohibit"


def test_doctor_routes_policy_rule_to_metadata_uses_its_table() -> None:
    routes = _routes("default via 10.0.0.1 dev eth0\n169.254.169.254 via 192.168.5.1 dev eth1 table 7\n")
    rules = parse_ip_rule_text("0:\tfrom all lookup local\n100:\tfrom all to 169.254.169.254 lookup 7\n"
                               "32766:\tfrom all lookup main\n")  # fmt: skip
    choice = select_route(routes, METADATA_V4, rules)
    assert choice.route is not None and choice.route.dev == "eth1"
    assert choice.rule is not None and choice.rule.priority == 100


def test_doctor_routes_source_rules_do_not_match_unbound_sockets() -> None:
    routes = _routes("default via 10.0.0.1 dev eth0\ndefault via 192.168.5.1 dev eth1 table 7\n")
    rules = parse_ip_rule_text(
        "0:\tfrom all lookup local\n100:\tfrom 192.168.5.10 lookup 7\n32766:\tfrom all lookup main\n"
    )
    route = select_route(routes, METADATA_V4, rules).route
    assert route is not None and route.dev == "eth0"


def test_doctor_routes_unreachable_rule() -> None:
    rules = parse_ip_rule_text("0:\tfrom all lookup local\n10:\tfrom all to 169.254.0.0/16 unreachable\n"
                               "32766:\tfrom all lookup main\n")  # fmt: skip
    choice = select_route(_routes("default via 10.0.0.1 dev eth0\n"), METADATA_V4, rules)
    assert choice.verdict == "unreachable" and choice.rule is not None


WG_RULES = (
    "0:\tfrom all lookup local\n32764:\tfrom all lookup main suppress_prefixlength 0\n"
    "32765:\tnot from all fwmark 0xca6c lookup 51820\n32766:\tfrom all lookup main\n32767:\tfrom all lookup default\n"
)


def test_doctor_routes_wireguard_full_tunnel_captures_metadata_without_a_host_route() -> None:
    routes = _routes("default via 10.0.0.1 dev eth0\ndefault dev wg0 table 51820 scope link\n")
    choice = select_route(routes, METADATA_V4, parse_ip_rule_text(WG_RULES))
    assert choice.route is not None and choice.route.dev == "wg0"


def test_doctor_routes_wireguard_full_tunnel_keeps_a_host_route_in_main() -> None:
    routes = _routes("default via 10.0.0.1 dev eth0\n169.254.169.254 via 10.0.0.1 dev eth0\n"
                     "default dev wg0 table 51820 scope link\n")  # fmt: skip
    choice = select_route(routes, METADATA_V4, parse_ip_rule_text(WG_RULES))
    assert choice.route is not None and choice.route.dev == "eth0"


def test_doctor_routes_unsupported_rules_are_skipped_and_reported() -> None:
    rules = parse_ip_rule_text(
        "0:\tfrom all lookup local\n10:\tfrom all ipproto tcp lookup 9\n32766:\tfrom all lookup main\n"
    )
    choice = select_route(_routes("default via 10.0.0.1 dev eth0\n"), METADATA_V4, rules)
    assert choice.verdict == "route"
    assert [r.priority for r in choice.skipped_rules] == [10]
