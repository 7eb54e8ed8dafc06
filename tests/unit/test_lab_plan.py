"""The lab's plan and state file: pure functions of a LabConfig."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path

import pytest

from meta169.errors import ConfigError, LabError
from meta169.lab import plan as lp
from meta169.lab.state import LabState, ProcessRecord
from meta169.plumbing import dhcp_options, dnsmasq, iptables
from meta169.plumbing.netns import check_ifname, check_name
from meta169.proxy.server import parse_listeners

STATE = Path("/run/meta169-lab/x")


def _plan(name: str = "x", vms: int = 2) -> lp.LabPlan:
    return lp.plan_lab(lp.LabConfig(name=name, state_dir=STATE, vms_per_network=vms, python="/usr/bin/python3"))


@pytest.mark.parametrize("name", ["", "A", "a-b", "a_b", "abcdefghijklm", "a b", "../x"])
def test_lab_config_rejects_bad_names(name: str) -> None:
    with pytest.raises(ConfigError):
        lp.LabConfig(name=name)


@pytest.mark.parametrize("vms", [0, 10, -1])
def test_lab_config_rejects_vm_counts(vms: int) -> None:
    with pytest.raises(ConfigError):
        lp.LabConfig(vms_per_network=vms)


def test_lab_config_default_state_dir_is_under_run() -> None:
    assert lp.LabConfig(name="demo").directory == Path("/run/meta169-lab/demo")
    with pytest.raises(ConfigError):
        lp.LabConfig(state_dir=Path("relative/dir"))


def test_lab_plan_two_tenants_same_ips_distinct_identities() -> None:
    plan = _plan()
    vms = {vm.name: vm for vm in plan.vms}
    assert sorted(vms) == ["a1", "a2", "b1", "b2"]
    assert [str(vms[n].ip) for n in ("a1", "a2", "b1", "b2")] == ["10.0.0.11", "10.0.0.12"] * 2
    assert len({vm.uuid for vm in plan.vms}) == 4
    assert len({vm.mac for vm in plan.vms}) == 4
    assert all(vm.mac.startswith("fa:16:3e:") for vm in plan.vms)
    assert {vm.mode for vm in plan.tenant("a").vms} == {"router"}
    assert {vm.mode for vm in plan.tenant("b").vms} == {"isolated"}
    assert plan.tenant("a").router_id == "router-a" and plan.tenant("b").router_id is None
    assert plan.tenant("a").network.subnets[0].gateway == lp.GATEWAY_IP
    assert plan.tenant("b").network.subnets[0].gateway is None


def test_lab_plan_uuids_are_stable_per_lab_name() -> None:
    assert [vm.uuid for vm in _plan("x").vms] == [vm.uuid for vm in _plan("x").vms]
    assert not {vm.uuid for vm in _plan("x").vms} & {vm.uuid for vm in _plan("y").vms}


@pytest.mark.parametrize("vms", [1, 2, 9])
def test_lab_plan_names_fit_the_kernel_and_carry_the_prefix(vms: int) -> None:
    plan = _plan("abcdefghijkl", vms)
    assert len(plan.namespaces) == len(set(plan.namespaces)) == 5 + 2 * vms
    for ns in plan.namespaces:
        check_name(ns)
        assert ns.startswith("m169lab-abcdefghijkl-")
    for name in (lp.BRIDGE, lp.ROUTER_IFACE, lp.DHCP_IFACE, lp.VM_IFACE, *(vm.switch_port for vm in plan.vms)):
        check_ifname(name)


def test_lab_plan_prefixes_of_two_labs_never_overlap() -> None:
    # "a" and "ab" labs: the dash after the name keeps their sweeps apart.
    assert not any(ns.startswith(lp.netns_prefix("a")) for ns in _plan("ab").namespaces)


@pytest.mark.parametrize(
    ("mac", "link_local"),
    [
        # RFC 4291 appendix A: flip the universal/local bit, insert ff:fe.
        ("fa:16:3e:0a:00:0b", "fe80::f816:3eff:fe0a:b"),
        ("00:00:5e:00:53:01", "fe80::200:5eff:fe00:5301"),
        ("02:00:00:00:00:00", "fe80::ff:fe00:0"),
    ],
)
def test_lab_eui64_link_local(mac: str, link_local: str) -> None:
    assert lp.eui64_link_local(mac) == ipaddress.IPv6Address(link_local)


def test_lab_ssh_key_is_openssh_wire_format() -> None:
    line = lp.lab_ssh_key("8d1a3c52-3f0e-4c4e-9a53-2f6a3c1b7e10", "a1@lab")
    kind, blob, comment = line.split(" ")
    raw = base64.b64decode(blob)
    assert (kind, comment) == ("ssh-ed25519", "a1@lab")
    assert raw[:4] == (11).to_bytes(4, "big") and raw[4:15] == b"ssh-ed25519"
    assert raw[15:19] == (32).to_bytes(4, "big") and len(raw) == 19 + 32
    assert lp.lab_ssh_key("other", "a1@lab") != line


def test_lab_instances_know_ipv4_and_link_local() -> None:
    plan = _plan()
    for vm in plan.vms:
        inst = lp.instance(plan, vm)
        (port,) = inst.ports
        assert (inst.uuid, inst.hostname, port.network_id, port.mac) == (vm.uuid, vm.name, vm.network_id, vm.mac)
        assert port.ips == (vm.ip, vm.link_local)
        assert inst.user_data is not None and f"vm {vm.name}".encode() in inst.user_data
        assert inst.project_id == f"proj-{vm.tenant}"
    assert [r.network_ids for r in lp.routers(plan)] == [("net-a",)]


def test_lab_listeners_parse_as_proxy_listeners() -> None:
    plan = _plan()
    listeners = parse_listeners(lp.listeners_document(plan), source="lab")
    got = {(lst.netns, str(lst.address), lst.interface, lst.port, lst.binding.scope) for lst in listeners}
    assert got == {
        ("m169lab-x-rtr-a", "0.0.0.0", None, 9697, "router router-a"),
        ("m169lab-x-rtr-a", "::", None, 9697, "router router-a"),
        ("m169lab-x-dhcp-b", "169.254.169.254", None, 80, "network net-b"),
        ("m169lab-x-dhcp-b", "fe80::a9fe:a9fe", "m169tap", 80, "network net-b"),
    }


@pytest.mark.parametrize(("tenant", "hop"), [("a", "10.0.0.1"), ("b", "10.0.0.2")])
def test_lab_dnsmasq_pushes_metadata_host_route_first(tenant: str, hop: str) -> None:
    plan = _plan()
    text = dnsmasq.render_config(lp.dnsmasq_config(plan, plan.tenant(tenant)))
    line = next(x for x in text.splitlines() if "option:classless-static-route," in x)
    routes = dhcp_options.from_dnsmasq(line.split("option:classless-static-route,", 1)[1])
    assert str(routes[0]) == f"169.254.169.254/32 via {hop}"
    assert f"interface={lp.DHCP_IFACE}" in text
    hosts = dnsmasq.render_hosts(lp.dnsmasq_config(plan, plan.tenant(tenant)))
    assert hosts.splitlines() == [f"{vm.mac},{vm.ip},{vm.name}" for vm in plan.tenant(tenant).vms]


def test_lab_router_rules_both_families_on_the_router_leg() -> None:
    plan = _plan()
    v4, v6 = lp.router_rulesets(plan.tenant("a"))
    assert (v4.family, v6.family) == (4, 6)
    nat6 = [r.save_line() for r in v6.rules if r.table == "nat"]
    redirect = "-p tcp -m tcp --dport 80 -j REDIRECT --to-ports 9697"
    assert nat6 == [f"-A meta169-PREROUTING -d fe80::a9fe:a9fe/128 -i {lp.ROUTER_IFACE} {redirect}"]
    assert v4 == iptables.router_rules([lp.ROUTER_IFACE], family=4)
    assert lp.router_rulesets(plan.tenant("b")) == ()


def test_lab_commands_and_markers_stay_inside_the_state_dir() -> None:
    plan = _plan()
    markers = lp.process_markers(plan)
    assert len(markers) == len(set(markers)) == 2 + 2 + 4
    assert all(str(STATE) + "/" in m for m in markers)
    serve, proxy = lp.serve_argv(plan), lp.proxy_argv(plan)
    assert markers[0] in serve and markers[1] in proxy
    assert serve[:3] == ["/usr/bin/python3", "-m", "meta169"]
    assert f"sqlite://{STATE}/registry.db" in serve


def test_lab_state_round_trips_through_json() -> None:
    config = lp.LabConfig(name="x", state_dir=STATE, python="/usr/bin/python3")
    state = (
        LabState(config, created_at=1.5)
        .with_namespace("m169lab-x-a1")
        .with_process(ProcessRecord("serve", 42))
        .with_process(ProcessRecord("dhclient-a1", 43, "m169lab-x-a1"))
        .with_process(ProcessRecord("serve", 44))
    )
    assert [p.pid for p in state.processes] == [43, 44]
    back = LabState.from_json(json.loads(json.dumps(state.to_json())), source="t")
    assert back == state
    assert back.without_process("serve").process("serve") is None
    assert back.without_namespace("m169lab-x-a1").namespaces == ()


@pytest.mark.parametrize(
    "data",
    [[], {"version": 99}, {"version": 1, "status": "weird"}, {"version": 1, "status": "up", "config": {}}],
)
def test_lab_state_rejects_malformed_files(data: object) -> None:
    with pytest.raises(LabError):
        LabState.from_json(data, source="t")
