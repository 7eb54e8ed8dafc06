"""``meta169 doctor``: why can't this VM reach 169.254.169.254? (and the host side)

Exit codes (:mod:`meta169.cli`): 0 no finding of error severity; 1 at least one
error finding; 2 usage (bad flag, unreadable bundle); 4 the doctor could not run
(no route table readable, no namespace inspectable).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from meta169.client.url import DEFAULT_URL, parse_url
from meta169.doctor import bundle as b
from meta169.doctor import guest, host
from meta169.doctor.facts import facts_from_bundle
from meta169.doctor.host_collect import (
    HostCollector,
    HostRequest,
    all_processes,
    collect_host,
    registry_resolver,
    send_upstream,
)
from meta169.doctor.model import Report
from meta169.doctor.probes import DEFAULT_TIMEOUT, run_probes
from meta169.doctor.render import render_human, render_json
from meta169.errors import ConfigError, PlumbingError, ValidationError
from meta169.exits import cli_errors
from meta169.model import Caller, check_id, parse_ip


def _unicode(force_ascii: bool) -> bool:
    if force_ascii:
        return False
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗→·".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def live_bundle(
    *, url: str, probes: bool, timeout: float, leases: tuple[Path, ...], files_root: Path | None
) -> dict[str, str]:
    """Collect this machine's facts (read-only) and, unless ``probes`` is off, probe ``url``."""
    from meta169.plumbing.command import run

    root = str(files_root).rstrip("/") if files_root is not None else ""

    def read(path: str) -> str | None:
        return b.read_text_file(path)

    def find(pattern: str) -> list[str]:
        return [p[len(root) :] for p in glob.glob(root + pattern)]

    def read_config(path: str) -> str | None:
        return b.read_text_file(root + path)

    collector = b.Collector(runner=run, read=read, glob=find, env=dict(os.environ), processes=b.process_names,
                            read_config=read_config)  # fmt: skip
    data = b.collect(collector)
    for lease in leases:
        text = b.read_text_file(str(lease))
        if text is None:
            raise ConfigError(f"--lease {lease}: cannot read it")
        data[b.bundle_path(str(lease.absolute()))] = text
    if b.IP_ROUTE_JSON not in data and b.IP_ROUTE_TXT not in data and b.PROC_NET_ROUTE not in data:
        raise PlumbingError("cannot read the route table: neither `ip route` nor /proc/net/route worked")
    if probes:
        endpoint = parse_url(url)
        facts = facts_from_bundle(data)
        # Probing fe80::a9fe:a9fe on every link only makes sense for the real address.
        v6 = endpoint == parse_url(DEFAULT_URL)
        results = run_probes(endpoint, facts.links, timeout=timeout, ipv6=v6)
        data[b.PROBES] = json.dumps([r.to_json() for r in results], indent=2) + "\n"
        b.refresh_neighbours(collector, data)
    return data


def _caller(network_id: str | None, router_id: str | None, ip: str | None) -> Caller | None:
    if ip is None:
        if network_id or router_id:
            raise ConfigError("--network/--router needs --ip (the guest's address)")
        return None
    if (network_id is None) == (router_id is None):
        raise ConfigError("--ip needs exactly one of --network ID or --router ID")
    try:
        address = parse_ip(ip)
        if network_id is not None:
            return Caller(ip=address, network_id=check_id("network", network_id))
        assert router_id is not None
        return Caller(ip=address, router_id=check_id("router", router_id))
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc


def _netns(items: tuple[str, ...]) -> tuple[tuple[str, host.Role | None], ...]:
    out: list[tuple[str, host.Role | None]] = []
    for item in items:
        name, _, role = item.partition("=")
        if role not in ("", "router", "dhcp"):
            raise ConfigError(f"--netns {item}: the role after '=' is router or dhcp")
        out.append((name, "router" if role == "router" else "dhcp" if role == "dhcp" else None))
    return tuple(out)


def _read_secret(path: str) -> bytes:
    from meta169.secretfile import read_secret_file

    return read_secret_file(Path(path), what="the proxy's --secret-file")


def _registry_url() -> str:
    ctx = click.get_current_context()
    obj: Any = ctx.find_root().obj
    return str(obj.registry_url) if obj is not None and hasattr(obj, "registry_url") else "memory://"


def _emit(report: Report, as_json: bool, unicode: bool) -> None:
    code = 1 if report.has_errors else 0
    click.echo(render_json(report, exit_code=code) if as_json else render_human(report, unicode=unicode), nl=False)
    sys.exit(code)


@click.command("doctor")
@click.option("--host", "host_mode", is_flag=True, help="Diagnose the network node (namespaces, proxy, serve, "
              "registry) instead of this guest. Needs root.")  # fmt: skip
