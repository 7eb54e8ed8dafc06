"""Collecting :class:`~meta169.doctor.host.HostFacts` on the network node (needs root).

All IO goes through :class:`HostCollector`'s callables: the command runner (``ip
netns exec``, ``iptables-save``, ``cat /proc/net/tcp``), a file reader, the list
of processes, the request to ``serve`` and the registry lookup. Unit tests pass
captured outputs; the CLI passes the real ones.

Discovery, when no ``--netns``, ``--proxy-listeners`` or ``--upstream`` is given
(:mod:`meta169.doctor.discover` has the rules): the config file and the labs that
are up (the CLI reads them into the :class:`HostRequest`), every running ``meta169
proxy`` and ``meta169 serve`` (by command line: upstreams, secret file, listener
file, listeners) and the namespaces named like Neutron's (``qrouter-*``,
``qdhcp-*``, ``ovnmeta-*``). Each listener file says which namespace must hold which
socket. Explicit flags replace discovery (they also cover a proxy that is down).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meta169.client.transport import HTTPTransport, Reply
from meta169.client.url import Endpoint, parse_url
from meta169.doctor import discover
from meta169.doctor.discover import ConfigValues, Scope, Target, find_proxies
from meta169.doctor.host import (
    Dnsmasq,
    ExpectedListener,
    HostFacts,
    NamespaceFacts,
    ProxyProcess,
    RegistryAnswer,
    Role,
    ServerAnswer,
    parse_proc_net_tcp,
)
from meta169.doctor.links import parse_ip_addr_json
from meta169.errors import (
    AmbiguousCaller,
    ClientError,
    CommandFailed,
    ConfigError,
    Meta169Error,
    RegistryError,
    UnknownCaller,
    ValidationError,
)
from meta169.model import Caller
from meta169.plumbing import netns
from meta169.plumbing.command import Runner
from meta169.registry.base import Registry

PROBE_CALLER = Caller(ip=ipaddress.IPv4Address("192.0.2.1"), network_id="meta169-doctor-probe")  # RFC 5737


@dataclass(frozen=True, slots=True)
class HostRequest:
    """What to check: namespaces (role or None to guess), serve, the proxy's files, a caller.

    ``upstreams`` are one proxy's (``doctor --upstream``, repeatable): each is probed,
    and they are judged as a pool the proxy fails over between. Without namespaces,
    listener files or upstreams, what to check is discovered:
    ``config`` and ``labs`` (read by the caller), then running processes and ``ip
    netns list``; ``only`` (globs) narrows it to matching namespaces. ``searched``
    says where the caller looked and found nothing ("no lab up under ..."), for the report.
    """

    namespaces: tuple[tuple[str, Role | None], ...] = ()
    upstreams: tuple[str, ...] = ()
    secret_file: str = ""
    listener_files: tuple[str, ...] = ()
    caller: Caller | None = None
    config: ConfigValues | None = None
    labs: tuple[Target, ...] = ()
    only: tuple[str, ...] = ()
    searched: tuple[str, ...] = ()

    @property
    def explicit(self) -> bool:
        return bool(self.namespaces or self.listener_files or self.upstreams)


@dataclass(frozen=True, slots=True)
class Found:
    """What :func:`find_targets` found: the merged :class:`~meta169.doctor.discover.Scope`
    and what collecting the namespaces needs (processes, existing namespaces)."""

    scope: Scope
    proxies: tuple[ProxyProcess, ...] | None
    processes: Mapping[int, tuple[str, ...]]
    existing: frozenset[str] | None
    notes: tuple[str, ...] = ()
    searched: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostCollector:
    runner: Runner
    read: Callable[[str], str | None]
    processes: Callable[[], Sequence[tuple[int, tuple[str, ...]]]]
    send: Callable[[str, str, Mapping[str, str]], Reply]
    resolve: Callable[[Caller], RegistryAnswer] | None = None
    read_secret: Callable[[str], bytes] | None = None


def _listeners_from_text(text: str, path: str) -> list[Any]:
    from meta169.proxy.server import parse_listeners

    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return parse_listeners(data, source=path)


def expected_listeners(
    col: HostCollector, files: Sequence[str], statics: Sequence[str], notes: list[str]
) -> dict[str, list[ExpectedListener]]:
    """Namespace -> sockets the proxy should hold there."""
    from meta169.proxy.run import parse_static_listener

    found: list[Any] = []
    for path in files:
        text = col.read(path)
        if text is None:
            notes.append(f"cannot read the proxy's listener file {path}")
            continue
        try:
            found += _listeners_from_text(text, path)
        except (ConfigError, ValueError) as exc:
            notes.append(f"listener file {path}: {exc}")
    for item in statics:
        try:
            found.append(parse_static_listener(item))
        except ConfigError as exc:
            notes.append(str(exc))
    out: dict[str, list[ExpectedListener]] = {}
    for lst in found:
        if lst.netns:
            out.setdefault(lst.netns, []).append(ExpectedListener(lst.address, lst.port, lst.binding.scope))
    return out


def guess_role(name: str, expected: Sequence[ExpectedListener]) -> Role:
    named = discover.neutron_role(name)
    if named is not None:
        return named
    if any(e.binding.startswith("router") for e in expected):
        return "router"
    if expected:
        return "dhcp"
    lowered = name.lower()
    return "dhcp" if "dhcp" in lowered else "router"


def _run(col: HostCollector, argv: list[str], errors: list[str]) -> str | None:
    try:
        result = col.runner(argv, check=False)
    except CommandFailed as exc:
        errors.append(f"{' '.join(argv)}: {exc}")
        return None
    if result.returncode != 0:
        errors.append(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return None
    return result.stdout


def _dnsmasq_in(
    col: HostCollector, ns: str, procs: Mapping[int, tuple[str, ...]], errors: list[str]
) -> tuple[Dnsmasq, ...] | None:
    out = _run(col, ["ip", "netns", "pids", ns], errors)
    if out is None:
        return None
    found = []
    for token in out.split():
        if not token.isdigit():
            continue
        argv = procs.get(int(token), ())
        if not argv or not argv[0].rsplit("/", 1)[-1].startswith("dnsmasq"):
            continue
        conf = (discover.flag_values(argv, "--conf-file") or discover.flag_values(argv, "-C") or [""])[0]
        found.append(Dnsmasq(int(token), conf, col.read(conf) if conf else None))
    return tuple(found)


def collect_namespace(
    col: HostCollector, name: str, role: Role, expected: Sequence[ExpectedListener],
    existing: Set[str] | None, procs: Mapping[int, tuple[str, ...]], found_by: str = "",
    proxy_pids: tuple[int, ...] = (),
) -> NamespaceFacts:  # fmt: skip
    netns.check_name(name)
    if existing is not None and name not in existing:
        return NamespaceFacts(name, role, exists=False, expected=tuple(expected), found_by=found_by,
                              proxy_pids=proxy_pids)  # fmt: skip
    errors: list[str] = []
    save4 = save6 = None
    if role == "router":
        save4 = _run(col, netns.in_netns(name, ["iptables-save"]), errors)
        save6 = _run(col, netns.in_netns(name, ["ip6tables-save"]), errors)
    addr = _run(col, netns.ip_argv(name, "-j", "addr", "show"), errors)
    tcp = _run(col, netns.in_netns(name, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]), errors)
    links = listening = None
    try:
        links = parse_ip_addr_json(addr) if addr is not None else None
        listening = parse_proc_net_tcp(tcp) if tcp is not None else None
    except ValidationError as exc:
        errors.append(str(exc))
    dnsmasq = _dnsmasq_in(col, name, procs, errors) if role == "dhcp" else None
    return NamespaceFacts(name, role, True, save4, save6, links, listening, dnsmasq, tuple(expected), tuple(errors),
                          found_by, proxy_pids)  # fmt: skip


def _server_answers(
    col: HostCollector, upstreams: Sequence[tuple[str, str]], caller: Caller, notes: list[str]
) -> tuple[ServerAnswer, ...]:
    """Each (upstream, secret file) asked for /openstack as the proxy would ask it, all
    at once: a pool with several nodes down costs one timeout (3 s), not one each."""
    probes = [_server_probe(col, upstream, secret_file, caller, notes) for upstream, secret_file in upstreams]
    if len(probes) <= 1:
        return tuple(_server_answer(col, probe) for probe in probes)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(probes), 16), thread_name_prefix="doctor-upstream") as pool:
        return tuple(pool.map(lambda probe: _server_answer(col, probe), probes))


@dataclass(frozen=True)
class _ServerProbe:
    upstream: str
    secret_file: str
    label: str
    headers: Mapping[str, str]
    signed: bool


def _server_answer(col: HostCollector, probe: _ServerProbe) -> ServerAnswer:
    try:
        reply = col.send(probe.upstream, "/openstack", probe.headers)
    except ClientError as exc:
        return ServerAnswer(
            probe.upstream, probe.label, probe.signed, error=f"{exc.reason}: {exc}", secret_file=probe.secret_file
        )
    body = reply.body[:200].decode("utf-8", errors="replace").strip()
    return ServerAnswer(probe.upstream, probe.label, probe.signed, reply.status, body, secret_file=probe.secret_file)


def _server_probe(
    col: HostCollector, upstream: str, secret_file: str, caller: Caller, notes: list[str]
) -> _ServerProbe:
    """The request for one upstream (signed when it is on TCP and the secret is
    readable); what stands in the way goes to ``notes``, in the upstreams' order."""
    from meta169.http.stamp import HDR_SIGNATURE, sign, stamp_headers

    label = f"{caller.ip} on {caller.scope}"
    if caller is PROBE_CALLER:
        label = f"probe {label}"
    headers = dict(stamp_headers(caller))
    signed = False
    if not upstream.startswith("unix:"):
        if not secret_file or col.read_secret is None:
            notes.append(f"serve at {upstream} is on TCP: give --secret-file (the proxy's) to check the shared secret")
        else:
            try:
                secret = col.read_secret(secret_file)
            except ConfigError as exc:
                notes.append(f"cannot use the proxy's secret: {exc}")
                secret = b""
            if secret:
                headers[HDR_SIGNATURE] = sign(secret, caller, "GET", "/openstack")
                signed = True
    return _ServerProbe(upstream, secret_file, label, headers, signed)


