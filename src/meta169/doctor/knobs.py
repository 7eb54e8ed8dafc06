"""The guest settings that put a link-local route in the way, or a proxy in front of it.

Pure readers of configuration text:

- RHEL family network-scripts: ``ifup-eth`` "Add Zeroconf route" adds
  ``169.254.0.0/16 dev DEV metric 1000+ifindex scope link`` unless ``NOZEROCONF``
  is non-empty (``[ -z "${NOZEROCONF}" ]``: even ``NOZEROCONF=no`` disables it);
  ``ifup-eth`` sources /etc/sysconfig/network and the interface's ifcfg file, so
  either may set it [initscripts network-scripts/ifup-eth; tests/unit/corpus/centos6-zeroconf].
- NetworkManager keyfiles: ``[ipv4] link-local=`` (NMSettingIP4LinkLocal: 0
  default, 1 auto, 2 disabled, 3 enabled, 4 fallback), ``method=link-local``,
  ``ignore-auto-routes=true``; the global default ``ipv4.link-local`` in a
  ``[connection]`` section of NetworkManager.conf.
- systemd-networkd ``.network`` files: ``LinkLocalAddressing=`` (yes, ipv4,
  fallback enable IPv4LL; networkd's default is ipv6), ``IPv4LLRoute=yes``,
  ``[DHCPv4] UseRoutes=no`` (option 121 ignored). A file in /etc masks one of the
  same name in /run, which masks /usr/lib and /lib [systemd.network(5)].
- avahi-autoipd: Debian's ifupdown hook ``/etc/network/if-up.d/avahi-autoipd``
  adds the 169.254.0.0/16 route; the daemon assigns a 169.254.x.y address.
- HTTP proxy variables: clients built on Python's urllib/requests (cloud-init)
  honour ``http_proxy``/``HTTP_PROXY`` and ``no_proxy``/``NO_PROXY``; curl reads
  only the lower-case ``http_proxy`` [curl(1) ENVIRONMENT]. ``no_proxy`` covers
  169.254.169.254 by ``*``, by the exact address, or by a CIDR that contains it
  (requests and curl >= 7.86 understand CIDRs; wget and older curl do not).
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")

SYSCONFIG_NETWORK = "/etc/sysconfig/network"
IFUP_ETH = "/etc/sysconfig/network-scripts/ifup-eth"
IFCFG_DIR = "/etc/sysconfig/network-scripts/"
AVAHI_HOOK = "/etc/network/if-up.d/avahi-autoipd"
NM_CONF = "/etc/NetworkManager/NetworkManager.conf"
NM_CONF_DIRS = ("/etc/NetworkManager/conf.d/", "/usr/lib/NetworkManager/conf.d/", "/run/NetworkManager/conf.d/")
NM_CONNECTION_DIRS = ("/etc/NetworkManager/system-connections/", "/run/NetworkManager/system-connections/")
NETWORKD_DIRS = ("/etc/systemd/network/", "/run/systemd/network/", "/usr/lib/systemd/network/", "/lib/systemd/network/")
SYSTEMD_CONF = ("/etc/systemd/system.conf",)
ENVIRONMENT_FILE = "/etc/environment"

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")

_NM_LINK_LOCAL = {"0": "default", "1": "auto", "2": "disabled", "3": "enabled", "4": "fallback"}
_TRUE = frozenset(("1", "yes", "true", "on"))


def numbered(text: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    """``line N: text`` for each line matching ``pattern``."""
    return tuple(f"line {n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if pattern.search(line))


# --- shell variable files (/etc/sysconfig/network, ifcfg-*, /etc/environment) -------------------

_ASSIGN_RE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def shell_vars(text: str) -> dict[str, tuple[str, str]]:
    """``NAME=value`` assignments: name -> (value without quotes, the line); last wins."""
    out: dict[str, tuple[str, str]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0] if not raw.lstrip().startswith("#") else ""
        match = _ASSIGN_RE.match(line)
        if not match:
            continue
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[match.group(1)] = (value, raw.strip())
    return out


# --- RHEL network-scripts ---------------------------------------------------------------------------

_ZEROCONF_LINE = re.compile(r"NOZEROCONF|169\.254\.0\.0")


@dataclass(frozen=True, slots=True)
class Zeroconf:
    """What RHEL's network-scripts will do about the zeroconf route for one interface."""

    adds_route: bool  # ifup-eth has the block and NOZEROCONF is empty
    script_lines: tuple[str, ...]  # the block's lines in ifup-eth
    setting: str  # "NOZEROCONF=yes in /etc/sysconfig/network", or "" when unset