@click.option("--collect", "collect_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write a support bundle of this guest to DIR (new or empty) and stop.")  # fmt: skip
@click.option("--offline", "offline_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Analyse a bundle collected elsewhere with --collect.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--ascii", "force_ascii", is_flag=True, help="Plain ASCII marks instead of ✓ and ✗.")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Metadata endpoint the live probes ask.")
@click.option("--no-probes", is_flag=True, help="Send nothing: analyse routes, leases and settings only.")
@click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, help="Seconds per live probe.")
@click.option("--lease", "leases", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A DHCP lease file outside the usual places (repeatable).")  # fmt: skip
@click.option("--files-root", type=click.Path(file_okay=False, path_type=Path),
              help="Read config files and leases under DIR instead of / (a container's or lab VM's root).")  # fmt: skip
@click.option("--netns", "namespaces", multiple=True, metavar="NS[=router|=dhcp]",
              help="--host: a namespace to check (repeatable) [default: those of the running proxy's "
              "listeners, else qrouter-*/qdhcp-*].")  # fmt: skip
@click.option("--upstream", metavar="unix:PATH|HOST:PORT", help="--host: where serve listens for the proxy "
              "[default: the running proxy's --upstream].")  # fmt: skip
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
              help="--host: the proxy's shared secret, to check that serve accepts it "
              "[default: the running proxy's].")  # fmt: skip
@click.option("--proxy-listeners", "listener_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="--host: the proxy's listener file, when the proxy is not running.")  # fmt: skip
@click.option("--network", "network_id", metavar="ID", help="--host: the caller's network (with --ip).")
@click.option("--router", "router_id", metavar="ID", help="--host: the caller's router (with --ip).")
@click.option("--ip", "caller_ip", metavar="IP", help="--host: the guest address the registry must resolve.")
def doctor(
    host_mode: bool,
    collect_dir: Path | None,
    offline_dir: Path | None,
    as_json: bool,
    force_ascii: bool,
    url: str,
    no_probes: bool,
    timeout: float,
    leases: tuple[Path, ...],
    files_root: Path | None,
    namespaces: tuple[str, ...],
    upstream: str | None,
    secret_file: Path | None,
    listener_files: tuple[Path, ...],
    network_id: str | None,
    router_id: str | None,
    caller_ip: str | None,
) -> None:
    """Find why a guest cannot reach its metadata, hop by hop, with the evidence and the fix.

    Inside a VM: routes, neighbours, DHCP leases, network settings, proxies, then live
    probes. With --host, on the network node: REDIRECT rules, isolated address, proxy,
    serve, shared secret, registry. Exit 0: no error findings; 1: error findings;
    2: usage; 4: could not run.
    """
    with cli_errors():
        unicode = _unicode(force_ascii)
        if sum(bool(x) for x in (host_mode, collect_dir, offline_dir)) > 1:
            raise ConfigError("give at most one of --host, --collect DIR and --offline DIR")
        if timeout <= 0 or timeout > 60:
            raise ConfigError("--timeout must be in (0, 60] seconds")
        if host_mode:
            _run_host(namespaces, upstream, secret_file, listener_files, network_id, router_id, caller_ip, as_json,
                      unicode)  # fmt: skip
            return
        if offline_dir is not None:
            data = b.read_bundle(offline_dir)
            report = guest.analyse(facts_from_bundle(data, label=f"offline bundle {offline_dir}"))
            _emit(report, as_json, unicode)
            return
        data = live_bundle(url=url, probes=not no_probes, timeout=timeout, leases=leases, files_root=files_root)
        if collect_dir is not None:
            b.write_bundle(collect_dir, data)
            click.echo(f"meta169 doctor: wrote {len(data)} files to {collect_dir}; analyse them anywhere with "
                       f"meta169 doctor --offline {collect_dir}")  # fmt: skip
            return
        _emit(guest.analyse(facts_from_bundle(data, label="live")), as_json, unicode)


def _run_host(
    namespaces: tuple[str, ...],
    upstream: str | None,
    secret_file: Path | None,
    listener_files: tuple[Path, ...],
    network_id: str | None,
    router_id: str | None,
    caller_ip: str | None,
    as_json: bool,
    unicode: bool,
) -> None:
    from meta169.plumbing.command import run

    caller = _caller(network_id, router_id, caller_ip)
    request = HostRequest(
        namespaces=_netns(namespaces),
        upstream=upstream or "",
        secret_file=str(secret_file) if secret_file else "",
        listener_files=tuple(str(p) for p in listener_files),
        caller=caller,
    )
    collector = HostCollector(
        runner=run,
        read=b.read_text_file,
        processes=all_processes,
        send=send_upstream,
        resolve=registry_resolver(_registry_url()) if caller is not None else None,
        read_secret=_read_secret,
    )
    facts = collect_host(request, collector)
    inspected = [ns for ns in facts.namespaces if ns.exists and (ns.links is not None or ns.iptables_save)]
    missing = [ns for ns in facts.namespaces if not ns.exists]
    if facts.namespaces and not inspected and not missing:
        raise PlumbingError("could not inspect any namespace (root needed for ip netns exec): "
                            + "; ".join(e for ns in facts.namespaces for e in ns.errors[:1]))  # fmt: skip
    _emit(host.analyse(facts), as_json, unicode)
