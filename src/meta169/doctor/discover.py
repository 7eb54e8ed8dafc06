"""What ``meta169 doctor --host`` checks when nobody names it: discovery as pure functions.

A network node says what it runs in four places. The CLI and
:mod:`~meta169.doctor.host_collect` read them; the functions here turn what was read
into :class:`Target` objects, each remembering where it was found:

- meta169's config file (:class:`ConfigValues`): the proxy's upstreams (a string or
  a list), listener file, static listeners and secret file; serve's proxy listener; the
  registry
- running processes (/proc/*/cmdline): every ``meta169 proxy`` (each ``--upstream``,
  ``--secret-file``, ``--listeners``, ``--listen``) and every ``meta169 serve`` with a
  proxy listener, whose address is an upstream to check too (a service's forked
  workers, which share its command line, once)
- labs that are up (``meta169 lab``): namespaces, listener file, upstream, registry
- ``ip netns list``: namespaces named the Neutron way, ``qrouter-<router id>`` (router
  mode: REDIRECT to the proxy on 9697), ``qdhcp-<network id>`` (dnsmasq; isolated
  metadata when it holds 169.254.169.254) and ``ovnmeta-<network id>`` (OVN's metadata
  namespace: 169.254.169.254 and a proxy on port 80, no dnsmasq) [neutron
  ``agent/l3/namespaces.py``, ``agent/linux/dhcp.py``, ``agent/ovn/metadata/agent.py``]

:func:`scope` filters the targets (``--only GLOB``) and merges them into one list of
namespaces and upstreams to check, remembering which upstreams one proxy fails over
between (its pool: one down while another answers is a warning, all down an error).
Nothing here reads a file or runs a command.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meta169.doctor.host import NEUTRON_PREFIXES, ExpectedListener, ProxyProcess, Role, UpstreamPool


@dataclass(frozen=True, slots=True)
class ConfigValues:
    """What meta169's config file says about the metadata path, as the doctor needs it."""

    source: str
    registry_url: str = ""
    serve_listens: tuple[str, ...] = ()
    proxy_upstreams: tuple[str, ...] = ()
    proxy_listener_files: tuple[str, ...] = ()
    proxy_listens: tuple[str, ...] = ()
    proxy_secret_file: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to check, and where the doctor learnt of it (``source``).

    ``upstreams`` are a proxy's, which it fails over between; ``pooled`` is off for a
    serve's proxy listener, which no proxy is known to list beside others.
    """

    source: str
    namespaces: tuple[tuple[str, Role | None], ...] = ()
    listener_files: tuple[str, ...] = ()
    static_listeners: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    secret_file: str = ""
    registry_url: str = ""
    notes: tuple[str, ...] = ()
    pid: int | None = None  # a running proxy's
    pooled: bool = True

    def describe(self, expected: Mapping[str, Sequence[ExpectedListener]] | None = None) -> str:
        """``source: what it names`` for the report's list of what was discovered."""
        names = dict(self.namespaces)
        for name in expected or {}:
            names.setdefault(name, None)
        parts = []
        if names:
            parts.append("namespaces " + ", ".join(f"{n} ({r})" if r else n for n, r in names.items()))
        if self.listener_files:
            parts.append("listener file " + ", ".join(self.listener_files))
        if self.static_listeners:
            parts.append("listeners " + ", ".join(self.static_listeners))
        if self.upstreams:
            parts.append(f"upstream{'s' if len(self.upstreams) > 1 else ''} {', '.join(self.upstreams)}")
        if self.secret_file:
            parts.append(f"secret file {self.secret_file}")
        if self.registry_url:
            parts.append(f"registry {self.registry_url}")
        return f"{self.source}: {'; '.join(parts) or 'nothing to check'}"


@dataclass(frozen=True, slots=True)
class Scope:
    """The merged result: namespaces (name, role or None to guess, found by), their
    expected listeners, upstreams (address, secret file, found by), the proxies' upstream
    pools and a registry URL."""

    namespaces: tuple[tuple[str, Role | None, str], ...] = ()
    expected: Mapping[str, tuple[ExpectedListener, ...]] | None = None
    upstreams: tuple[tuple[str, str, str], ...] = ()
    pools: tuple[UpstreamPool, ...] = ()
    registry_url: str = ""
    discovered: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    proxy_pids: Mapping[str, tuple[int, ...]] | None = None  # running proxies whose listeners name it

    def proxies_in(self, name: str) -> tuple[int, ...]:
        return (self.proxy_pids or {}).get(name, ())

    def expected_in(self, name: str) -> tuple[ExpectedListener, ...]:
        return (self.expected or {}).get(name, ())


# --- command lines ------------------------------------------------------------------------------


def flag_values(argv: Sequence[str], name: str) -> list[str]:
    """Every value of ``name VALUE`` and ``name=VALUE`` in ``argv``."""
    out = []
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(name + "="):
            out.append(arg.split("=", 1)[1])
    return out


