"""``meta169 sync``: make the registry match one source (a file, libvirt, OpenStack).

``meta169 sync FILE`` is ``meta169 sync file FILE``: a first argument that names no
subcommand is a file. ``sync libvirt --watch`` and ``sync openstack --watch`` run as
services (:mod:`.run`). The options of every subcommand are keys of the ``[sync]``
section of the configuration file, except ``--dry-run`` (:data:`_DRY_RUN`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from meta169.config.schema import FlagOnly
from meta169.exits import cli_errors
from meta169.http.listen import metrics_listen_address

log = logging.getLogger("meta169.sources")


class SyncGroup(click.Group):
    """A group whose first argument, when it names no subcommand, is a file to sync."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `sync FILE` and `sync --dry-run FILE`: the first word that is no option names
        # a subcommand, or else a file.
        first = next((a for a in args if not a.startswith("-")), None)
        if first is not None and first not in self.commands:
            args = ["file", *args]
        return super().parse_args(ctx, args)


def _registry(*, create: bool) -> Any:
    """The registry the top-level group configured (``--registry``, the config file)."""
    return click.get_current_context().find_root().obj.open_registry(create=create)


def _echo_result(result: Any, *, quiet_unchanged: bool = False) -> None:
    from meta169.inventory import format_import_report, format_plan

    if result.report is None:
        click.echo(f"{result.source}:")
        click.echo(format_plan(result.plan))
        return
    if quiet_unchanged and not result.changed:
        return
    for change in result.plan.changes:
        click.echo(f"{result.source}: {change}")
    click.echo(f"{result.source}: {format_import_report(result.report)}".replace("\n", f"\n{result.source}: "))


# Not settable from the file or the environment: a `[sync] dry-run = true` (or a
# META169_SYNC_DRY_RUN in a unit's environment) forgotten there would leave a running
# watch writing nothing while it reports every sync as done and the service as
# ready: the silent misconfiguration meta169 exists to avoid. A dry run is something
# an operator asks for on the command line, one run at a time.
_DRY_RUN = click.option(
    "--dry-run",
    cls=FlagOnly,
    is_flag=True,
    why="a dry run writes nothing, and a service left in it would look healthy while the registry goes stale",
    help="List what would be added, changed and removed; write nothing. A flag only: never from the file.",
)

_METRICS_LISTEN = click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="With --watch: serve /metrics (Prometheus), /healthz and /readyz here [default: off].",
)


def _run_watch(source: str, watch: Any, longest_wait: float, metrics_listen: Any) -> None:
    """A watch as a service (:func:`meta169.sources.run.run_watch`), its syncs on stdout."""
    from meta169.sdnotify import Notifier
    from meta169.sources.run import WatchConfig, run_watch, stall_limit

    config = WatchConfig(source=source, stall=stall_limit(longest_wait), metrics_listen=metrics_listen)
    run_watch(
        watch,
        config,
        on_result=lambda result, first: _echo_result(result, quiet_unchanged=not first),
        notifier=Notifier.from_environ(),
    )


_ADOPT = click.option(
    "--adopt",
    "adopt",
    multiple=True,
    metavar="SOURCE",
    help="Take over what this source describes and SOURCE owns (e.g. inventory, after meta169 import). Repeatable.",
)


@click.group(cls=SyncGroup, invoke_without_command=False)
def sync() -> None:
    """Make the registry match a source: FILE, libvirt or openstack.

    Each instance, network and router remembers the source that owns it; a sync adds,
    changes and removes only what its own source owns, and refuses (exit 3) to take
    over an object or an IP another source owns.
    """


@sync.command("file")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_DRY_RUN
@_ADOPT
def sync_file(file: Path, dry_run: bool, adopt: tuple[str, ...]) -> None:
    """Make the registry match an inventory FILE, for source file:<absolute path>.

    Every entry of FILE is owned by that source, whatever it says; what an earlier
    sync of the same FILE added and FILE no longer lists is removed (its IPs are
    free again). Instances other sources own stay as they are.
    """
    from meta169.inventory import load_inventory
    from meta169.sources.reconcile import stamp, sync_registry

    with cli_errors():
        source = f"file:{file.resolve()}"
        desired = stamp(load_inventory(file), source)
        registry = _registry(create=not dry_run)
        try:
            _echo_result(sync_registry(registry, desired, source, dry_run=dry_run, adopt=adopt))
        finally:
            registry.close()