def find_targets(req: HostRequest, col: HostCollector) -> Found:
    """What to check: the request's flags, or what discovery finds (see the module docstring)."""
    notes: list[str] = []
    searched = list(req.searched)
    try:
        processes = list(col.processes())
        proxies: tuple[ProxyProcess, ...] | None = find_proxies(processes)
    except OSError as exc:
        notes.append(f"cannot list processes: {exc}")
        processes, proxies = [], None
    listed = _run(col, ["ip", "netns", "list"], notes)
    existing = frozenset(discover.parse_netns_list(listed)) if listed is not None else None
    targets: list[Target] = []
    if req.explicit:
        # Explicit flags describe the deployment to check; running proxies are then only evidence.
        targets.append(Target("the command line", namespaces=req.namespaces, listener_files=req.listener_files,
                              upstreams=req.upstreams, secret_file=req.secret_file))  # fmt: skip
    else:
        if req.config is not None:
            targets += discover.config_targets(req.config)
        targets += req.labs
        running = discover.process_targets(processes)
        if not running and proxies is not None:
            searched.append("no meta169 proxy or serve running (/proc/*/cmdline)")
        targets += running
        neutron = discover.netns_target(existing or ())
        if neutron is not None:
            targets.append(neutron)
        elif existing is not None:
            searched.append("no qrouter-*, qdhcp-* or ovnmeta-* namespace (ip netns list)")
        for target in targets:
            notes += target.notes
    expanded = [(t, expected_listeners(col, t.listener_files, t.static_listeners, notes)) for t in targets]
    found = discover.scope(expanded, req.only)
    if found.left_out:
        notes.append(f"left out by --only {' '.join(req.only)}: {', '.join(found.left_out)}")
    return Found(found, proxies, dict(processes), existing, tuple(notes), tuple(searched))


