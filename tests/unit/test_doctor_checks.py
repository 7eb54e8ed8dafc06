"""The guest check table: every check fires on a minimal bundle, symptoms fold into causes,
findings are ordered along the path, and probe results map to the hop they break."""

from __future__ import annotations

import json

import pytest

from meta169.doctor import guest
from meta169.doctor.facts import facts_from_bundle
from meta169.doctor.model import HOPS, Report, check_table
from meta169.errors import ValidationError

ADDR = """\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536
    inet 127.0.0.1/8 scope host lo
2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500
    link/ether fa:16:3e:00:00:05 brd ff:ff:ff:ff:ff:ff
    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0
    inet6 fe80::f816:3eff:fe00:5/64 scope link
"""
ETH1 = """\
3: eth1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500
    inet 192.168.50.5/24 scope global eth1
"""
ROUTES = "default via 10.0.0.1 dev eth0\n10.0.0.0/24 dev eth0 proto kernel scope link src 10.0.0.5\n"
LEASE_PATH = "files/var/lib/dhcp/dhclient.eth0.leases"
IFUP = ('if [ -z "${NOZEROCONF}" -a "${ISALIAS}" = "no" ]; then\n'
        "    ip route add 169.254.0.0/16 dev ${REALDEVICE} metric $((1000 + 2)) scope link\nfi\n")  # fmt: skip


def lease(routes: str = "") -> str:
    option = f"  option rfc3442-classless-static-routes {routes};\n" if routes else ""
    return ('lease {\n  interface "eth0";\n  fixed-address 10.0.0.5;\n  option routers 10.0.0.1;\n'
            f"  option dhcp-server-identifier 10.0.0.2;\n{option}}}\n")  # fmt: skip


def probes(*items: dict[str, object]) -> str:
    return json.dumps(list(items))


def tcp(outcome: str, detail: str = "") -> dict[str, object]:
    return {"name": "tcp", "target": "169.254.169.254:80", "outcome": outcome, "detail": detail, "seconds": 1.0}


def http(name: str, status: int) -> dict[str, object]:
    return {"name": name, "target": f"GET /{name}", "outcome": "ok" if status < 300 else "http", "status": status}


def bundle(**files: str) -> dict[str, str]:
    """A minimal healthy-looking guest (eth0 10.0.0.5/24, default via 10.0.0.1), with ``files`` replaced."""
    return {"ip-route.txt": ROUTES, "ip-addr.txt": ADDR, "env.json": "{}", **files}


def report(data: dict[str, str]) -> Report:
    return guest.analyse(facts_from_bundle(data, label="test"))


def ids(data: dict[str, str]) -> list[str]:
    return [f.id for f in report(data).findings]


OK_PROBES = (tcp("ok"), http("openstack", 200), http("ec2", 200))

