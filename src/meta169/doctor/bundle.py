"""The support bundle: what the guest doctor collects, as files in a directory.

The live doctor and ``--offline DIR`` analyse the same thing: a mapping of bundle
paths to text. ``meta169 doctor --collect DIR`` writes it; a support engineer
reads it elsewhere. Layout (every entry optional; the analysers use what is there):

- ``meta.json``           format, platform, host name, time, command errors
- ``ip-route.json/.txt``  ``ip [-j] -4 route show table all`` (also ``ip6-route.*``)
- ``ip-rule.json/.txt``   ``ip [-j] -4 rule show``
- ``ip-neigh.json/.txt``  ``ip [-j] neigh show``
- ``ip-addr.json/.txt``   ``ip [-j] addr show``
- ``ip-route-get.json``   ``ip -j -4 route get 169.254.169.254`` (a FIB lookup, no packet)
- ``proc/net/route``, ``proc/net/arp``  for guests without iproute2's JSON
- ``route-print.txt``     Windows ``route print`` (offline only)
- ``nmcli-dhcp4.txt``     ``nmcli -f GENERAL.DEVICE,DHCP4 device show``
- ``ps.txt``              process names, one per line
- ``env.json``            the HTTP proxy variables of the collecting process
- ``probes.json``         live probe results (:mod:`meta169.doctor.probes`)
- ``files/<path>``        config files and leases from :data:`FILE_GLOBS`

Collection runs commands through an injected runner and reads files through
injected readers; nothing here writes outside the bundle directory.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meta169.doctor import knobs, leases
from meta169.errors import CommandFailed, ConfigError
from meta169.plumbing.command import Runner

FORMAT = "meta169-doctor-bundle/1"
META = "meta.json"
IP_ROUTE_JSON, IP_ROUTE_TXT = "ip-route.json", "ip-route.txt"
IP6_ROUTE_JSON, IP6_ROUTE_TXT = "ip6-route.json", "ip6-route.txt"
IP_RULE_JSON, IP_RULE_TXT = "ip-rule.json", "ip-rule.txt"
IP_NEIGH_JSON, IP_NEIGH_TXT = "ip-neigh.json", "ip-neigh.txt"
IP_ADDR_JSON, IP_ADDR_TXT = "ip-addr.json", "ip-addr.txt"
IP_ROUTE_GET = "ip-route-get.json"
PROC_NET_ROUTE, PROC_NET_ARP = "proc/net/route", "proc/net/arp"
ROUTE_PRINT = "route-print.txt"
NMCLI = "nmcli-dhcp4.txt"
PS = "ps.txt"
ENV = "env.json"
PROBES = "probes.json"
FILES = "files/"
MAX_FILE = 1 << 20


@dataclass(frozen=True, slots=True)
class Capture:
    """A command whose output becomes one bundle file; ``optional`` ones may be absent."""

    name: str
    argv: tuple[str, ...]
    optional: bool = False


COMMANDS: tuple[Capture, ...] = (
    Capture(IP_ROUTE_JSON, ("ip", "-j", "-4", "route", "show", "table", "all")),
    Capture(IP_ROUTE_TXT, ("ip", "-4", "route", "show", "table", "all")),
    Capture(IP6_ROUTE_JSON, ("ip", "-j", "-6", "route", "show", "table", "all")),
    Capture(IP6_ROUTE_TXT, ("ip", "-6", "route", "show", "table", "all")),
    Capture(IP_RULE_JSON, ("ip", "-j", "-4", "rule", "show")),
    Capture(IP_RULE_TXT, ("ip", "-4", "rule", "show")),
    Capture(IP_NEIGH_JSON, ("ip", "-j", "neigh", "show")),
    Capture(IP_NEIGH_TXT, ("ip", "neigh", "show")),
    Capture(IP_ADDR_JSON, ("ip", "-j", "addr", "show")),
    Capture(IP_ADDR_TXT, ("ip", "addr", "show")),
    Capture(IP_ROUTE_GET, ("ip", "-j", "-4", "route", "get", "169.254.169.254")),
    Capture(NMCLI, ("nmcli", "-f", "GENERAL.DEVICE,DHCP4", "device", "show"), optional=True),
)
PROC_FILES: Mapping[str, str] = {PROC_NET_ROUTE: "/proc/net/route", PROC_NET_ARP: "/proc/net/arp"}

# Config files the checks read, and the lease locations of every client we know.
FILE_GLOBS: tuple[str, ...] = (
    knobs.SYSCONFIG_NETWORK,
    knobs.IFUP_ETH,
    knobs.IFCFG_DIR + "ifcfg-*",
    knobs.AVAHI_HOOK,
    knobs.NM_CONF,
    *(d + "*.conf" for d in knobs.NM_CONF_DIRS),
    *(d + "*" for d in knobs.NM_CONNECTION_DIRS),
    *(d + "*.network" for d in knobs.NETWORKD_DIRS),
    *knobs.SYSTEMD_CONF,
    knobs.ENVIRONMENT_FILE,
    "/etc/dhcp/dhclient.conf",
    "/etc/dhclient.conf",
    "/etc/network/interfaces",
    "/etc/network/interfaces.d/*",
    "/etc/netplan/*.yaml",
    *leases.LEASE_GLOBS,
)
# Secrets that may sit in NetworkManager connection files (Wi-Fi, VPN).
_SECRET_KEYS = ("psk", "password", "secret", "private-key", "pin", "wep-key")


def redact(text: str) -> str:
    """Blank the values of secret-looking keys (``psk=...``) in a config file."""
    out = []
    for line in text.splitlines(keepends=True):
        key, sep, _ = line.partition("=")
        name = key.strip().lower()
        secret = sep and any(name.startswith(s) or name.endswith(s) for s in _SECRET_KEYS)
        out.append(f"{key}=<redacted>\n" if secret else line)
    return "".join(out)


def bundle_path(guest_path: str) -> str:
    """``/etc/sysconfig/network`` -> ``files/etc/sysconfig/network``."""
    return FILES + guest_path.lstrip("/")


def guest_files(bundle: Mapping[str, str]) -> dict[str, str]:
    """The ``files/`` part of a bundle keyed by guest path."""
    return {"/" + k[len(FILES) :]: v for k, v in bundle.items() if k.startswith(FILES)}


# --- live collection (IO through injected callables) -----------------------------------------


@dataclass(frozen=True)
class Collector:
    """The seams of live collection: commands, /proc reads, config globs and reads, env, processes.

    ``glob`` and ``read_config`` see guest paths (``/etc/...``); they may map them
    under another root (a container's, a lab VM's). ``read`` reads /proc as is.
    """

    runner: Runner
    read: Callable[[str], str | None]
    glob: Callable[[str], Sequence[str]]
    env: Mapping[str, str]
    processes: Callable[[], Sequence[str]]
    read_config: Callable[[str], str | None] | None = None


def run_capture(collector: Collector, capture: Capture, bundle: dict[str, str], errors: dict[str, str]) -> None:
    """Run one capture into ``bundle``; a failure goes to ``errors`` (not for a missing optional tool)."""
    try:
        result = collector.runner(list(capture.argv), check=False)
    except CommandFailed as exc:  # not installed, or timed out
        if not (capture.optional and exc.returncode == 127):
            errors[capture.name] = f"{' '.join(capture.argv)}: {exc.stderr.strip() or exc}"
        return
    if result.returncode == 0:
        bundle[capture.name] = result.stdout
    else:
        errors[capture.name] = f"{' '.join(capture.argv)} exited {result.returncode}: {result.stderr.strip()}"


def refresh_neighbours(collector: Collector, bundle: dict[str, str]) -> None:
    """Capture the neighbour table again: after the probes it shows whether ARP was answered."""
    for capture in COMMANDS:
        if capture.name in (IP_NEIGH_JSON, IP_NEIGH_TXT):
            run_capture(collector, capture, bundle, {})
    text = collector.read(PROC_FILES[PROC_NET_ARP])
    if text is not None:
        bundle[PROC_NET_ARP] = text


def collect(collector: Collector) -> dict[str, str]:
    """Run the commands, read the files; failures are recorded in ``meta.json``, not raised."""
    bundle: dict[str, str] = {}
    errors: dict[str, str] = {}
    for capture in COMMANDS:
        run_capture(collector, capture, bundle, errors)
    for name, path in PROC_FILES.items():
        text = collector.read(path)
        if text is not None:
            bundle[name] = text
    seen: set[str] = set()
    for pattern in FILE_GLOBS:
        for path in sorted(collector.glob(pattern)):
            if path in seen:
                continue
            seen.add(path)
            text = (collector.read_config or collector.read)(path)
            if text is not None:
                bundle[bundle_path(path)] = redact(text)
    proxy_env = {k: knobs.redact_url(v) for k, v in collector.env.items() if k in (*knobs.PROXY_VARS,
                                                                                   *knobs.NO_PROXY_VARS)}  # fmt: skip
    bundle[ENV] = json.dumps(proxy_env, indent=2, sort_keys=True) + "\n"
    bundle[PS] = "".join(f"{name}\n" for name in sorted(set(collector.processes())))
    bundle[META] = (
        json.dumps(
            {
                "format": FORMAT,
                "platform": "linux",
                "hostname": socket.gethostname(),
                "kernel": platform.release(),
                "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "errors": errors,
            },
            indent=2,
        )
        + "\n"
    )
    return bundle


def read_text_file(path: str) -> str | None:
    """A readable text file's contents (at most 1 MiB), or None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE + 1)
    except OSError:
        return None
    if len(data) > MAX_FILE or b"\0" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