def collect_host(req: HostRequest, col: HostCollector, found: Found | None = None) -> HostFacts:
    """Gather what :mod:`meta169.doctor.host`'s checks need (``found``: from :func:`find_targets`)."""
    found = found if found is not None else find_targets(req, col)
    scope = found.scope
    notes = list(found.notes)
    if not scope.namespaces:
        notes.append("no namespace to check: pass --netns NS[=router|=dhcp|=metadata] or --proxy-listeners FILE")
    namespaces = tuple(
        collect_namespace(col, name, role or guess_role(name, scope.expected_in(name)), scope.expected_in(name),
                          found.existing, found.processes, "" if req.explicit else found_by,
                          scope.proxies_in(name))
        for name, role, found_by in scope.namespaces
    )  # fmt: skip
    caller = req.caller or PROBE_CALLER
    servers = _server_answers(col, [(upstream, req.secret_file or secret) for upstream, secret, _ in scope.upstreams],
                              caller, notes)  # fmt: skip
    if not servers:
        notes.append("serve not checked: nothing discovered names its address; pass --upstream")
    registry = col.resolve(req.caller) if req.caller is not None and col.resolve is not None else None
    return HostFacts(namespaces=namespaces, proxies=found.proxies, servers=servers, registry=registry,
                     pools=scope.pools, notes=tuple(notes), discovered=scope.discovered,
                     searched=found.searched)  # fmt: skip


