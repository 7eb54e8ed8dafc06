"""The host doctor over captured command output (tests/unit/corpus/_host/, taken from real
namespaces carrying meta169's rules and listeners), a real in-memory registry and the real
proxy HMAC; the command runner and the request to serve are the injected seams."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from meta169.api.identity import caller_from_proxy_headers
from meta169.client.transport import Reply
from meta169.doctor import host
from meta169.doctor.discover import find_proxies
from meta169.doctor.host_collect import (
    PROBE_CALLER,
    HostCollector,
    HostRequest,
    collect_host,
    resolve_with,
)
from meta169.errors import ClientError, HTTPError, ValidationError
from meta169.http.stamp import ReplayGuard, verify
from meta169.model import Caller, Instance, Network, Port, Subnet
from meta169.plumbing.command import CommandResult
from meta169.registry.memory import MemoryRegistry

CAPTURES = Path(__file__).parent / "corpus" / "_host"
ROUTER = CAPTURES / "router-healthy"
DHCP = CAPTURES / "dhcp-isolated-healthy"
RTR_NS, DHCP_NS = "m169lab-t-rtr-a", "m169lab-t-dhcp-b"
SECRET = b"0123456789abcdef0123456789abcdef"
LISTENERS = "/run/meta169-lab/t/listeners.json"
CONF = "/run/meta169-lab/t/dnsmasq-b/dnsmasq.conf"
EMPTY_SAVE = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"


def captured(path: Path) -> str:
    return path.read_text()


class Runner:
    """Answers each argv with a captured output; anything else exits 1."""

    def __init__(self, outputs: Mapping[tuple[str, ...], str]) -> None:
        self.outputs = dict(outputs)
        self.seen: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult:
        key = tuple(argv)
        self.seen.append(key)
        if key in self.outputs:
            return CommandResult(key, 0, self.outputs[key], "")
        return CommandResult(key, 1, "", "not captured")


def outputs(**override: str) -> dict[tuple[str, ...], str]:
    out = {
        ("ip", "netns", "list"): f"{RTR_NS} (id: 3)\n{DHCP_NS} (id: 2)\n",
        ("ip", "netns", "exec", RTR_NS, "iptables-save"): captured(ROUTER / "iptables-save.txt"),
        ("ip", "netns", "exec", RTR_NS, "ip6tables-save"): captured(ROUTER / "ip6tables-save.txt"),
        ("ip", "-n", RTR_NS, "-j", "addr", "show"): captured(ROUTER / "ip-addr.json"),
        ("ip", "netns", "exec", RTR_NS, "cat", "/proc/net/tcp", "/proc/net/tcp6"):
            captured(ROUTER / "proc-net-tcp.txt"),
        ("ip", "-n", DHCP_NS, "-j", "addr", "show"): captured(DHCP / "ip-addr.json"),
        ("ip", "netns", "exec", DHCP_NS, "cat", "/proc/net/tcp", "/proc/net/tcp6"): captured(DHCP / "proc-net-tcp.txt"),
        ("ip", "netns", "pids", DHCP_NS): "4242\n",
    }  # fmt: skip
    keys = {"save4": ("ip", "netns", "exec", RTR_NS, "iptables-save"),
            "rtr_tcp": ("ip", "netns", "exec", RTR_NS, "cat", "/proc/net/tcp", "/proc/net/tcp6"),
            "dhcp_addr": ("ip", "-n", DHCP_NS, "-j", "addr", "show"),
            "dhcp_pids": ("ip", "netns", "pids", DHCP_NS)}  # fmt: skip
    for name, value in override.items():
        out[keys[name]] = value
    return out


LISTENER_FILE = json.dumps({"listeners": [
    {"netns": RTR_NS, "address": "0.0.0.0", "port": 9697, "router": "router-a"},
    {"netns": RTR_NS, "address": "::", "port": 9697, "router": "router-a"},
    {"netns": DHCP_NS, "address": "169.254.169.254", "port": 80, "network": "net-b"},
]})  # fmt: skip
PROXY_ARGV = ("/usr/bin/python3", "-m", "meta169", "-v", "proxy", "--upstream", "127.0.0.1:8775",
              "--secret-file", "/etc/meta169/proxy.secret", "--listeners", LISTENERS)  # fmt: skip
DNSMASQ_ARGV = ("dnsmasq", f"--conf-file={CONF}", "--keep-in-foreground")


def registry() -> MemoryRegistry:
    reg = MemoryRegistry()
    reg.put_network(Network(id="net-b", subnets=(Subnet(cidr=ipaddress.ip_network("10.0.0.0/24")),)))
    reg.put_instance(
        Instance(
            uuid="11111111-1111-4111-8111-111111111111",
            name="b1",
            ports=(Port("net-b", "fa:16:3e:0b:00:0b", (ipaddress.ip_address("10.0.0.11"),)),),
        )
    )
    reg.put_instance(
        Instance(
            uuid="22222222-2222-4222-8222-222222222222",
            name="b1-ghost",
            ports=(Port("net-b", "fa:16:3e:0b:00:ff", (ipaddress.ip_address("10.0.0.99"),)),),
        )
    )
    reg.put_instance(
        Instance(
            uuid="33333333-3333-4333-8333-333333333333",
            name="b1-dup",
            ports=(Port("net-b", "fa:16:3e:0b:01:ff", (ipaddress.ip_address("10.0.0.99"),)),),
        )
    )
    return reg  # fmt: skip


def serve(secret: bytes = SECRET, *, down: bool = False, body: bytes | None = None):  # type: ignore[no-untyped-def]
    """serve's proxy listener on TCP: the real HMAC check, then 200 or 404 by the registry."""
    reg = registry()

    def send(upstream: str, path: str, headers: Mapping[str, str]) -> Reply:
        if down:
            raise ClientError("Connection refused", reason="refused", url=upstream)
        if body is not None:
            return Reply(403, body)
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            verify(secret, lowered, "GET", path, ReplayGuard())
        except HTTPError as exc:
            return Reply(exc.status, str(exc).encode() + b"\n")
        caller = caller_from_proxy_headers(lowered)
        answer = resolve_with(reg, caller)
        return Reply(200, b"latest\n") if answer.outcome == "one" else Reply(404, b"404 Not Found\n")

    return send


