"""``meta169 plumb``: apply, show and remove the network plumbing of the metadata path.

A thin layer over :mod:`meta169.plumbing`: every subcommand has ``--show`` to print
what it would apply (iptables-restore text, dnsmasq configuration) without touching
anything, which is also how an operator reviews a change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from meta169.errors import ConfigError, PlumbingError
from meta169.exits import cli_errors


@click.group()
def plumb() -> None:
    """Router rules, isolated-mode addresses and dnsmasq for the metadata path."""


@plumb.command("router")
@click.option("--netns", required=True, help="The router's namespace (Neutron: qrouter-ID).")
@click.option(
    "--iface",
    "ifaces",
    multiple=True,
    required=True,
    help="Internal (guest-facing) interface; repeatable; '+' wildcard allowed (qr-+).",
)
@click.option("--port", default=9697, show_default=True, help="Where the proxy listens behind the REDIRECT.")
@click.option("--family", type=click.Choice(["4", "6", "both"]), default="both", show_default=True)
@click.option("--remove", is_flag=True, help="Remove our chains and jumps instead.")
@click.option("--show", is_flag=True, help="Print the iptables-restore input; change nothing.")
def router(netns: str, ifaces: tuple[str, ...], port: int, family: str, remove: bool, show: bool) -> None:
    """REDIRECT 169.254.169.254:80 (and [fe80::a9fe:a9fe]:80) to the proxy; MARK, ACCEPT, DROP."""
    from meta169.plumbing import iptables

    with cli_errors():
        families: list[Literal[4, 6]] = [4, 6] if family == "both" else [4 if family == "4" else 6]
        for fam in families:
            ruleset = iptables.router_rules(list(ifaces), family=fam, proxy_port=port)
            if show:
                click.echo(f"# IPv{fam}: {'removal of ' if remove else ''}our chains, then the jumps")
                if not remove:
                    click.echo(iptables.render_restore(ruleset) + iptables.render_jumps(ruleset.jumps), nl=False)
                continue
            if remove:
                iptables.remove(netns, fam)
                click.echo(f"{netns}: removed IPv{fam} metadata rules")
            else:
                iptables.apply(netns, ruleset)
                click.echo(f"{netns}: applied IPv{fam} metadata rules ({len(ruleset.rules)} rules)")


@plumb.command("isolated")
@click.option("--netns", required=True, help="The network's DHCP namespace (Neutron: qdhcp-ID).")
@click.option("--iface", required=True, help="The DHCP port's interface.")
@click.option("--remove", is_flag=True, help="Remove the addresses instead.")
def isolated(netns: str, iface: str, remove: bool) -> None:
    """Put 169.254.169.254/32 and fe80::a9fe:a9fe/128 on the DHCP port (idempotent)."""
    from meta169.plumbing import netns as ns

    with cli_errors():
        fams: tuple[Literal[4, 6], ...] = (4, 6)
        for fam in fams:
            if remove:
                changed = ns.remove_metadata_address(netns, iface, family=fam)
            else:
                changed = ns.add_metadata_address(netns, iface, family=fam)
            what = "169.254.169.254/32" if fam == 4 else "fe80::a9fe:a9fe/128"
            verb = ("removed" if changed else "was absent") if remove else ("added" if changed else "already present")
            click.echo(f"{netns} {iface}: {what} {verb}")


@plumb.command("dnsmasq")
@click.option("--network", "network_id", required=True, help="Registry network id.")
@click.option("--iface", required=True, help="The DHCP port's interface inside --netns.")
@click.option("--netns", help="Namespace to run dnsmasq in (needed unless --show).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where the config, hosts, leases and pid file live (absolute, world-searchable).",
)
@click.option("--isolated", is_flag=True, help="No router: the metadata /32 goes via the DHCP port.")
@click.option("--dhcp-ip", "dhcp_ips", multiple=True, help="The DHCP port's IP (per subnet); repeatable.")
@click.option("--show", is_flag=True, help="Print the configuration and hosts; start nothing.")
@click.option("--reload", "reload_", is_flag=True, help="Rewrite hosts and SIGHUP the running dnsmasq.")
@click.pass_obj
def dnsmasq(
    obj: object,
    network_id: str,
    iface: str,
    netns: str | None,
    state_dir: Path,
    isolated: bool,
    dhcp_ips: tuple[str, ...],
    show: bool,
    reload_: bool,
) -> None:
    """Render (and run) dnsmasq for a network: hosts from the registry, options 121/249."""
    from meta169.cli import Ctx
    from meta169.model import parse_ip
    from meta169.plumbing import dnsmasq as dm

    assert isinstance(obj, Ctx)
    with cli_errors():
        registry = obj.open_registry()
        try:
            network = registry.get_network(network_id)
            hosts = dm.hosts_for_network(network_id, registry.list_instances())
        finally:
            registry.close()
        cfg = dm.DnsmasqConfig(
            network=network,
            interface=iface,
            state_dir=state_dir.resolve(),
            hosts=hosts,
            isolated=isolated,
            dhcp_ips=tuple(parse_ip(ip) for ip in dhcp_ips),
        )
        if show:
            click.echo(dm.render_config(cfg), nl=False)
            click.echo("# hosts file:")
            click.echo(dm.render_hosts(cfg), nl=False)
            return
        if netns is None:
            raise ConfigError("--netns is required unless --show")
        if reload_:
            handle = dm.DnsmasqHandle(pid=_read_pid(cfg.paths.pid), paths=cfg.paths, netns=netns)
            dm.reload(handle, cfg)
            click.echo(f"{netns}: dnsmasq {handle.pid} reloaded ({len(hosts)} hosts)")
            return
        handle = dm.start(cfg, netns)
        click.echo(f"{netns}: dnsmasq started, pid {handle.pid}, state in {cfg.state_dir}")


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise PlumbingError(f"no running dnsmasq recorded in {path}: {exc}") from exc