def checked_nothing(facts: HostFacts) -> bool:
    """True when the doctor looked at no namespace, no serve and no registry."""
    return not facts.namespaces and not facts.servers and facts.registry is None


# --- the real seams ----------------------------------------------------------------------------------


def all_processes(proc: Path = Path("/proc")) -> list[tuple[int, tuple[str, ...]]]:
    """Every process's pid and command line, leaving out the workers that ``serve`` or
    ``proxy --workers N`` forked: a child with its parent's command line is the same
    service, and checking it again would repeat every finding."""
    found: dict[int, tuple[tuple[str, ...], int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            # comm may hold spaces and parentheses: the fields start after the last ")".
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        if argv:
            found[int(entry.name)] = (argv, ppid)
    return [(pid, argv) for pid, (argv, ppid) in found.items() if found.get(ppid, ((), 0))[0] != argv]


def send_upstream(upstream: str, path: str, headers: Mapping[str, str], *, timeout: float = 3.0) -> Reply:
    """One request to serve on ``unix:PATH`` or ``HOST:PORT``, as the proxy sends it."""
    if upstream.startswith("unix:"):
        sock_path = upstream[5:]
        endpoint = Endpoint(host="localhost")

        def connect(_: Endpoint, seconds: float) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(seconds)
            try:
                sock.connect(sock_path)
            except OSError as exc:
                sock.close()
                reason = "refused" if isinstance(exc, ConnectionRefusedError) else "connect"
                raise ClientError(f"{sock_path}: {exc.strerror or exc}", reason=reason, url=upstream) from exc
            return sock

        return HTTPTransport(endpoint, timeout, connect=connect)("GET", path, headers)
    endpoint = parse_url("http://" + upstream)
    return HTTPTransport(endpoint, timeout)("GET", path, headers)


def resolve_with(registry: Registry, caller: Caller) -> RegistryAnswer:
    """Ask ``registry`` who ``caller`` is, as serve does; the outcome as data."""
    label = f"{caller.ip} on {caller.scope}"
    try:
        instance = registry.resolve(caller)
    except UnknownCaller as exc:
        return RegistryAnswer(label, "unknown", str(exc))
    except AmbiguousCaller as exc:
        return RegistryAnswer(label, "ambiguous", str(exc), exc.uuids)
    except RegistryError as exc:
        return RegistryAnswer(label, "error", str(exc))
    return RegistryAnswer(label, "one", f"instance {instance.uuid} ({instance.name})", (instance.uuid,))


def registry_resolver(registry_url: str) -> Callable[[Caller], RegistryAnswer]:
    """A resolver that opens the registry at ``registry_url`` for each question."""

    def resolve(caller: Caller) -> RegistryAnswer:
        from meta169.registry import open_registry

        try:
            registry = open_registry(registry_url)
        except Meta169Error as exc:
            return RegistryAnswer(f"{caller.ip} on {caller.scope}", "error", str(exc))
        try:
            return resolve_with(registry, caller)
        finally:
            registry.close()

    return resolve