# One minimal bundle per check: every row of the table must be reachable.
TRIGGERS: dict[str, dict[str, str]] = {
    "zeroconf-route": bundle(**{"ip-route.txt": ROUTES + "169.254.0.0/16 dev eth0 scope link metric 1002\n"}),
    "link-local-wrong-nic": bundle(**{"ip-addr.txt": ADDR + ETH1,
                                      "ip-route.txt": ROUTES + "169.254.0.0/16 dev eth1 scope link metric 1003\n"}),
    "no-metadata-route": bundle(**{"ip-route.txt": "10.0.0.0/24 dev eth0 scope link\n"}),
    "ipv6-only": bundle(**{"ip-addr.txt": "2: eth0: <UP,LOWER_UP> mtu 1500\n    inet6 2001:db8::5/64 scope global\n",
                           "ip-route.txt": ""}),
    "dhcp-route-not-applied": bundle(**{LEASE_PATH: lease("32,169,254,169,254,10,0,0,1,0,10,0,0,1")}),
    "neighbour-failed": bundle(**{"ip-neigh.txt": "169.254.169.254 dev eth0  FAILED\n"}),
    "no-default-route": bundle(**{"ip-route.txt": "10.0.0.0/24 dev eth0\n169.254.169.254 via 10.0.0.2 dev eth0\n"}),
    "dhcp-no-option-121": bundle(**{LEASE_PATH: lease()}),
    "nozeroconf-unset": bundle(**{"files/etc/sysconfig/network-scripts/ifup-eth": IFUP,
                                  "files/etc/sysconfig/network": "NETWORKING=yes\n"}),
    "nm-link-local": bundle(**{"files/etc/NetworkManager/system-connections/c.nmconnection":
                               "[connection]\nid=c\n[ipv4]\nmethod=auto\nlink-local=3\n"}),
    "networkd-ipv4ll": bundle(**{"files/etc/systemd/network/e.network": "[Network]\nLinkLocalAddressing=yes\n"}),
    "avahi-autoipd": bundle(**{"ps.txt": "sshd\navahi-autoipd\n"}),
    "ipv4ll-address": bundle(**{"ip-addr.txt": ADDR + "    inet 169.254.3.4/16 scope link eth0\n"}),
    "ipv6-metadata": bundle(**{"probes.json": probes(tcp("timeout"), {"name": "ipv6", "target": "GET v6",
                                                                       "outcome": "ok", "status": 200,
                                                                       "interface": "eth0"})}),
    "gateway-unreachable": bundle(**{"ip-neigh.txt": "10.0.0.1 dev eth0  INCOMPLETE\n"}),
    "metadata-no-answer": bundle(**{"probes.json": probes(tcp("timeout", "connect timed out"))}),
    "metadata-refused": bundle(**{"probes.json": probes(tcp("refused", "Connection refused"))}),
    "metadata-server-error": bundle(**{"probes.json": probes(tcp("ok"), http("openstack", 502), http("ec2", 504))}),
    "metadata-forbidden": bundle(**{"probes.json": probes(tcp("ok"), http("openstack", 403), http("ec2", 403))}),
    "metadata-not-found": bundle(**{"probes.json": probes(tcp("ok"), http("openstack", 404), http("ec2", 404))}),
    "proxy-env": bundle(**{"env.json": '{"http_proxy": "http://proxy:3128"}'}),
    "proxy-env-cidr": bundle(**{"env.json": '{"http_proxy": "http://p:3128", "no_proxy": "169.254.0.0/16"}'}),
    "imdsv2-required": bundle(**{"probes.json": probes(tcp("ok"), http("openstack", 200), http("ec2", 401),
                                                       http("imdsv2", 200))}),
    "imdsv2-rejected": bundle(**{"probes.json": probes(*OK_PROBES, http("imdsv2", 400))}),
    "imdsv2-unavailable": bundle(**{"probes.json": probes(*OK_PROBES, http("imdsv2", 405))}),
}  # fmt: skip


def test_doctor_checks_table_is_valid_and_fully_triggered() -> None:
    assert {c.id for c in guest.CHECKS} == set(TRIGGERS)
    assert all(c.hop in HOPS for c in guest.CHECKS)


@pytest.mark.parametrize("check_id", sorted(TRIGGERS))
def test_doctor_checks_each_check_fires_on_its_trigger(check_id: str) -> None:
    found = report(TRIGGERS[check_id]).findings
    assert check_id in [f.id for f in found]
    finding = next(f for f in found if f.id == check_id)
    assert finding.evidence and finding.summary


def test_doctor_checks_a_healthy_minimal_guest_has_no_findings() -> None:
    data = bundle(**{"ip-route.txt": ROUTES + "169.254.169.254 via 10.0.0.1 dev eth0\n",
                     LEASE_PATH: lease("32,169,254,169,254,10,0,0,1,0,10,0,0,1"),
                     "probes.json": probes(*OK_PROBES, http("imdsv2", 200))})  # fmt: skip
    result = report(data)
    assert result.findings == ()
    assert [h.state for h in result.path] == ["ok"] * 7


def test_doctor_checks_symptoms_fold_into_their_cause() -> None:
    data = bundle(**{"ip-route.txt": ROUTES + "169.254.0.0/16 dev eth0 scope link metric 1002\n",
                     "ip-neigh.txt": "169.254.169.254 dev eth0  FAILED\n",
                     "probes.json": probes(tcp("unreachable", "No route to host"))})  # fmt: skip
    (finding,) = report(data).findings
    assert finding.id == "zeroconf-route"
    assert "ip-neigh.txt: 169.254.169.254 dev eth0  FAILED" in finding.evidence
    assert any("unreachable (No route to host)" in e for e in finding.evidence)


def test_doctor_checks_a_warning_never_hides_an_error() -> None:
    """A stale FAILED entry (warning) must not swallow a failed connect through the gateway (error)."""
    data = bundle(**{"ip-neigh.txt": "169.254.169.254 dev eth0  FAILED\n",
                     "probes.json": probes(tcp("timeout", "connect timed out"))})  # fmt: skip
    assert ids(data) == ["metadata-no-answer", "neighbour-failed"]