def collector(
    runner: Runner,
    *,
    send=None,
    files: Mapping[str, str] | None = None,  # type: ignore[no-untyped-def]
    processes: Sequence[tuple[int, tuple[str, ...]]] = ((100, PROXY_ARGV), (4242, DNSMASQ_ARGV)),
):
    texts = {LISTENERS: LISTENER_FILE, CONF: captured(DHCP / "dnsmasq.conf")}
    texts.update(files or {})
    reg = registry()
    return HostCollector(
        runner=runner,
        read=texts.get,
        processes=lambda: processes,
        send=send or serve(),
        resolve=lambda caller: resolve_with(reg, caller),
        read_secret=lambda path: SECRET,
    )  # fmt: skip


def run(req: HostRequest | None = None, **kw: object) -> host.HostFacts:
    runner = kw.pop("runner", None) or Runner(outputs())
    return collect_host(req or HostRequest(), collector(runner, **kw))  # type: ignore[arg-type]


def ids(facts: host.HostFacts) -> list[str]:
    return [f.id for f in host.analyse(facts).findings]


# --- parsing ---------------------------------------------------------------------------------------


def test_doctor_host_parses_proc_net_tcp() -> None:
    sockets = host.parse_proc_net_tcp(captured(ROUTER / "proc-net-tcp.txt"))
    assert {(str(s.address), s.port) for s in sockets} == {("0.0.0.0", 9697), ("::", 9697)}
    (isolated,) = host.parse_proc_net_tcp(captured(DHCP / "proc-net-tcp.txt"))
    assert (str(isolated.address), isolated.port) == ("169.254.169.254", 80)


def test_doctor_host_reads_the_metadata_route_from_dnsmasq_config() -> None:
    conf = captured(DHCP / "dnsmasq.conf")
    assert [hop for _, hop in host.dnsmasq_metadata_routes(conf)] == ["10.0.0.2", "10.0.0.2"]
    assert host.dnsmasq_interface(conf) == "m169tap"