def meta169_subcommand(argv: Sequence[str]) -> str | None:
    """``proxy`` or ``serve`` for ``[python -m] meta169 [global options] proxy|serve ...``, else None."""
    for i, arg in enumerate(argv):
        if arg.rsplit("/", 1)[-1] == "meta169" or (arg == "meta169" and i > 0 and argv[i - 1] == "-m"):
            return next((a for a in argv[i + 1 :] if a in ("proxy", "serve")), None)
    return None


def is_meta169_proxy(argv: Sequence[str]) -> bool:
    """``meta169 ... proxy ...`` or ``python -m meta169 ... proxy ...``."""
    return meta169_subcommand(argv) == "proxy"


def find_proxies(processes: Sequence[tuple[int, tuple[str, ...]]]) -> tuple[ProxyProcess, ...]:
    out = []
    for pid, argv in processes:
        if is_meta169_proxy(argv):
            secret = (flag_values(argv, "--secret-file") or [""])[0]
            out.append(ProxyProcess(pid, tuple(argv), upstreams_of(argv), secret))
    return tuple(out)


def upstreams_of(argv: Sequence[str]) -> tuple[str, ...]:
    """Every ``--upstream`` of a proxy's command line (the flag is repeatable), once each, in order."""
    return tuple(dict.fromkeys(u for u in flag_values(argv, "--upstream") if u))


def serve_upstream(listen: str) -> str:
    """Where a client reaches ``serve --listen ADDR``: wildcards become loopback; "" for port 0."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return listen
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def proxy_listens_of_serve(argv: Sequence[str]) -> list[str]:
    """The upstream addresses of serve's proxy listeners (``ADDR=proxy``, or bare ADDR with ``--proxy``)."""
    out = []
    bare_is_proxy = "--proxy" in argv
    for item in flag_values(argv, "--listen"):
        addr, sep, binding = item.rpartition("=") if "=" in item else (item, "", "")
        if (sep and binding == "proxy") or (not sep and bare_is_proxy):
            upstream = serve_upstream(addr)
            if upstream and upstream not in out:
                out.append(upstream)
    return out


def process_targets(processes: Sequence[tuple[int, tuple[str, ...]]]) -> tuple[Target, ...]:
    """A target per running ``meta169 proxy`` and per ``meta169 serve`` with a proxy listener."""
    out = []
    for pid, argv in processes:
        command = meta169_subcommand(argv)
        registry = (flag_values(argv, "--registry") or [""])[0]
        if command == "proxy":
            notes: tuple[str, ...] = ()
            if "--from-registry" in argv:
                notes = (f"meta169 proxy pid {pid} derives listeners from the registry (qrouter-ID/qdhcp-ID): "
                         "those namespaces are checked as found by ip netns list",)  # fmt: skip
            out.append(Target(
                f"meta169 proxy pid {pid} (/proc/{pid}/cmdline)",
                listener_files=tuple(dict.fromkeys(flag_values(argv, "--listeners"))),
                static_listeners=tuple(flag_values(argv, "--listen")),
                upstreams=upstreams_of(argv),
                secret_file=(flag_values(argv, "--secret-file") or [""])[0],
                registry_url=registry,
                notes=notes,
                pid=pid,
            ))  # fmt: skip
        elif command == "serve":
            for upstream in proxy_listens_of_serve(argv):
                out.append(Target(f"meta169 serve pid {pid} (/proc/{pid}/cmdline)", upstreams=(upstream,),
                                  registry_url=registry, pooled=False))  # fmt: skip
    return tuple(out)


# --- ip netns list ------------------------------------------------------------------------------


def parse_netns_list(text: str) -> tuple[str, ...]:
    """Names from ``ip netns list`` (``qrouter-x (id: 3)`` lines)."""
    return tuple(line.split()[0] for line in text.splitlines() if line.strip())


def neutron_role(name: str) -> Role | None:
    for prefix, role in NEUTRON_PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return role
    return None


def netns_target(names: Iterable[str]) -> Target | None:
    """The Neutron-named namespaces among ``names``, as one target (None when there is none)."""
    found = tuple((n, role) for n in sorted(names) if (role := neutron_role(n)) is not None)
    if not found:
        return None
    return Target("ip netns list (Neutron names qrouter-*, qdhcp-*, ovnmeta-*)", namespaces=found)


# --- the config file ------------------------------------------------------------------------------


