"""What ``meta169 doctor --host`` finds by itself: discovery as pure functions over captured
command lines, ``ip netns list`` output and config values, then the whole host collection
over captured command output (tests/unit/corpus/_host/) with nothing named on the command line."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from meta169.client.transport import Reply
from meta169.doctor import discover, host
from meta169.doctor.discover import ConfigValues, Target
from meta169.doctor.host import ExpectedListener, UpstreamPool
from meta169.doctor.host_collect import HostCollector, HostRequest, all_processes, checked_nothing, collect_host
from meta169.errors import ClientError
from meta169.model import parse_ip
from meta169.plumbing.command import CommandResult

CAPTURES = Path(__file__).parent / "corpus" / "_host"
ROUTER = CAPTURES / "router-healthy"
QR = "qrouter-5c1d0e64-7f1a-4f5e-9d2b-0a1b2c3d4e5f"
LISTENERS = "/etc/meta169/listeners.yaml"
PROXY = ("/usr/bin/python3", "-m", "meta169", "-v", "--registry", "postgresql://db/meta169", "proxy",
         "--upstream", "unix:/run/meta169/serve.sock", "--listeners", LISTENERS,
         "--secret-file=/etc/meta169/proxy.secret", "--listen", "qrouter-r9/0.0.0.0:9697=router:r9")  # fmt: skip
SERVE = ("/usr/bin/meta169", "--registry", "sqlite:///var/lib/meta169/registry.db", "serve",
         "--listen", "unix:/run/meta169/serve.sock=proxy", "--listen", "0.0.0.0:8775=proxy",
         "--listen", "[::]:8776=proxy", "--listen", "127.0.0.1:0=proxy",
         "--listen", "10.0.0.5:80=network:net-a")  # fmt: skip
NETNS_SOURCE = "ip netns list (Neutron names qrouter-*, qdhcp-*, ovnmeta-*)"
SERVE_1, SERVE_2 = "unix:/run/meta169/serve-1.sock", "unix:/run/meta169/serve-2.sock"
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _listener(address: str, port: int, binding: str) -> ExpectedListener:
    return ExpectedListener(parse_ip(address), port, binding)


# --- command lines ------------------------------------------------------------------------------------


def test_doctor_discover_proxies_and_serves_by_command_line() -> None:
    processes = [(10, PROXY), (11, SERVE), (12, ("vim", "proxy")), (13, ("/usr/bin/meta169", "doctor", "--host")),
                 (14, ("meta169", "proxy", "--upstream=127.0.0.1:8775", "--from-registry"))]  # fmt: skip
    proxy, *serves, bare = discover.process_targets(processes)
    assert proxy == Target(
        "meta169 proxy pid 10 (/proc/10/cmdline)", listener_files=(LISTENERS,),
        static_listeners=("qrouter-r9/0.0.0.0:9697=router:r9",), upstreams=("unix:/run/meta169/serve.sock",),
        secret_file="/etc/meta169/proxy.secret", registry_url="postgresql://db/meta169", pid=10,
    )  # fmt: skip
    # A wildcard listener is reached on loopback; port 0 cannot be known; network listeners are not upstreams.
    assert [s.upstreams for s in serves] == [("unix:/run/meta169/serve.sock",), ("127.0.0.1:8775",), ("[::1]:8776",)]
    assert not any(s.pooled for s in serves)  # a serve's listener is no proxy's failover pool
    assert {s.registry_url for s in serves} == {"sqlite:///var/lib/meta169/registry.db"}
    assert bare.upstreams == ("127.0.0.1:8775",) and "derives listeners from the registry" in bare.notes[0]
    assert [p.pid for p in discover.find_proxies(processes)] == [10, 14]


def test_doctor_discover_every_upstream_of_a_running_proxy() -> None:
    # --upstream is repeatable (meta169 proxy fails over between them), in both spellings.
    proxy = ("/usr/bin/meta169", "proxy", "--upstream", SERVE_1, f"--upstream={SERVE_2}", "--upstream", SERVE_1,
             "--listeners", LISTENERS)  # fmt: skip
    serve = ("/usr/bin/meta169", "serve", "--listen", f"{SERVE_2}=proxy")
    processes = [(20, proxy), (21, serve)]
    assert discover.upstreams_of(proxy) == (SERVE_1, SERVE_2)
    (found,) = discover.find_proxies(processes)
    assert found.upstreams == (SERVE_1, SERVE_2)
    target, served = discover.process_targets(processes)
    assert (target.upstreams, target.pooled) == ((SERVE_1, SERVE_2), True)
    assert (served.upstreams, served.pooled) == ((SERVE_2,), False)
    assert target.describe().endswith(f"listener file {LISTENERS}; upstreams {SERVE_1}, {SERVE_2}")
    scope = discover.scope([(target, {}), (served, {})])
    assert scope.upstreams == ((SERVE_1, "", target.source), (SERVE_2, "", f"{target.source}, {served.source}"))
    # Only the proxy's list is a pool: serve's listener is one of its members, not a pool of its own.
    assert scope.pools == (UpstreamPool((SERVE_1, SERVE_2), target.source),)


@pytest.mark.parametrize(
    ("listen", "upstream"),
    [("unix:/run/s.sock", "unix:/run/s.sock"), ("0.0.0.0:8775", "127.0.0.1:8775"), ("[::]:8775", "[::1]:8775"),
     ("10.1.0.5:8775", "10.1.0.5:8775"), ("127.0.0.1:0", ""), ("localhost:8775", "localhost:8775")],
)  # fmt: skip
def test_doctor_discover_serve_listener_as_upstream(listen: str, upstream: str) -> None:
    assert discover.serve_upstream(listen) == upstream


def test_doctor_discover_serve_bare_listeners_are_proxy_ones_with_the_proxy_flag() -> None:
    argv = ("meta169", "serve", "--proxy", "--listen", "unix:/run/a.sock", "--listen", "127.0.0.1:9=router:r")
    assert discover.proxy_listens_of_serve(argv) == ["unix:/run/a.sock"]
    assert discover.proxy_listens_of_serve(argv[:2] + argv[3:]) == []


# --- ip netns list ------------------------------------------------------------------------------------


def test_doctor_discover_neutron_namespaces_from_ip_netns_list() -> None:
    text = f"{QR} (id: 3)\nqdhcp-net1 (id: 2)\novnmeta-net2\nm169lab-demo-rtr-a (id: 1)\nqrouter-\nfip-ext\n"
    names = discover.parse_netns_list(text)
    assert names[0] == QR and len(names) == 6
    target = discover.netns_target(names)
    assert target is not None and target.source.startswith("ip netns list")
    assert target.namespaces == (("ovnmeta-net2", "metadata"), ("qdhcp-net1", "dhcp"), (QR, "router"))
    assert discover.netns_target(["m169lab-demo-rtr-a", "fip-ext"]) is None
    assert host.neutron_id(QR) == QR.removeprefix("qrouter-") and host.neutron_id("m169lab-x") == ""


# --- the config file --------------------------------------------------------------------------------------


CONFIG = """
[registry]
url = "postgresql://db/meta169"