def rhel_zeroconf(files: Mapping[str, str], interface: str) -> Zeroconf | None:
    """None unless ``ifup-eth`` is there and carries the zeroconf block."""
    script = files.get(IFUP_ETH)
    if script is None:
        return None
    lines = numbered(script, _ZEROCONF_LINE)
    if not any("169.254.0.0" in line for line in lines):
        return None
    for path in (f"{IFCFG_DIR}ifcfg-{interface}", SYSCONFIG_NETWORK):
        value = shell_vars(files.get(path, "")).get("NOZEROCONF")
        if value is not None and value[0]:
            return Zeroconf(False, lines, f"{value[1]} in {path}")
    return Zeroconf(True, lines, "")


# --- NetworkManager ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NMConnection:
    path: str
    id: str
    interface: str
    method: str
    link_local: str  # default, auto, disabled, enabled, fallback
    ignore_auto_routes: bool
    lines: tuple[str, ...]


def _ini(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # A broken file contributes what it parsed before the error.
    with contextlib.suppress(configparser.Error):
        parser.read_string(text)
    return parser


def nm_global_link_local(files: Mapping[str, str]) -> tuple[str, str] | None:
    """(value, "ipv4.link-local=3 in PATH") from NetworkManager.conf or conf.d, the last wins."""
    found = None
    paths = [NM_CONF, *sorted(p for p in files if p.startswith(NM_CONF_DIRS) and p.endswith(".conf"))]
    for path in paths:
        if path not in files:
            continue
        parser = _ini(files[path])
        for section in parser.sections():
            if section == "connection" or section.startswith("connection-"):
                raw = parser.get(section, "ipv4.link-local", fallback=None)
                if raw is not None:
                    found = (_NM_LINK_LOCAL.get(raw.strip(), raw.strip()), f"ipv4.link-local={raw.strip()} in {path}")
    return found


def nm_connections(files: Mapping[str, str]) -> tuple[NMConnection, ...]:
    out = []
    for path in sorted(files):
        if not path.startswith(NM_CONNECTION_DIRS):
            continue
        parser = _ini(files[path])
        if not parser.has_section("connection"):
            continue
        raw_ll = parser.get("ipv4", "link-local", fallback="0").strip()
        lines = []
        if parser.has_option("ipv4", "link-local"):
            lines.append(f"[ipv4] link-local={raw_ll}")
        method = parser.get("ipv4", "method", fallback="auto").strip()
        if parser.has_option("ipv4", "method"):
            lines.append(f"[ipv4] method={method}")
        ignore = parser.get("ipv4", "ignore-auto-routes", fallback="false").strip().lower() in _TRUE
        if ignore:
            lines.append("[ipv4] ignore-auto-routes=true")
        out.append(
            NMConnection(
                path=path,
                id=parser.get("connection", "id", fallback=path.rsplit("/", 1)[-1]),
                interface=parser.get("connection", "interface-name", fallback=""),
                method=method,
                link_local=_NM_LINK_LOCAL.get(raw_ll, raw_ll),
                ignore_auto_routes=ignore,
                lines=tuple(lines),
            )
        )
    return tuple(out)


# --- systemd-networkd ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkdFile:
    path: str
    match_names: tuple[str, ...]
    link_local: str  # the LinkLocalAddressing= value, "" when unset (default ipv6)
    ipv4ll_route: bool
    use_routes: bool
    lines: tuple[str, ...]
    match_macs: tuple[str, ...] = ()
    # [Match] keys we cannot evaluate from a bundle (Type=, Kind=, Driver=, ...).
    match_other: tuple[str, ...] = ()

    @property
    def ipv4ll(self) -> bool:
        return self.link_local.lower() in ("yes", "ipv4", "fallback", "fallback-ipv4", "true", "1")

    def matches(self, interface: str, mac: str = "") -> bool:
        """Whether the file applies to ``interface``; a key we cannot evaluate means no."""
        if self.match_other:
            return False
        if self.match_names and not any(fnmatch.fnmatchcase(interface, n) for n in self.match_names):
            return False
        return not self.match_macs or mac.lower() in self.match_macs


def networkd_for(files: Mapping[str, str], interface: str, mac: str = "") -> NetworkdFile | None:
    """The .network file networkd applies to ``interface``: the first match in lexical order."""
    return next((nd for nd in networkd_files(files) if nd.matches(interface, mac)), None)


def networkd_files(files: Mapping[str, str]) -> tuple[NetworkdFile, ...]:
    """Effective .network files in lexical order: for each file name the one from the first directory."""
    chosen: dict[str, str] = {}
    for directory in NETWORKD_DIRS:
        for path in sorted(files):
            if path.startswith(directory) and path.endswith(".network"):
                chosen.setdefault(path.rsplit("/", 1)[-1], path)
    out = []
    for name in sorted(chosen):
        path = chosen[name]
        parser = _ini(files[path])
        names = tuple(parser.get("Match", "Name", fallback="").split())
        macs = tuple(m.lower() for m in parser.get("Match", "MACAddress", fallback="").split())
        other = tuple(k for k in (parser.options("Match") if parser.has_section("Match") else ())
                      if k not in ("Name", "MACAddress"))  # fmt: skip
        link_local = parser.get("Network", "LinkLocalAddressing", fallback="").strip()
        route = parser.get("Network", "IPv4LLRoute", fallback="no").strip().lower() in _TRUE
        use_routes = parser.get("DHCPv4", "UseRoutes", fallback="yes").strip().lower() in _TRUE
        lines = []
        if link_local:
            lines.append(f"[Network] LinkLocalAddressing={link_local}")
        if route:
            lines.append("[Network] IPv4LLRoute=yes")
        if not use_routes:
            lines.append("[DHCPv4] UseRoutes=no")
        out.append(NetworkdFile(path, names, link_local, route, use_routes, tuple(lines), macs, other))
    return tuple(out)


# --- proxies ------------------------------------------------------------------------------------------------


def redact_url(value: str) -> str:
    """A proxy URL without its password."""
    try:
        parts = urlsplit(value if "://" in value else "http://" + value)
    except ValueError:
        return value
    if parts.password is None:
        return value
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class ProxyExposure:
    """A proxy variable that would carry metadata requests, and what no_proxy says."""

    source: str  # "environment of the doctor", "/etc/environment", ...
    variables: tuple[str, ...]  # "http_proxy=http://proxy:3128"
    no_proxy: str  # the no_proxy text seen, "" if none
    covered: bool
    cidr_only: bool  # covered only by a CIDR entry, which some clients ignore


def no_proxy_covers(no_proxy: str, address: ipaddress.IPv4Address = METADATA_V4) -> tuple[bool, bool]:
    """(covered, only by CIDR) for ``address``."""
    exact = cidr = False
    for entry in (e.strip() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*" or entry == str(address):
            exact = True
        elif "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    cidr = True
            except ValueError:
                continue
    return exact or cidr, cidr and not exact


def proxy_exposure(env: Mapping[str, str], source: str) -> ProxyExposure | None:
    """None when no proxy variable for http:// is set in ``env``."""
    proxies = tuple(f"{name}={redact_url(env[name])}" for name in PROXY_VARS if env.get(name, "").strip())
    if not proxies:
        return None
    no_proxy = ",".join(env[n] for n in NO_PROXY_VARS if env.get(n, "").strip())
    covered, cidr_only = no_proxy_covers(no_proxy)
    return ProxyExposure(source, proxies, no_proxy, covered, cidr_only)


def systemd_default_environment(text: str) -> dict[str, str]:
    """The variables of ``DefaultEnvironment=`` in systemd's system.conf (services inherit them)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("DefaultEnvironment="):
            continue
        body = line.split("=", 1)[1]
        for item in re.findall(r'"([^"]*)"|(\S+)', body):
            assignment = item[0] or item[1]
            key, sep, value = assignment.partition("=")
            if sep:
                out[key] = value
    return out


def present(names: Iterable[str], files: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(n for n in names if n in files)