def _strings(value: Any, where: str, notes: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    notes.append(f"{where}: expected a string or a list of strings, not {type(value).__name__}")
    return ()


def config_values(data: Mapping[str, Any], source: str) -> tuple[ConfigValues, tuple[str, ...]]:
    """The doctor's view of a parsed config file, and notes on values it could not use.

    Reads ``[registry] url``, ``[serve] listen`` and ``[proxy] upstream``,
    ``listeners``, ``listen`` and ``secret-file`` (each key is the command's long flag,
    :mod:`meta169.config.schema`; a repeatable flag's key takes a string or a list);
    everything else is another role's business.
    """
    notes: list[str] = []

    def table(name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if isinstance(value, Mapping):
            return value
        notes.append(f"{source}: [{name}] is not a table")
        return {}

    def strings(section: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
        return _strings(section.get(key), f"{source}: {name}.{key}", notes)

    registry, serve, proxy = table("registry"), table("serve"), table("proxy")
    values = ConfigValues(
        source=source,
        registry_url=(strings(registry, "registry", "url") or ("",))[0],
        serve_listens=strings(serve, "serve", "listen"),
        proxy_upstreams=tuple(dict.fromkeys(strings(proxy, "proxy", "upstream"))),
        proxy_listener_files=strings(proxy, "proxy", "listeners"),
        proxy_listens=strings(proxy, "proxy", "listen"),
        proxy_secret_file=(strings(proxy, "proxy", "secret-file") or ("",))[0],
    )
    return values, tuple(notes)


def config_targets(values: ConfigValues) -> tuple[Target, ...]:
    """The proxy the config describes, and serve's proxy listeners when no proxy upstream is set."""
    out = []
    source = f"config {values.source}"
    proxy = Target(f"{source} [proxy]", listener_files=values.proxy_listener_files,
                   static_listeners=values.proxy_listens, upstreams=values.proxy_upstreams,
                   secret_file=values.proxy_secret_file, registry_url=values.registry_url)  # fmt: skip
    if proxy.listener_files or proxy.static_listeners or proxy.upstreams:
        out.append(proxy)
    for listen in values.serve_listens:
        addr, sep, binding = listen.rpartition("=")
        upstream = serve_upstream(addr) if sep and binding == "proxy" else ""
        if upstream and upstream not in values.proxy_upstreams:
            out.append(Target(f"{source} [serve]", upstreams=(upstream,), registry_url=values.registry_url,
                              pooled=False))  # fmt: skip
    if not out and values.registry_url:
        out.append(Target(source, registry_url=values.registry_url))
    return tuple(out)


# --- merging ----------------------------------------------------------------------------------------


def matches(name: str, only: Sequence[str]) -> bool:
    return not only or any(fnmatch.fnmatchcase(name, pattern) for pattern in only)


def scope(
    targets: Sequence[tuple[Target, Mapping[str, Sequence[ExpectedListener]]]], only: Sequence[str] = ()
) -> Scope:
    """Merge targets (each with the listeners its files and flags expect, by namespace).

    With ``only`` (globs), namespaces that match none are left out, and so is every
    target left with no namespace: its upstream and registry belong to other namespaces.
    """
    namespaces: dict[str, tuple[Role | None, list[str]]] = {}
    expected: dict[str, list[ExpectedListener]] = {}
    upstreams: dict[str, tuple[str, list[str]]] = {}
    pools: dict[tuple[str, ...], list[str]] = {}
    registries: list[str] = []
    pids: dict[str, list[int]] = {}
    discovered: list[str] = []
    left_out: list[str] = []
    for target, listeners in targets:
        names: dict[str, Role | None] = dict(target.namespaces)
        for name in listeners:
            names.setdefault(name, None)
        kept = {n: r for n, r in names.items() if matches(n, only)}
        left_out += [n for n in names if n not in kept]
        if only and not kept:
            left_out.append(target.source)
            continue
        discovered.append(target.describe(listeners))
        for name, role in kept.items():
            known_role, found_by = namespaces.get(name, (None, []))
            namespaces[name] = (known_role or role, [*found_by, target.source])
            for item in listeners.get(name, ()):
                if item not in expected.setdefault(name, []):
                    expected[name].append(item)
            if target.pid is not None and name in listeners:
                pids.setdefault(name, []).append(target.pid)
        for upstream in target.upstreams:
            secret, found_by = upstreams.get(upstream, ("", []))
            upstreams[upstream] = (secret or target.secret_file, [*found_by, target.source])
        if target.upstreams and target.pooled:
            pools.setdefault(tuple(dict.fromkeys(target.upstreams)), []).append(target.source)
        if target.registry_url and target.registry_url not in registries:
            registries.append(target.registry_url)
    return Scope(
        namespaces=tuple((n, role, ", ".join(dict.fromkeys(by))) for n, (role, by) in namespaces.items()),
        expected={n: tuple(v) for n, v in expected.items()},
        upstreams=tuple((u, secret, ", ".join(dict.fromkeys(by))) for u, (secret, by) in upstreams.items()),
        pools=tuple(UpstreamPool(p, ", ".join(dict.fromkeys(by))) for p, by in pools.items()),
        # Several registries (a lab beside the node's own): the first found, config first.
        registry_url=registries[0] if registries else "",
        discovered=tuple(discovered),
        left_out=tuple(dict.fromkeys(left_out)),
        proxy_pids={n: tuple(v) for n, v in pids.items()},
    )