def test_doctor_host_finds_running_proxies_by_command_line() -> None:
    found = find_proxies([(1, PROXY_ARGV), (2, ("meta169", "serve", "--listen", "x")), (3, ("/usr/bin/meta169",
                          "proxy", "--upstream=unix:/run/s.sock")), (4, ("vim", "proxy"))])  # fmt: skip
    assert [(p.pid, p.upstreams, p.secret_file) for p in found] == [
        (1, ("127.0.0.1:8775",), "/etc/meta169/proxy.secret"), (3, ("unix:/run/s.sock",), "")]  # fmt: skip


# --- healthy ----------------------------------------------------------------------------------------


def test_doctor_host_healthy_deployment_has_no_findings() -> None:
    facts = run(HostRequest(caller=Caller(ip=ipaddress.ip_address("10.0.0.11"), network_id="net-b")))
    report = host.analyse(facts)
    assert report.findings == ()
    assert {ns.name: ns.role for ns in facts.namespaces} == {RTR_NS: "router", DHCP_NS: "dhcp"}
    assert facts.server is not None and facts.server.status == 200 and facts.server.signed
    assert [h.state for h in report.path] == ["n/a", "ok", "ok", "ok", "ok", "ok", "ok"]


# --- faults ------------------------------------------------------------------------------------------


def test_doctor_host_no_redirect_rule_with_the_commands_that_repair_it() -> None:
    facts = run(runner=Runner(outputs(save4=EMPTY_SAVE)))
    report = host.analyse(facts)
    first = report.findings[0]
    assert first.id == "no-redirect-rule" and report.broken_hop == "redirect"
    argvs = [r.argv for r in first.fix]
    prefix = ("ip", "netns", "exec", RTR_NS, "iptables", "-w")
    assert argvs[0] == (*prefix, "-t", "mangle", "-N", "meta169-PREROUTING")
    assert (*prefix, "-t", "nat", "-A", "meta169-PREROUTING", "-d", "169.254.169.254/32", "-i", "m169qr", "-p", "tcp",
            "-m", "tcp", "--dport", "80", "-j", "REDIRECT", "--to-ports", "9697") in argvs  # fmt: skip
    assert argvs[-1] == (*prefix, "-t", "filter", "-I", "FORWARD", "1", "-j", "meta169-FORWARD")
    jumps = [i for i, a in enumerate(argvs) if "-I" in a]
    assert min(jumps) > max(i for i, a in enumerate(argvs) if "-A" in a)  # jumps last


def test_doctor_host_missing_mark_rule_breaks_the_redirect() -> None:
    save = "\n".join(line for line in captured(ROUTER / "iptables-save.txt").splitlines() if "MARK" not in line)
    facts = run(runner=Runner(outputs(save4=save + "\n")))
    (finding,) = host.analyse(facts).findings
    assert (finding.id, finding.severity) == ("redirect-rules-incomplete", "error")
    assert "DROP" in finding.summary
    assert [r.argv[-4:] for r in finding.fix] == [("-j", "MARK", "--set-xmark", "0x1/0xffff")]


def test_doctor_host_missing_drop_rule_is_a_warning() -> None:
    save = "\n".join(line for line in captured(ROUTER / "iptables-save.txt").splitlines() if "-j DROP" not in line)
    (finding,) = host.analyse(run(runner=Runner(outputs(save4=save + "\n")))).findings
    assert (finding.id, finding.severity) == ("redirect-rules-incomplete", "warning")


def test_doctor_host_proxy_down_means_nothing_listens() -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    facts = run(runner=Runner(outputs(rtr_tcp=header)), processes=((4242, DNSMASQ_ARGV),),
                req=HostRequest(listener_files=(LISTENERS,), upstreams=("127.0.0.1:8775",),
                                secret_file="/etc/meta169/proxy.secret"))  # fmt: skip
    report = host.analyse(facts)
    assert [f.id for f in report.findings] == ["proxy-not-listening"]
    assert any("meta169 proxy processes: none" in e for e in report.findings[0].evidence)
    assert report.broken_hop == "proxy"


