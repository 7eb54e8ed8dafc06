"""``meta169 doctor``: why can't this VM reach 169.254.169.254? (and the host side)

Exit codes (:mod:`meta169.cli`): 0 no finding of error severity; 1 at least one
error finding; 2 usage (bad flag, a directory that is not a bundle); 4 the doctor
could not run (no route table readable, no namespace inspectable, nothing found to
check on the host).

``--host`` without namespaces, listener files or upstream discovers what to check
(:mod:`meta169.doctor.discover`); this module hands it the two sources that belong to
other packages: the config file the top-level group read (:mod:`meta169.config`) and
the labs that are up (:func:`meta169.lab.doctor_argv.up_lab_scopes`).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from meta169.client.url import DEFAULT_URL, parse_url
from meta169.doctor import bundle as b
from meta169.doctor import discover, guest, host
from meta169.doctor.discover import ConfigValues, Target
from meta169.doctor.facts import facts_from_bundle
from meta169.doctor.host_collect import (
    HostCollector,
    HostRequest,
    all_processes,
    checked_nothing,
    collect_host,
    find_targets,
    registry_resolver,
    send_upstream,
)
from meta169.doctor.model import Report
from meta169.doctor.probes import DEFAULT_TIMEOUT, run_probes
from meta169.doctor.render import render_human, render_json
from meta169.errors import ConfigError, PlumbingError, ValidationError
from meta169.exits import cli_errors
from meta169.lab.names import DEFAULT_STATE_ROOT
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
        if not role:
            out.append((name, None))
            continue
        known = next((r for r in host.ROLES if r == role), None)
        if known is None:
            raise ConfigError(f"--netns {item}: the role after '=' is one of {', '.join(host.ROLES)}")
        out.append((name, known))
    return tuple(out)


def _read_secret(path: str) -> bytes:
    from meta169.secretfile import read_secret_file

    return read_secret_file(Path(path), what="the proxy's --secret-file")


def _registry_url(discovered: str = "") -> str:
    """``--registry`` (or its variable) when given, else the one discovery found, else the default."""
    root = click.get_current_context().find_root()
    if root.params.get("registry_url"):
        return str(root.params["registry_url"])
    if discovered:
        return discovered
    obj: Any = root.obj
    return str(obj.registry_url) if obj is not None and hasattr(obj, "registry_url") else "memory://"


def _config_values() -> tuple[ConfigValues | None, tuple[str, ...], tuple[str, ...]]:
    """The config file's values for discovery, notes, and "not found" lines.

    The top-level group has read the file (``--config``, ``META169_CONFIG`` or the
    default path; :mod:`meta169.config.invocation`) and refused a broken one; without
    that group (a caller invoking this command alone) the default path is read here.
    """
    from meta169.config.file import DEFAULT_CONFIG_PATH, read_config_file
    from meta169.config.invocation import STATE_KEY, LoadedConfig

    state = click.get_current_context().find_root().meta.get(STATE_KEY)
    if isinstance(state, LoadedConfig):
        path, parsed = state.path, state.file
    else:
        path = DEFAULT_CONFIG_PATH
        parsed = read_config_file(path, what="config file") if path.exists() else None
    if parsed is None:
        return None, (), (f"no config file at {path}",)
    values, notes = discover.config_values(parsed.data, str(path))
    return values, notes, ()


def _lab_targets(state_root: Path) -> tuple[tuple[Target, ...], tuple[str, ...], tuple[str, ...]]:
    """Labs that are up under ``state_root``, notes, and "not found" lines."""
    from meta169.lab.doctor_argv import up_lab_scopes

    scopes, problems = up_lab_scopes(state_root)
    targets = tuple(
        Target(label, namespaces=tuple((ns, _role(role)) for ns, role in scope["namespaces"]),
               listener_files=tuple(scope["listener_files"]),
               upstreams=(scope["upstream"],) if scope["upstream"] else (),
               secret_file=scope["secret_file"], registry_url=scope["registry"])
        for label, scope in scopes
    )  # fmt: skip
    return targets, problems, () if targets else (f"no lab up under {state_root}",)


def _role(text: str) -> host.Role | None:
    return next((r for r in host.ROLES if r == text), None)


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
@click.option("--netns", "namespaces", multiple=True, metavar="NS[=router|=dhcp|=metadata]",
              help="--host: a namespace to check (repeatable) [default: discovered from the config file, "
              "running proxies and serves, labs that are up, and qrouter-*/qdhcp-*/ovnmeta-* namespaces].")  # fmt: skip
@click.option("--only", "only", multiple=True, metavar="GLOB",
              help="--host: check only the discovered namespaces matching GLOB (repeatable), and only the "
              "proxies, labs and config entries that serve them.")  # fmt: skip
@click.option("--state-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_ROOT,
              show_default=True, help="--host: where labs keep their state (or one lab's directory).")  # fmt: skip
@click.option("--upstream", "upstreams", multiple=True, metavar="unix:PATH|HOST:PORT",
              help="--host: where serve listens for the proxy (repeatable: the proxy's upstreams, each probed; "
              "some down is a warning, all down an error) [default: the running proxies' --upstream].")  # fmt: skip
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
    only: tuple[str, ...],
    state_root: Path,
    upstreams: tuple[str, ...],
    secret_file: Path | None,
    listener_files: tuple[Path, ...],
    network_id: str | None,
    router_id: str | None,
    caller_ip: str | None,
) -> None:
    """Find why a guest cannot reach its metadata, hop by hop, with the evidence and the fix.

    Inside a VM: routes, neighbours, DHCP leases, network settings, proxies, then live
    probes. With --host, on the network node: REDIRECT rules, isolated address, proxy,
    serve, shared secret, registry; without --netns, --proxy-listeners or --upstream it
    discovers what to check and prints where it found it. Exit 0: no error findings;
    1: error findings; 2: usage; 4: could not run (or found nothing to check).
    """
    with cli_errors():
        unicode = _unicode(force_ascii)
        if sum(bool(x) for x in (host_mode, collect_dir, offline_dir)) > 1:
            raise ConfigError("give at most one of --host, --collect DIR and --offline DIR")
        if timeout <= 0 or timeout > 60:
            raise ConfigError("--timeout must be in (0, 60] seconds")
        if host_mode:
            request = HostRequest(
                namespaces=_netns(namespaces),
                upstreams=tuple(dict.fromkeys(upstreams)),
                secret_file=str(secret_file) if secret_file else "",
                listener_files=tuple(str(p) for p in listener_files),
                caller=_caller(network_id, router_id, caller_ip),
                only=only,
            )
            _run_host(request, state_root, as_json, unicode)
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


def _run_host(request: HostRequest, state_root: Path, as_json: bool, unicode: bool) -> None:
    from meta169.plumbing.command import run

    notes: tuple[str, ...] = ()
    if not request.explicit:
        config, config_notes, no_config = _config_values()
        labs, lab_notes, no_lab = _lab_targets(state_root)
        request = replace(request, config=config, labs=labs, searched=(*no_config, *no_lab))
        notes = (*config_notes, *lab_notes)
    collector = HostCollector(runner=run, read=b.read_text_file, processes=all_processes, send=send_upstream,
                              read_secret=_read_secret)  # fmt: skip
    found = find_targets(request, collector)
    found = replace(found, notes=(*notes, *found.notes))
    if request.caller is not None:
        collector = replace(collector, resolve=registry_resolver(_registry_url(found.scope.registry_url)))
    facts = collect_host(request, collector, found)
    if checked_nothing(facts):
        left = found.scope.left_out
        shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
        looked = "; ".join((*facts.searched, *([f"--only left out {len(left)}: {shown}"] if left else [])))
        looked = looked or "the namespaces and upstream given"
        raise PlumbingError(f"doctor --host found nothing to check ({looked}); name it: --netns NS[=router|=dhcp|"
                            "=metadata], --proxy-listeners FILE or --upstream unix:PATH|HOST:PORT")  # fmt: skip
    inspected = [ns for ns in facts.namespaces if ns.exists and (ns.links is not None or ns.iptables_save)]
    missing = [ns for ns in facts.namespaces if not ns.exists]
    if facts.namespaces and not inspected and not missing:
        raise PlumbingError("could not inspect any namespace (root needed for ip netns exec): "
                            + "; ".join(e for ns in facts.namespaces for e in ns.errors[:1]))  # fmt: skip
    _emit(host.analyse(facts), as_json, unicode)