def process_names(proc: Path = Path("/proc")) -> tuple[str, ...]:
    """The ``comm`` of every process we can see."""
    names = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            text = read_text_file(str(entry / "comm"))
            if text:
                names.append(text.strip())
    return tuple(names)


# --- bundle directories ------------------------------------------------------------------------


def write_bundle(directory: Path, bundle: Mapping[str, str]) -> None:
    """Write ``bundle`` under ``directory`` (created; must be empty or new)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise ConfigError(f"--collect {directory}: directory is not empty")
        for name, text in bundle.items():
            path = directory / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise ConfigError(f"bundle entry {name!r} escapes the bundle")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    except OSError as exc:
        raise ConfigError(f"--collect {directory}: {exc.strerror or exc}") from exc


def read_bundle(directory: Path) -> dict[str, str]:
    """Every text file under ``directory``, keyed by its path relative to it."""
    if not directory.is_dir():
        raise ConfigError(f"--offline {directory}: not a directory")
    out: dict[str, str] = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            text = read_text_file(str(path))
            if text is not None:
                out[path.relative_to(directory).as_posix()] = text
    if not out:
        raise ConfigError(f"--offline {directory}: no files")
    check_bundle(out, f"--offline {directory}")
    return out


# Without one of these there is no route table, and so nothing to diagnose.
ROUTE_TABLES = (IP_ROUTE_JSON, IP_ROUTE_TXT, PROC_NET_ROUTE, ROUTE_PRINT)


def check_bundle(bundle: Mapping[str, str], where: str) -> None:
    """ConfigError naming what is missing when ``bundle`` is not a doctor bundle.

    A bundle needs a route table (``meta169 doctor --collect`` always writes one; a
    hand-made bundle may be just ``ip route > ip-route.txt``). A ``meta.json`` that
    is there must be ours.
    """
    problems = []
    if META in bundle:
        try:
            fmt = json.loads(bundle[META]).get("format")
        except (ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            problems.append(f"{META} does not say format {FORMAT!r}")
    if not any(name in bundle for name in ROUTE_TABLES):
        problems.append(f"no route table: none of {', '.join(ROUTE_TABLES)}")
    if problems:
        found = ", ".join(sorted(bundle)[:8]) + (", ..." if len(bundle) > 8 else "")
        raise ConfigError(f"{where} is not a doctor bundle: {'; '.join(problems)} (it holds {found}); "
                          "make one inside the guest with: meta169 doctor --collect DIR")  # fmt: skip


def meta(bundle: Mapping[str, str]) -> dict[str, Any]:
    """``meta.json`` as a dict ({} when absent or unreadable)."""
    try:
        data = json.loads(bundle.get(META, "{}"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