def test_doctor_host_isolated_namespace_without_the_metadata_address() -> None:
    addr = json.loads(captured(DHCP / "ip-addr.json"))
    for link in addr:
        link["addr_info"] = [a for a in link.get("addr_info", []) if a.get("local") != "169.254.169.254"]
    (finding,) = host.analyse(run(runner=Runner(outputs(dhcp_addr=json.dumps(addr))))).findings
    assert finding.id == "isolated-address-missing"
    assert finding.fix[0].argv == ("ip", "-n", DHCP_NS, "addr", "add", "169.254.169.254/32", "dev", "m169tap")


def test_doctor_host_dnsmasq_missing_or_without_the_host_route() -> None:
    assert ids(run(runner=Runner(outputs(dhcp_pids="")))) == ["dnsmasq-not-running"]
    conf = "\n".join(ln for ln in captured(DHCP / "dnsmasq.conf").splitlines() if "169.254" not in ln)
    facts = run(files={CONF: conf})
    assert ids(facts) == ["dnsmasq-no-metadata-route"]


def test_doctor_host_server_down() -> None:
    report = host.analyse(run(send=serve(down=True)))
    assert [f.id for f in report.findings] == ["server-unreachable"]
    assert report.broken_hop == "server"


def test_doctor_host_secret_mismatch_is_detected_by_the_real_hmac() -> None:
    finding = host.analyse(run(send=serve(secret=b"another-secret-of-sixteen+"))).findings[0]
    assert finding.id == "secret-mismatch"
    assert "proxy signature mismatch" in finding.evidence[0]


def test_doctor_host_signature_outside_the_window_hints_at_clocks() -> None:
    (finding,) = host.analyse(run(send=serve(body=b"proxy signature outside the replay window\n"))).findings
    assert finding.id == "signature-rejected" and "clocks" in finding.summary


def test_doctor_host_upstream_that_is_not_a_proxy_listener() -> None:
    send = serve(body=b"identity headers are accepted only from the trusted proxy\n")
    assert ids(run(send=send)) == ["upstream-not-proxy"]


@pytest.mark.parametrize(
    ("ip", "expected"),
    [("10.0.0.11", []), ("10.0.0.50", ["unknown-instance"]), ("10.0.0.99", ["ambiguous-instance"])],
)
def test_doctor_host_registry_resolves_exactly_one_instance(ip: str, expected: list[str]) -> None:
    facts = run(HostRequest(caller=Caller(ip=ipaddress.ip_address(ip), network_id="net-b")))
    assert ids(facts) == expected
    if expected == ["ambiguous-instance"]:
        finding = host.analyse(facts).findings[0]
        assert "instance 22222222-2222-4222-8222-222222222222" in finding.evidence


def test_doctor_host_probe_caller_404_is_not_an_unknown_instance() -> None:
    facts = run()
    assert facts.server is not None and facts.server.status == 404
    assert facts.server.caller.startswith(f"probe {PROBE_CALLER.ip}")
    assert ids(facts) == []


def test_doctor_host_missing_namespace() -> None:
    runner = Runner(outputs())
    runner.outputs[("ip", "netns", "list")] = f"{DHCP_NS}\n"
    facts = collect_host(HostRequest(namespaces=((RTR_NS, "router"),), upstreams=("127.0.0.1:8775",)),
                         collector(runner))  # fmt: skip
    assert ids(facts) == ["netns-missing"]


def test_doctor_host_explicit_flags_replace_discovery() -> None:
    runner = Runner(outputs())
    facts = collect_host(HostRequest(namespaces=((DHCP_NS, "dhcp"),)), collector(runner))
    assert [ns.name for ns in facts.namespaces] == [DHCP_NS]
    assert facts.server is None  # the running proxy's upstream is not used
    assert not any(RTR_NS in argv for argv in runner.seen)