[serve]
listen = ["unix:/run/meta169/serve.sock=proxy", "0.0.0.0:8775=proxy", "127.0.0.1:8080=network:net-a"]
workers = 2

[proxy]
upstream = "unix:/run/meta169/serve.sock"
listeners = "/etc/meta169/listeners.yaml"
secret-file = "/etc/meta169/proxy.secret"
"""


def test_doctor_discover_config_values_from_the_file() -> None:
    values, notes = discover.config_values(tomllib.loads(CONFIG), "/etc/meta169/meta169.toml")
    assert notes == ()
    assert values == ConfigValues(
        "/etc/meta169/meta169.toml", registry_url="postgresql://db/meta169",
        serve_listens=("unix:/run/meta169/serve.sock=proxy", "0.0.0.0:8775=proxy", "127.0.0.1:8080=network:net-a"),
        proxy_upstreams=("unix:/run/meta169/serve.sock",), proxy_listener_files=(LISTENERS,),
        proxy_secret_file="/etc/meta169/proxy.secret",
    )  # fmt: skip
    proxy, serve = discover.config_targets(values)
    assert (proxy.source, proxy.upstreams, proxy.listener_files) == (
        "config /etc/meta169/meta169.toml [proxy]", ("unix:/run/meta169/serve.sock",), (LISTENERS,))  # fmt: skip
    # serve's other proxy listener is checked too; the one the proxy uses is not repeated.
    assert (serve.source, serve.upstreams) == ("config /etc/meta169/meta169.toml [serve]", ("127.0.0.1:8775",))


def test_doctor_discover_config_upstream_list_is_one_pool() -> None:
    # A repeatable flag's key takes a list (meta169.config): [proxy] upstream = [...].
    text = (f'[serve]\nlisten = ["{SERVE_2}=proxy", "0.0.0.0:8775=proxy"]\n'
            f'[proxy]\nupstream = ["{SERVE_1}", "{SERVE_2}"]\n')  # fmt: skip
    values, notes = discover.config_values(tomllib.loads(text), "/etc/meta169/meta169.toml")
    assert notes == () and values.proxy_upstreams == (SERVE_1, SERVE_2)
    proxy, serve = discover.config_targets(values)
    assert (proxy.upstreams, proxy.pooled) == ((SERVE_1, SERVE_2), True)
    assert proxy.describe() == f"{proxy.source}: upstreams {SERVE_1}, {SERVE_2}"
    assert (serve.upstreams, serve.pooled) == (("127.0.0.1:8775",), False)  # SERVE_2 is the proxy's already
    scope = discover.scope([(proxy, {}), (serve, {})])
    assert [u for u, _, _ in scope.upstreams] == [SERVE_1, SERVE_2, "127.0.0.1:8775"]
    assert scope.pools == (UpstreamPool((SERVE_1, SERVE_2), proxy.source),)


def test_doctor_discover_config_values_it_cannot_use_are_notes() -> None:
    values, notes = discover.config_values({"proxy": {"upstream": 8775, "listeners": ["a", 1]}, "serve": "x"}, "f")
    assert values == ConfigValues("f")
    assert len(notes) == 3 and any("proxy.upstream" in n for n in notes) and any("[serve]" in n for n in notes)
    assert discover.config_targets(values) == ()


# --- merging --------------------------------------------------------------------------------------------------


def test_doctor_discover_scope_merges_and_remembers_where() -> None:
    lab = Target("lab demo (/run/meta169-lab/demo/lab.json)", namespaces=(("m169lab-demo-rtr-a", "router"),),
                 upstreams=("unix:/run/meta169-lab/demo/serve.sock",),
                 registry_url="sqlite:///run/meta169-lab/demo/r.db")  # fmt: skip
    proxy = Target("meta169 proxy pid 7 (/proc/7/cmdline)", listener_files=("/run/meta169-lab/demo/listeners.json",),
                   upstreams=("unix:/run/meta169-lab/demo/serve.sock",), secret_file="")  # fmt: skip
    netns = Target("ip netns list (Neutron names)", namespaces=((QR, "router"),))
    from_file = {"m169lab-demo-rtr-a": [_listener("0.0.0.0", 9697, "router router-a")]}
    scope = discover.scope([(lab, {}), (proxy, from_file), (netns, {})])
    assert [(n, r) for n, r, _ in scope.namespaces] == [("m169lab-demo-rtr-a", "router"), (QR, "router")]
    assert scope.namespaces[0][2] == f"{lab.source}, {proxy.source}"
    assert scope.expected_in("m169lab-demo-rtr-a") == (from_file["m169lab-demo-rtr-a"][0],)
    (upstream,) = scope.upstreams
    assert upstream == ("unix:/run/meta169-lab/demo/serve.sock", "", f"{lab.source}, {proxy.source}")
    assert scope.registry_url == "sqlite:///run/meta169-lab/demo/r.db"
    assert scope.discovered[0].startswith(f"{lab.source}: namespaces m169lab-demo-rtr-a (router); upstream unix:")


def test_doctor_discover_only_keeps_matching_namespaces_and_what_serves_them() -> None:
    lab = Target("lab demo", namespaces=(("m169lab-demo-rtr-a", "router"), ("m169lab-demo-dhcp-b", "dhcp")),
                 upstreams=("unix:/lab.sock",))  # fmt: skip
    other = Target("meta169 proxy pid 9", namespaces=(("qrouter-other", "router"),), upstreams=("unix:/other.sock",))
    serve = Target("meta169 serve pid 8", upstreams=("unix:/serve.sock",), pooled=False)
    scope = discover.scope([(lab, {}), (other, {}), (serve, {})], ["m169lab-demo-rtr-*"])
    assert [n for n, _, _ in scope.namespaces] == ["m169lab-demo-rtr-a"]
    assert [u for u, _, _ in scope.upstreams] == ["unix:/lab.sock"]
    assert set(scope.left_out) == {"m169lab-demo-dhcp-b", "qrouter-other", other.source, serve.source}
    assert discover.scope([(serve, {})], ["nothing-*"]).upstreams == ()


# --- the whole collection, nothing named ---------------------------------------------------------------


class Runner:
    def __init__(self, outputs: Mapping[tuple[str, ...], str]) -> None:
        self.outputs = dict(outputs)

    def __call__(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> CommandResult:
        key = tuple(argv)
        if key in self.outputs:
            return CommandResult(key, 0, self.outputs[key], "")
        return CommandResult(key, 1, "", "not captured")


def _refused(upstream: str, path: str, headers: Mapping[str, str]) -> Reply:
    raise ClientError("Connection refused", reason="refused", url=upstream)


def _collector(
    outputs: Mapping[tuple[str, ...], str],
    processes: Sequence[tuple[int, tuple[str, ...]]] = (),
    files: Mapping[str, str] | None = None,
    send: Callable[[str, str, Mapping[str, str]], Reply] = _refused,
) -> HostCollector:
    texts = dict(files or {})
    return HostCollector(runner=Runner(outputs), read=texts.get, processes=lambda: processes, send=send)


def _qrouter(listening: str) -> dict[tuple[str, ...], str]:
    return {
        ("ip", "netns", "list"): f"{QR} (id: 0)\n",
        ("ip", "netns", "exec", QR, "iptables-save"): (ROUTER / "iptables-save.txt").read_text(),
        ("ip", "netns", "exec", QR, "ip6tables-save"): "",
        ("ip", "-n", QR, "-j", "addr", "show"): (ROUTER / "ip-addr.json").read_text(),
        ("ip", "netns", "exec", QR, "cat", "/proc/net/tcp", "/proc/net/tcp6"): listening,
    }


def test_doctor_discover_neutron_router_with_redirect_and_no_listener_is_an_error() -> None:
    facts = collect_host(HostRequest(), _collector(_qrouter(HEADER)))
    (ns,) = facts.namespaces
    assert (ns.name, ns.role, ns.found_by) == (QR, "router", NETNS_SOURCE)
    (finding,) = host.analyse(facts).findings
    assert (finding.id, finding.severity) == ("proxy-not-listening", "error")
    assert QR in finding.summary
    router_id = QR.removeprefix("qrouter-")
    assert any(f"{QR}/0.0.0.0:9697=router:{router_id}" in r.text for r in finding.fix)
    assert any(f'"router": "{router_id}"' in r.text for r in finding.fix)
    assert facts.discovered == (f"{NETNS_SOURCE}: namespaces {QR} (router)",)
    assert "no meta169 proxy or serve running (/proc/*/cmdline)" in facts.searched


def test_doctor_discover_neutron_router_with_a_listener_is_healthy() -> None:
    facts = collect_host(HostRequest(), _collector(_qrouter((ROUTER / "proc-net-tcp.txt").read_text())))
    assert host.analyse(facts).findings == ()


def test_doctor_discover_nothing_found_checks_nothing() -> None:
    request = HostRequest(searched=("no config file at /etc/meta169/meta169.toml", "no lab up under /run/x"))
    facts = collect_host(request, _collector({("ip", "netns", "list"): "m169t-abc-0\n"}))
    assert checked_nothing(facts)
    assert facts.searched == (*request.searched, "no meta169 proxy or serve running (/proc/*/cmdline)",
                              "no qrouter-*, qdhcp-* or ovnmeta-* namespace (ip netns list)")  # fmt: skip


def test_doctor_discover_lab_targets_are_checked_with_their_upstream() -> None:
    lab = Target("lab demo", namespaces=((QR, "router"),), upstreams=("unix:/run/meta169-lab/demo/serve.sock",))
    facts = collect_host(HostRequest(labs=(lab,)), _collector(_qrouter(HEADER)))
    assert [s.upstream for s in facts.servers] == ["unix:/run/meta169-lab/demo/serve.sock"]
    assert facts.namespaces[0].found_by == f"lab demo, {discover.netns_target([QR]).source}"  # type: ignore[union-attr]
    ids = [f.id for f in host.analyse(facts).findings]
    assert ids == ["proxy-not-listening", "server-unreachable"]
    assert not checked_nothing(facts)


def test_doctor_discover_running_proxy_that_holds_no_socket_is_told_to_read_its_log() -> None:
    # The field's most common fault: the proxy runs, its listener file names the router,
    # and yet nothing listens there.
    listeners = json.dumps({"listeners": [{"netns": QR, "address": "0.0.0.0", "port": 9697, "router": "r1"}]})
    proxy = ("meta169", "proxy", "--upstream", "unix:/run/meta169/serve.sock", "--listeners", "/etc/l.json")
    facts = collect_host(HostRequest(), _collector(_qrouter(HEADER), [(4711, proxy)], {"/etc/l.json": listeners}))
    (ns,) = facts.namespaces
    assert ns.proxy_pids == (4711,) and ns.found_by.startswith("meta169 proxy pid 4711")
    first = host.analyse(facts).findings[0]
    assert first.id == "proxy-not-listening"
    assert "meta169 proxy (pid 4711) runs and its listeners name" in first.fix[0].text
    assert f"expected in {QR}: 0.0.0.0:9697 (router r1)" in first.evidence


def test_doctor_discover_running_proxy_with_one_of_two_upstreams_down_is_a_warning() -> None:
    listeners = json.dumps({"listeners": [{"netns": QR, "address": "0.0.0.0", "port": 9697, "router": "r1"}]})
    proxy = ("meta169", "proxy", "--upstream", SERVE_1, "--upstream", SERVE_2, "--listeners", "/etc/l.json")

    def send(upstream: str, path: str, headers: Mapping[str, str]) -> Reply:
        if upstream == SERVE_2:
            return _refused(upstream, path, headers)
        return Reply(404, b"404 Not Found\n")  # the probe caller is nobody: serve is there

    facts = collect_host(HostRequest(), _collector(_qrouter((ROUTER / "proc-net-tcp.txt").read_text()),
                                                   [(4711, proxy)], {"/etc/l.json": listeners}, send))  # fmt: skip
    assert [s.upstream for s in facts.servers] == [SERVE_1, SERVE_2]
    report = host.analyse(facts)
    (finding,) = report.findings
    assert (finding.id, finding.severity) == ("upstream-degraded", "warning")
    assert finding.summary.startswith(f"meta169 serve does not answer at {SERVE_2}: the proxy fails over to {SERVE_1}")
    assert f"upstreams of the proxy (meta169 proxy pid 4711 (/proc/4711/cmdline)): {SERVE_1}, {SERVE_2}" in (
        finding.evidence)  # fmt: skip
    assert not report.has_errors


def _fake_proc(root: Path, pid: int, ppid: int, argv: list[str], comm: str = "meta169") -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0\n")


def test_doctor_discover_forked_workers_are_their_service_once(tmp_path: Path) -> None:
    proxy = ["/usr/bin/python3", "/usr/bin/meta169", "proxy", "--upstream", "unix:/run/s.sock", "--workers", "2"]
    serve = ["/usr/bin/python3", "/usr/bin/meta169", "serve", "--listen", "unix:/run/s.sock=proxy", "--workers", "3"]
    _fake_proc(tmp_path, 100, 1, proxy)
    _fake_proc(tmp_path, 101, 100, proxy)  # its worker
    _fake_proc(tmp_path, 200, 1, serve)
    _fake_proc(tmp_path, 201, 200, serve)
    _fake_proc(tmp_path, 202, 200, serve)
    _fake_proc(tmp_path, 300, 1, proxy)  # a second proxy service, started on its own
    _fake_proc(tmp_path, 400, 100, ["/bin/sh", "-c", "true"], comm="sh (x) y")  # another child
    (tmp_path / "self").mkdir()
    found = dict(all_processes(tmp_path))
    assert sorted(found) == [100, 200, 300, 400]
    targets = discover.process_targets(sorted(found.items()))
    assert [t.pid for t in targets if t.pid is not None] == [100, 300]