def test_doctor_checks_zeroconf_that_answers_on_link_is_a_warning() -> None:
    data = bundle(**{"ip-route.txt": ROUTES + "169.254.0.0/16 dev eth0 scope link metric 1002\n",
                     "ip-neigh.txt": "169.254.169.254 dev eth0 lladdr fa:16:3e:00:00:02 REACHABLE\n"})  # fmt: skip
    (finding,) = report(data).findings
    assert (finding.id, finding.severity) == ("zeroconf-route", "warning")


def test_doctor_checks_order_errors_first_then_along_the_path() -> None:
    data = bundle(**{"ip-route.txt": ROUTES + "169.254.0.0/16 dev eth0 scope link metric 1002\n",
                     "env.json": '{"http_proxy": "http://proxy:3128"}', LEASE_PATH: lease(),
                     "ps.txt": "avahi-autoipd\n"})  # fmt: skip
    assert ids(data) == ["proxy-env", "zeroconf-route", "dhcp-no-option-121", "avahi-autoipd"]


def test_doctor_checks_no_answer_through_the_gateway_breaks_the_redirect_hop() -> None:
    result = report(TRIGGERS["metadata-no-answer"])
    assert result.broken_hop == "redirect"
    states = {h.hop: h.state for h in result.path}
    assert states["route"] == "ok" and states["proxy"] == "unknown"


@pytest.mark.parametrize(
    ("trigger", "hop"),
    [("metadata-refused", "proxy"), ("metadata-server-error", "server"), ("metadata-not-found", "registry"),
     ("zeroconf-route", "route"), ("proxy-env", "guest"), ("gateway-unreachable", "next-hop")],
)  # fmt: skip
def test_doctor_checks_probe_outcomes_break_the_right_hop(trigger: str, hop: str) -> None:
    assert report(TRIGGERS[trigger]).broken_hop == hop


def test_doctor_checks_not_found_names_the_guest_address() -> None:
    finding = report(TRIGGERS["metadata-not-found"]).findings[0]
    assert "this guest's addresses: 10.0.0.5 on eth0" in finding.evidence


def test_doctor_checks_dhcp_route_not_applied_gives_the_exact_route_command() -> None:
    data = bundle(**{"ip-route.txt": "10.0.0.0/24 dev eth0\n", LEASE_PATH: lease("32,169,254,169,254,10,0,0,2")})
    found = {f.id: f for f in report(data).findings}
    assert list(found)[:2] == ["no-metadata-route", "dhcp-route-not-applied"]
    assert found["no-metadata-route"].fix[0].argv == (
        "ip", "route", "add", "169.254.169.254/32", "via", "10.0.0.2", "dev", "eth0")  # fmt: skip


def test_doctor_checks_rfc3442_default_route_pitfall_is_explained() -> None:
    data = bundle(**{"ip-route.txt": "10.0.0.0/24 dev eth0\n169.254.169.254 via 10.0.0.1 dev eth0\n",
                     LEASE_PATH: lease("32,169,254,169,254,10,0,0,1")})  # fmt: skip
    finding = next(f for f in report(data).findings if f.id == "no-default-route")
    assert any("RFC 3442 clients ignore option 3" in e for e in finding.evidence)


def test_doctor_checks_dhclient_conf_that_does_not_request_121() -> None:
    conf = "request subnet-mask, routers, domain-name-servers;\n"
    data = bundle(**{LEASE_PATH: lease(), "files/etc/dhcp/dhclient.conf": conf})
    finding = next(f for f in report(data).findings if f.id == "dhcp-no-option-121")
    assert any("does not ask for option 121" in e for e in finding.evidence)
    assert finding.fix[0].when == "persist"


def test_doctor_checks_unparseable_sources_become_notes() -> None:
    data = bundle(**{"ip-route.json": "{not json", "ip-neigh.json": "[1, 2]"})
    result = report(data)
    assert any(n.startswith("ip-route.json: cannot parse") for n in result.notes)
    assert result.path[1].detail.startswith("default via 10.0.0.1")  # fell back to ip-route.txt


def test_doctor_checks_table_refuses_duplicates_and_unknown_folds() -> None:
    row = guest.CHECKS[0]
    with pytest.raises(ValidationError):
        check_table([row, row])
    with pytest.raises(ValidationError):
        check_table([guest.CHECKS[5]])  # neighbour-failed folds into checks not in this table