def test_doctor_host_registry_unavailable_when_serve_answers_503() -> None:
    def send(upstream: str, path: str, headers: Mapping[str, str]) -> Reply:
        return Reply(503, b"metadata registry unavailable\n")

    assert ids(run(send=send)) == ["registry-unavailable"]


# --- several upstreams: the proxy fails over between them ---------------------------------------------------

SERVE_1, SERVE_2, SERVE_3 = "unix:/run/meta169/serve-1.sock", "unix:/run/meta169/serve-2.sock", "10.1.0.7:8775"


def answer(upstream: str, up: bool) -> host.ServerAnswer:
    if up:
        return host.ServerAnswer(upstream, "probe 192.0.2.1", False, 404, "404 Not Found")
    return host.ServerAnswer(upstream, "probe 192.0.2.1", False, error="refused: Connection refused")


@pytest.mark.parametrize(
    ("pools", "down", "expected"),
    [
        ([(SERVE_1, SERVE_2)], [], []),
        ([(SERVE_1, SERVE_2)], [SERVE_2], [("upstream-degraded", "warning", SERVE_2)]),
        ([(SERVE_1, SERVE_2)], [SERVE_1, SERVE_2],
         [("server-unreachable", "error", SERVE_1), ("server-unreachable", "error", SERVE_2)]),
        ([(SERVE_1, SERVE_2, SERVE_3)], [SERVE_2, SERVE_3],
         [("upstream-degraded", "warning", f"{SERVE_2}, {SERVE_3}")]),
        # An upstream no proxy is known to list (a serve's listener) stands alone: down is an error.
        ([], [SERVE_2], [("server-unreachable", "error", SERVE_2)]),
        ([(SERVE_1,)], [SERVE_2], [("server-unreachable", "error", SERVE_2)]),
        # Another proxy lists SERVE_2 alone: its guests get 502 while the first fails over.
        ([(SERVE_1, SERVE_2), (SERVE_2,)], [SERVE_2],
         [("server-unreachable", "error", SERVE_2), ("upstream-degraded", "warning", SERVE_2)]),
    ],
)  # fmt: skip
def test_doctor_host_upstreams_down_by_pool(
    pools: list[tuple[str, ...]], down: list[str], expected: list[tuple[str, str, str]]
) -> None:
    upstreams = list(dict.fromkeys([u for p in pools for u in p] + down))
    facts = host.HostFacts(servers=tuple(answer(u, u not in down) for u in upstreams),
                           pools=tuple(host.UpstreamPool(p, f"proxy {i}") for i, p in enumerate(pools)))  # fmt: skip
    findings = host.analyse(facts).findings
    assert [(f.id, f.severity) for f in findings] == [(i, sev) for i, sev, _ in expected]
    for finding, (_, _, named) in zip(findings, expected, strict=True):
        # Each finding names the upstreams it is about, and only the down ones as down.
        assert finding.summary.startswith(f"meta169 serve does not answer at {named}"), finding.summary
        assert all(any(u in e for e in finding.evidence) for u in named.split(", "))
        assert len(finding.fix) == len(named.split(", "))


def test_doctor_host_all_upstreams_down_names_the_others_too() -> None:
    facts = host.HostFacts(servers=(answer(SERVE_1, False), answer(SERVE_2, False)),
                           pools=(host.UpstreamPool((SERVE_1, SERVE_2), "meta169 proxy pid 7"),))  # fmt: skip
    report = host.analyse(facts)
    first, second = report.findings
    assert first.summary == (f"meta169 serve does not answer at {SERVE_1}, nor at the proxy's other upstreams "
                             f"({SERVE_2}): the proxy answers guests 502")  # fmt: skip
    assert f"upstreams of the proxy (meta169 proxy pid 7): {SERVE_1}, {SERVE_2}" in first.evidence
    assert SERVE_2 in second.evidence[0] and report.has_errors and report.broken_hop == "server"


def test_doctor_host_degraded_upstreams_warn_on_the_server_hop() -> None:
    facts = host.HostFacts(servers=(answer(SERVE_1, True), answer(SERVE_2, False)),
                           pools=(host.UpstreamPool((SERVE_1, SERVE_2)),))  # fmt: skip
    report = host.analyse(facts)
    assert not report.has_errors and report.broken_hop is None
    assert {h.hop: h.state for h in report.path}["server"] == "warning"