@sync.command("libvirt")
@click.option(
    "--uri",
    default="qemu:///system",
    show_default=True,
    metavar="URI",
    help="The libvirt connection; the registry source is libvirt:URI.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running: sync on every domain or network event, when DHCP leases change, and after reconnects.",
)
@_DRY_RUN
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    help="With --watch: seconds between DHCP lease checks (leases raise no libvirt event).",
)
@_METRICS_LISTEN
@_ADOPT
def sync_libvirt(
    uri: str, watch: bool, dry_run: bool, poll_interval: float, metrics_listen: str | None, adopt: tuple[str, ...]
) -> None:
    """Make the registry match a libvirt connection's domains and networks.

    A domain's UUID, name and MACs, its <metadata> in the
    https://meta169.dev/xmlns/instance/1 namespace (hostname, keys, user data...), and
    its IPs from that element, the network's static DHCP hosts or its DHCP leases.

    With --watch it is a service: ready (sd_notify) after its first successful sync,
    SIGHUP syncs at once, SIGTERM stops it.
    """
    from meta169.sources import libvirt as lv

    with cli_errors():
        metrics_address = metrics_listen_address(metrics_listen) if watch else None
        registry = _registry(create=not dry_run)
        try:
            if not watch:
                _echo_result(lv.sync_libvirt(registry, uri, dry_run=dry_run, adopt=adopt))
                return
            timing = lv.WatchTiming(poll=poll_interval)

            def follow(stop: Any, wake: Any, on_result: Any, on_error: Any) -> None:
                lv.watch_libvirt(
                    registry,
                    uri,
                    stop=stop,
                    wake=wake,
                    on_result=on_result,
                    on_error=on_error,
                    dry_run=dry_run,
                    timing=timing,
                    adopt=adopt,
                )

            # Connected, a full sync at least every resync; lost, a retry every reconnect.
            _run_watch(lv.source_name(uri), follow, max(timing.resync, timing.reconnect), metrics_address)
        finally:
            registry.close()


@sync.command("openstack")
@click.option("--cloud", metavar="NAME", help="A cloud of clouds.yaml [default: OS_CLOUD, else the OS_* variables].")
@click.option(
    "--all-projects/--own-project",
    default=True,
    show_default=True,
    help="Every project's servers (needs an admin role), or the credentials' project only.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running: read the cloud again every --interval seconds (Nova and Neutron announce changes only "
    "over AMQP, which meta169 does not consume).",
)
@click.option(
    "--interval",
    type=click.FloatRange(5, 3600),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="With --watch: seconds between syncs. After a failed sync (nothing is written or removed) the wait "
    "doubles, up to 300 s or the interval if longer.",
)
@_DRY_RUN
@_METRICS_LISTEN
@_ADOPT
def sync_openstack(
    cloud: str | None,
    all_projects: bool,
    watch: bool,
    interval: float,
    dry_run: bool,
    metrics_listen: str | None,
    adopt: tuple[str, ...],
) -> None:
    """Make the registry match an OpenStack cloud's networks, routers and servers.

    Reads Neutron's networks, subnets, ports and routers and Nova's servers (with
    their flavors, key pairs, user data and tags) for source openstack:<cloud>.
    User data needs an admin role (Nova shows it to admins only).

    With --watch it is a service: ready (sd_notify) after its first successful sync,
    SIGHUP syncs at once, SIGTERM stops it.
    """
    from meta169.sources import openstack as os_source

    with cli_errors():
        metrics_address = metrics_listen_address(metrics_listen) if watch else None
        registry = _registry(create=not dry_run)
        try:
            if not watch:
                _echo_result(
                    os_source.sync_openstack(registry, cloud, dry_run=dry_run, all_projects=all_projects, adopt=adopt)
                )
                return
            timing = os_source.WatchTiming(interval=interval)

            def follow(stop: Any, wake: Any, on_result: Any, on_error: Any) -> None:
                os_source.watch_openstack(
                    registry,
                    cloud,
                    stop=stop,
                    wake=wake,
                    on_result=on_result,
                    on_error=on_error,
                    dry_run=dry_run,
                    all_projects=all_projects,
                    timing=timing,
                    adopt=adopt,
                )

            # What openstacksdk will name the cloud: --cloud, OS_CLOUD, else the OS_* variables.
            name = cloud or os.environ.get("OS_CLOUD") or "envvars"
            _run_watch(os_source.source_name(name), follow, timing.longest, metrics_address)
        finally:
            registry.close()
