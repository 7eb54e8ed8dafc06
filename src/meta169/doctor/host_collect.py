"""Collecting :class:`~meta169.doctor.host.HostFacts` on the network node (needs root).

All IO goes through :class:`HostCollector`'s callables: the command runner (``ip
netns exec``, ``iptables-save``, ``cat /proc/net/tcp``), a file reader, the list
of processes, the request to ``serve`` and the registry lookup. Unit tests pass
captured outputs; the CLI passes the real ones.

Discovery, when no ``--netns``, ``--proxy-listeners`` or ``--upstream`` is given:
every running ``meta169 proxy`` is found by its command line, which names its
``--upstream``, ``--secret-file`` and ``--listeners`` file; the listener file
says which namespace must hold which socket; without a proxy, namespaces named
like neutron's (``qrouter-*``, ``qdhcp-*``) are checked. Explicit flags replace
discovery (they also cover a proxy that is down).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meta169.client.transport import HTTPTransport, Reply
from meta169.client.url import Endpoint, parse_url
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
    """What to check: namespaces (role or None to guess), serve, the proxy's files, a caller."""

    namespaces: tuple[tuple[str, Role | None], ...] = ()
    upstream: str = ""
    secret_file: str = ""
    listener_files: tuple[str, ...] = ()
    caller: Caller | None = None


@dataclass(frozen=True)
class HostCollector:
    runner: Runner
    read: Callable[[str], str | None]
    processes: Callable[[], Sequence[tuple[int, tuple[str, ...]]]]
    send: Callable[[str, str, Mapping[str, str]], Reply]
    resolve: Callable[[Caller], RegistryAnswer] | None = None
    read_secret: Callable[[str], bytes] | None = None


def _flag(argv: Sequence[str], name: str) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(name + "="):
            out.append(arg.split("=", 1)[1])
    return out


def is_meta169_proxy(argv: Sequence[str]) -> bool:
    """``meta169 ... proxy ...`` or ``python -m meta169 ... proxy ...``."""
    for i, arg in enumerate(argv):
        named = arg.rsplit("/", 1)[-1] == "meta169" or (arg == "meta169" and i > 0 and argv[i - 1] == "-m")
        if named:
            return "proxy" in argv[i + 1 :]
    return False


def find_proxies(processes: Sequence[tuple[int, tuple[str, ...]]]) -> tuple[ProxyProcess, ...]:
    out = []
    for pid, argv in processes:
        if is_meta169_proxy(argv):
            upstream = (_flag(argv, "--upstream") or [""])[0]
            secret = (_flag(argv, "--secret-file") or [""])[0]
            out.append(ProxyProcess(pid, tuple(argv), upstream, secret))
    return tuple(out)


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
        conf = (_flag(argv, "--conf-file") or _flag(argv, "-C") or [""])[0]
        found.append(Dnsmasq(int(token), conf, col.read(conf) if conf else None))
    return tuple(found)


def collect_namespace(
    col: HostCollector, name: str, role: Role, expected: Sequence[ExpectedListener],
    existing: set[str] | None, procs: Mapping[int, tuple[str, ...]],
) -> NamespaceFacts:  # fmt: skip
    netns.check_name(name)
    if existing is not None and name not in existing:
        return NamespaceFacts(name, role, exists=False, expected=tuple(expected))
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
    return NamespaceFacts(name, role, True, save4, save6, links, listening, dnsmasq, tuple(expected), tuple(errors))


def _server_answer(
    col: HostCollector, upstream: str, secret_file: str, caller: Caller, notes: list[str]
) -> ServerAnswer:
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
    try:
        reply = col.send(upstream, "/openstack", headers)
    except ClientError as exc:
        return ServerAnswer(upstream, label, signed, error=f"{exc.reason}: {exc}", secret_file=secret_file)
    body = reply.body[:200].decode("utf-8", errors="replace").strip()
    return ServerAnswer(upstream, label, signed, reply.status, body, secret_file=secret_file)


def collect_host(req: HostRequest, col: HostCollector) -> HostFacts:
    """Gather what :mod:`meta169.doctor.host`'s checks need."""
    notes: list[str] = []
    try:
        processes = list(col.processes())
        proxies: tuple[ProxyProcess, ...] | None = find_proxies(processes)
    except OSError as exc:
        notes.append(f"cannot list processes: {exc}")
        processes, proxies = [], None
    procs = dict(processes)
    files = list(req.listener_files)
    statics: list[str] = []
    # Explicit flags describe the deployment to check; running proxies are then only evidence.
    explicit = bool(req.namespaces or req.listener_files or req.upstream)
    for proxy in () if explicit else proxies or ():
        files += [f for f in _flag(proxy.argv, "--listeners") if f not in files]
        statics += _flag(proxy.argv, "--listen")
        if "--from-registry" in proxy.argv:
            notes.append(f"proxy pid {proxy.pid} derives listeners from the registry: pass --netns to check them")
    expected = expected_listeners(col, files, statics, notes)
    listed = _run(col, ["ip", "netns", "list"], notes)
    existing = {line.split()[0] for line in listed.splitlines() if line.strip()} if listed is not None else None
    wanted: dict[str, Role | None] = dict(req.namespaces)
    for name in expected:
        wanted.setdefault(name, None)
    if not wanted and existing and not explicit:
        for name in sorted(existing):
            if name.startswith(("qrouter-", "qdhcp-")):
                wanted[name] = "router" if name.startswith("qrouter-") else "dhcp"
    if not wanted:
        notes.append("no namespace to check: pass --netns NS[=router|=dhcp] or --proxy-listeners FILE")
    namespaces = tuple(
        collect_namespace(col, name, role or guess_role(name, expected.get(name, ())), expected.get(name, ()),
                          existing, procs)
        for name, role in wanted.items()
    )  # fmt: skip
    discovered = () if explicit else proxies or ()
    upstream = req.upstream or next((p.upstream for p in discovered if p.upstream), "")
    secret_file = req.secret_file or next((p.secret_file for p in discovered if p.secret_file), "")
    server = None
    if upstream:
        server = _server_answer(col, upstream, secret_file, req.caller or PROBE_CALLER, notes)
    else:
        notes.append("serve not checked: no running proxy names its upstream; pass --upstream")
    registry = col.resolve(req.caller) if req.caller is not None and col.resolve is not None else None
    return HostFacts(namespaces, proxies, upstream, server, registry, tuple(notes))


# --- the real seams ----------------------------------------------------------------------------------


def all_processes(proc: Path = Path("/proc")) -> list[tuple[int, tuple[str, ...]]]:
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        if argv:
            out.append((int(entry.name), argv))
    return out


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