def test_doctor_host_upstream_pool_is_validated() -> None:
    with pytest.raises(ValidationError):
        host.UpstreamPool(())
    with pytest.raises(ValidationError):
        host.UpstreamPool((SERVE_1, SERVE_1))


def test_doctor_host_probes_each_upstream_given_on_the_command_line() -> None:
    asked: list[str] = []

    def send(upstream: str, path: str, headers: Mapping[str, str]) -> Reply:
        asked.append(upstream)
        if upstream == SERVE_2:
            raise ClientError("Connection refused", reason="refused", url=upstream)
        return Reply(404, b"404 Not Found\n")

    # doctor --host --upstream SERVE_1 --upstream SERVE_2: one proxy's pool, each probed.
    facts = run(HostRequest(upstreams=(SERVE_1, SERVE_2)), send=send)
    assert asked == [SERVE_1, SERVE_2]
    assert facts.pools == (host.UpstreamPool((SERVE_1, SERVE_2), "the command line"),)
    (finding,) = host.analyse(facts).findings
    assert (finding.id, finding.severity) == ("upstream-degraded", "warning")
    assert SERVE_2 in finding.summary and f"fails over to {SERVE_1}" in finding.summary
    # The single form is unchanged: one upstream down is the error.
    assert ids(run(HostRequest(upstreams=(SERVE_2,)), send=send)) == ["server-unreachable"]


def test_doctor_host_probes_the_upstreams_of_a_pool_at_once() -> None:
    """Several nodes down cost one probe's timeout, not one each: every send is under
    way before any returns (a barrier all of them must reach; one at a time, the first
    would wait for the others and break it)."""
    import threading

    upstreams = (SERVE_1, SERVE_2, "unix:/run/meta169/serve-3.sock")
    together = threading.Barrier(len(upstreams), timeout=5)

    def send(upstream: str, path: str, headers: Mapping[str, str]) -> Reply:
        together.wait()
        raise ClientError("timed out", reason="timeout", url=upstream)

    facts = run(HostRequest(upstreams=upstreams), send=send)
    assert [s.upstream for s in facts.servers] == list(upstreams)  # reported in order
    assert all(s.error and s.error.startswith("timeout") for s in facts.servers)


# Each row of the host table is exercised by a test above; a new row needs one too.
COVERED = {
    "netns-missing", "dnsmasq-not-running", "dnsmasq-no-metadata-route", "isolated-address-missing",
    "no-redirect-rule", "redirect-rules-incomplete", "proxy-not-listening", "server-unreachable", "secret-mismatch",
    "upstream-degraded", "signature-rejected", "upstream-not-proxy", "registry-unavailable", "unknown-instance",
    "ambiguous-instance",
}  # fmt: skip


def test_doctor_host_every_check_of_the_table_is_covered() -> None:
    assert {c.id for c in host.CHECKS} == COVERED


def test_doctor_host_no_redirect_repairs_ipv6_too_when_the_proxy_serves_it() -> None:
    runner = Runner(outputs(save4=EMPTY_SAVE))
    runner.outputs[("ip", "netns", "exec", RTR_NS, "ip6tables-save")] = EMPTY_SAVE
    (finding,) = host.analyse(run(runner=runner)).findings
    assert finding.id == "no-redirect-rule"
    tools = {r.argv[4] for r in finding.fix}
    assert tools == {"iptables", "ip6tables"}
    assert any("fe80::a9fe:a9fe/128" in r.argv for r in finding.fix)


def test_doctor_host_ipv6_redirect_missing_alone_is_a_warning() -> None:
    runner = Runner(outputs())
    runner.outputs[("ip", "netns", "exec", RTR_NS, "ip6tables-save")] = EMPTY_SAVE
    (finding,) = host.analyse(run(runner=runner)).findings
    assert (finding.id, finding.severity) == ("redirect-rules-incomplete", "warning")
    assert "fe80::a9fe:a9fe" in finding.summary
