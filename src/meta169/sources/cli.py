"""``meta169 sync``: make the registry match one source (a file, libvirt, OpenStack).

``meta169 sync FILE`` is ``meta169 sync file FILE``: a first argument that names no
subcommand is a file.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from meta169.errors import Meta169Error
from meta169.exits import cli_errors

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
@click.option("--dry-run", is_flag=True, help="List what would be added, changed and removed; write nothing.")
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
@click.option("--dry-run", is_flag=True, help="List what would be added, changed and removed; write nothing.")
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    help="With --watch: seconds between DHCP lease checks (leases raise no libvirt event).",
)
@_ADOPT
def sync_libvirt(uri: str, watch: bool, dry_run: bool, poll_interval: float, adopt: tuple[str, ...]) -> None:
    """Make the registry match a libvirt connection's domains and networks.

    A domain's UUID, name and MACs, its <metadata> in the
    https://meta169.dev/xmlns/instance/1 namespace (hostname, keys, user data...), and
    its IPs from that element, the network's static DHCP hosts or its DHCP leases.
    """
    from meta169.sources import libvirt as lv

    if not watch:
        with cli_errors():
            registry = _registry(create=not dry_run)
            try:
                _echo_result(lv.sync_libvirt(registry, uri, dry_run=dry_run, adopt=adopt))
            finally:
                registry.close()
        return
    from meta169.sdnotify import Notifier

    notifier = Notifier.from_environ()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    ready = threading.Event()

    def first_attempt(status: str) -> None:
        # Ready after the first attempt, whatever its outcome: a libvirtd that is not up
        # yet or a conflict is reported in the status and retried, not a failed start.
        if not ready.is_set():
            ready.set()
            notifier.ready(status)
        else:
            notifier.status(status)

    def on_result(result: Any) -> None:
        _echo_result(result, quiet_unchanged=ready.is_set())
        revision = "" if result.report is None else f" at registry revision {result.report.revision}"
        first_attempt(f"{lv.source_name(uri)} in sync{revision}")

    def on_error(exc: Meta169Error) -> None:
        click.echo(f"meta169: error: {exc}", err=True)
        first_attempt(f"error: {exc}")

    with cli_errors():
        registry = _registry(create=not dry_run)
        try:
            lv.watch_libvirt(
                registry,
                uri,
                stop=stop,
                on_result=on_result,
                on_error=on_error,
                dry_run=dry_run,
                timing=lv.WatchTiming(poll=poll_interval),
                adopt=adopt,
            )
        finally:
            notifier.stopping()
            registry.close()


@sync.command("openstack")
@click.option("--cloud", metavar="NAME", help="A cloud of clouds.yaml [default: OS_CLOUD, else the OS_* variables].")
@click.option(
    "--all-projects/--own-project",
    default=True,
    show_default=True,
    help="Every project's servers (needs an admin role), or the credentials' project only.",
)
@click.option("--dry-run", is_flag=True, help="List what would be added, changed and removed; write nothing.")
@_ADOPT
def sync_openstack(cloud: str | None, all_projects: bool, dry_run: bool, adopt: tuple[str, ...]) -> None:
    """Make the registry match an OpenStack cloud's networks, routers and servers.

    Reads Neutron's networks, subnets, ports and routers and Nova's servers (with
    their flavors, key pairs, user data and tags) for source openstack:<cloud>.
    User data needs an admin role (Nova shows it to admins only).
    """
    from meta169.sources.openstack import sync_openstack as run

    with cli_errors():
        registry = _registry(create=not dry_run)
        try:
            _echo_result(run(registry, cloud, dry_run=dry_run, all_projects=all_projects, adopt=adopt))
        finally:
            registry.close()
