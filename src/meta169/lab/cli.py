"""``meta169 lab``: up, status, exec, console, break, heal, doctor, down, guest build.
A thin click layer over :class:`meta169.lab.Lab`, :mod:`meta169.lab.faults` and
:mod:`meta169.lab.image`.

The lab keeps its own SQLite registry in its state directory; the global
``--registry`` option does not apply to it. Exit codes are those of
:mod:`meta169.cli` (2 for a fault or VM that does not fit, 4 for a lab failure,
such as breaking what is already broken); ``lab exec`` and ``lab doctor`` exit
with the command's code. The guest image is cached under ``--cache-dir``
(``$META169_CACHE``, else ``.cache``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from meta169.exits import cli_errors
from meta169.lab.names import DEFAULT_NAME, DEFAULT_STATE_ROOT, DEFAULT_VMS_PER_NETWORK, MAX_VMS_PER_NETWORK

if TYPE_CHECKING:
    from meta169.lab.image import GuestImage
    from meta169.lab.plan import LabConfig

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CACHE = Path(".cache")
DATASOURCE_CHOICES = ("openstack", "ec2")


def _cache_option(fn: F) -> F:
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_CACHE,
        show_default=True,
        envvar="META169_CACHE",
        help="Where the guest image is cached (one per recipe) [env META169_CACHE].",
    )(fn)


def _mirror_option(fn: F) -> F:
    return click.option(
        "--mirror",
        default=None,
        envvar="META169_DEBIAN_MIRROR",
        help="Debian mirror a guest image is built from [env META169_DEBIAN_MIRROR; default deb.debian.org].",
    )(fn)


def _lab_options(fn: F) -> F:
    fn = click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help=f"Where the lab keeps its state, registry, sockets and logs [default: {DEFAULT_STATE_ROOT}/NAME].",
    )(fn)
    fn = click.option(
        "--name",
        default=DEFAULT_NAME,
        show_default=True,
        envvar="META169_LAB",
        help="Lab name (1-12 of a-z0-9); namespaces are m169lab-NAME-... [env META169_LAB].",
    )(fn)
    return fn


def _config(name: str, state_dir: Path | None, **extra: Any) -> LabConfig:
    from meta169.lab.plan import LabConfig

    return LabConfig(name=name, state_dir=state_dir.absolute() if state_dir else None, python=sys.executable, **extra)


@click.group("lab")
def lab() -> None:
    """A two-tenant metadata lab in network namespaces (needs root).

    Tenant A is routed (router namespace, REDIRECT to the proxy on 9697), tenant B
    isolated (the DHCP namespace owns 169.254.169.254); both use 10.0.0.0/24 with
    the same VM addresses. Real dnsmasq, dhclient, meta169 serve and proxy.
    """


@lab.command("up")
@_lab_options
@click.option(
    "--vms",
    "vms_per_network",
    default=DEFAULT_VMS_PER_NETWORK,
    show_default=True,
    type=click.IntRange(1, MAX_VMS_PER_NETWORK),
    help="VMs per network.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--qemu",
    "qemu_vms",
    multiple=True,
    metavar="VM[=DATASOURCE]",
    help="Boot VM as a QEMU guest (Debian 12, cloud-init; TCG) instead of a namespace; repeatable. "
    "DATASOURCE (openstack or ec2) overrides --qemu-datasource for this VM.",
)
@click.option(
    "--qemu-datasource",
    type=click.Choice(DATASOURCE_CHOICES),
    default="openstack",
    show_default=True,
    help="What the guests' SMBIOS says they are: OpenStack Nova, or EC2 (IMDSv2 required).",
)
@_cache_option
@_mirror_option
@click.option("--dnsmasq-binary", default="dnsmasq", hidden=True)
@click.option("--dhclient-binary", default="dhclient", hidden=True)
def up(
    name: str,
    state_dir: Path | None,
    vms_per_network: int,
    as_json: bool,
    qemu_vms: tuple[str, ...],
    qemu_datasource: str,
    cache_dir: Path,
    mirror: str | None,
    dnsmasq_binary: str,
    dhclient_binary: str,
) -> None:
    """Build the lab and wait until every VM has its DHCP lease (a QEMU guest: until it has booted)."""
    from meta169.lab.lab import Lab
    from meta169.lab.plan import QemuGuest

    with cli_errors():
        guests = tuple(QemuGuest.parse(text, qemu_datasource) for text in qemu_vms)  # type: ignore[arg-type]
        image = _guest_image(cache_dir, mirror).directory if guests else None
        config = _config(
            name, state_dir, vms_per_network=vms_per_network,
            dnsmasq_binary=dnsmasq_binary, dhclient_binary=dhclient_binary, qemu=guests, guest_image=image,
        )  # fmt: skip
        if guests:
            click.echo(f"lab {name}: booting {', '.join(g.vm for g in guests)} under QEMU (TCG): minutes; "
                       f"meta169 lab console {guests[0].vm} shows the boot", err=True)  # fmt: skip
        built = Lab.up(config)
        _print_status(built.status(), as_json)
        if not as_json:
            click.echo(f"lab {name} up in {built.up_seconds:.1f}s; try: meta169 lab exec a1 -- ip route")


@lab.command("status")
@_lab_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="JSON: VMs (name, netns, uuid, hostname, ip, mac, network, tenant, mode), processes and namespaces.",
)
def status(name: str, state_dir: Path | None, as_json: bool) -> None:
    """Show the lab's VMs, processes and namespaces."""
    from meta169.lab.lab import Lab

    with cli_errors():
        _print_status(Lab.load(_config(name, state_dir)).status(), as_json)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_lab_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="A QEMU guest's command is killed after this many seconds.",
)
@click.argument("vm")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, state_dir: Path | None, timeout: float, vm: str, argv: tuple[str, ...]) -> None:
    """Run a command inside VM: meta169 lab exec a1 -- ip route.

    A namespace VM runs it with the terminal; a QEMU guest through its guest agent
    (no stdin; output printed when it ends).
    """
    from meta169.lab.lab import Lab

    if argv[:1] == ("--",):
        # Options stop at VM (no interspersed args), so click hands the "--" on.
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give a command after the VM: meta169 lab exec a1 -- ip route")
    with cli_errors():
        built = Lab.load(_config(name, state_dir))
        if built.vm(vm).kind == "qemu":
            result = built.exec(vm, argv, timeout=timeout)
        else:
            command = built.exec_argv(vm, argv)
    if built.vm(vm).kind == "qemu":
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        sys.exit(result.returncode if result.returncode >= 0 else 128 - result.returncode)
    try:
        os.execvp(command[0], command)  # noqa: S606 - argv list, no shell; the command's exit code is ours
    except OSError as exc:
        click.echo(f"meta169: error: cannot run {command[0]}: {exc}", err=True)
        sys.exit(127)


@lab.command("console")
@_lab_options
@click.argument("vm")
def console(name: str, state_dir: Path | None, vm: str) -> None:
    """Print a QEMU guest's serial console (kernel, systemd and cloud-init output) so far."""
    from meta169.lab.lab import Lab

    with cli_errors():
        text = Lab.load(_config(name, state_dir)).console(vm)
    sys.stdout.buffer.write(text)


def _fault_rows() -> list[tuple[str, str]]:
    from meta169.lab.faults import FAULTS

    where = {"vm": "one {}VM", "router": "a routed VM's router", "lab": "the whole lab (VM optional)"}
    rows = []
    for f in FAULTS:
        kind = f"{f.modes[0]} " if len(f.modes) == 1 else ""
        rows.append((f.name, f"[{where[f.scope].format(kind)}] {f.summary}."))
    return rows


class _BreakCommand(click.Command):
    # The fault table's rows in --help, without importing the lab to build the CLI.
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Faults"):
            formatter.write_dl(_fault_rows())


@lab.command("break", cls=_BreakCommand)
@_lab_options
@click.argument("fault")
@click.argument("vm", required=False)
def break_(name: str, state_dir: Path | None, fault: str, vm: str | None) -> None:
    """Break the metadata path: meta169 lab break zeroconf a1 (see Faults below).

    The fault is recorded in the lab's state; lab status shows it and lab heal undoes it.
    Breaking what is already broken is an error (exit 4).
    """
    from meta169.lab.faults import affected, describe
    from meta169.lab.faults import fault as fault_row
    from meta169.lab.lab import Lab

    with cli_errors():
        built = Lab.load(_config(name, state_dir))
        record = built.break_fault(fault, vm)
        row = fault_row(record.fault)
        vms = [v.name for v in affected(built.plan, record)]
        click.echo(f"lab {name}: broke {describe(record)} ({row.summary})")
        named = "" if name == DEFAULT_NAME else f" --name {name}"
        doctors = []
        if row.guest_finding is not None:
            doctors.append(f"meta169 lab doctor{named} {vm or vms[0]}  (expect {row.guest_finding})")
        if row.host_finding is not None:
            doctors.append(f"meta169 lab doctor{named} --host {vm or vms[0]}  (expect {row.host_finding})")
        click.echo(f"  breaks: {', '.join(vms)}; diagnose: " + "; ".join(doctors))


@lab.command("heal")
@_lab_options
@click.argument("vm", required=False)
@click.option("--all", "everything", is_flag=True, help="Heal every recorded fault.")
def heal(name: str, state_dir: Path | None, vm: str | None, everything: bool) -> None:
    """Undo what lab break did, last break first, and wait until metadata answers again.

    With VM: every fault on that VM's path (its own, its router's, the lab's).
    Without: the faults not bound to one VM (router and lab-wide). Nothing broken: a no-op.
    """
    from meta169.lab.faults import describe
    from meta169.lab.lab import Lab

    if vm is not None and everything:
        raise click.UsageError("give a VM or --all, not both")
    with cli_errors():
        built = Lab.load(_config(name, state_dir))
        healed = built.heal(vm, everything=everything)
        left = ", ".join(describe(f) for f in built.faults)
        done = ", ".join(describe(f) for f in healed) or "nothing to heal"
        click.echo(f"lab {name}: healed {done}" if healed else f"lab {name}: {done}")
        if left:
            click.echo(f"  still broken: {left} (meta169 lab heal --all)")


@lab.command("doctor")
@_lab_options
@click.argument("vm", required=False)
@click.option("--host", "host_mode", is_flag=True, help="Run the host doctor on this lab (VM: the caller to resolve).")
@click.option("--json", "as_json", is_flag=True, help="Print the doctor's report as JSON.")
def doctor(name: str, state_dir: Path | None, vm: str | None, host_mode: bool, as_json: bool) -> None:
    """Run meta169 doctor inside VM, or --host for the lab's namespaces, proxy and serve.

    The lab supplies the flags: the VM's lease and an empty --files-root (a VM shares the
    host's files); for --host, the lab's namespaces, listener file, upstream and registry.
    """
    from meta169.lab.lab import Lab

    if vm is None and not host_mode:
        raise click.UsageError("name a VM (meta169 lab doctor a1) or pass --host")
    extra = ("--json",) if as_json else ()
    with cli_errors():
        built = Lab.load(_config(name, state_dir))
        if host_mode:
            command = built.host_doctor_argv(vm, *extra)
        else:
            assert vm is not None
            if built.vm(vm).kind == "qemu":
                # The guest's own doctor on the guest's own files, copied in through its agent.
                result = built.guest_doctor(vm, *extra)
                sys.stdout.write(result.stdout)
                sys.stderr.write(result.stderr)
                sys.exit(result.returncode if result.returncode >= 0 else 128 - result.returncode)
            built.prepare_guest_root()
            command = built.doctor_argv(vm, *extra)
    try:
        os.execvp(command[0], command)  # noqa: S606 - argv list, no shell; the doctor's exit code is ours
    except OSError as exc:
        click.echo(f"meta169: error: cannot run {command[0]}: {exc}", err=True)
        sys.exit(127)


@lab.command("down")
@_lab_options
@click.option("--keep-files", is_flag=True, help="Keep logs, leases and the registry in the state directory.")
def down(name: str, state_dir: Path | None, keep_files: bool) -> None:
    """Remove every namespace, veth, rule and process of the lab (also after a crash)."""
    from meta169.lab.lab import Lab

    with cli_errors():
        report = Lab.down_named(_config(name, state_dir), keep_files=keep_files)
        click.echo(
            f"lab {name} down: {len(report.namespaces)} namespaces and {len(report.processes)} processes removed"
        )


@lab.group("guest")
def guest() -> None:
    """The Debian 12 guest image QEMU VMs boot (lab up --qemu VM)."""


@guest.command("build")
@_cache_option
@_mirror_option
@click.option("--force", is_flag=True, help="Build again even when the image is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the image's manifest as JSON.")
def guest_build(cache_dir: Path, mirror: str | None, force: bool, as_json: bool) -> None:
    """Build (or find cached) the guest image: mmdebstrap of Debian 12 with cloud-init,
    qemu-guest-agent and a kernel; needs root and Debian's archive; minutes."""
    with cli_errors():
        image = _guest_image(cache_dir, mirror, force=force)
    if as_json:
        click.echo(json.dumps({"directory": str(image.directory), **image.manifest}, indent=2))
        return
    m = image.manifest
    click.echo(f"guest image {image.directory}: {image.size_bytes() / 2**20:.0f} MiB on disk, "
               f"kernel {m.get('kernel_version', '?')}, cloud-init {m.get('packages', {}).get('cloud-init', '?')}, "
               f"built in {m.get('build_seconds', '?')}s")  # fmt: skip


def _guest_image(cache_dir: Path, mirror: str | None, *, force: bool = False) -> GuestImage:
    from meta169.lab.image import DEFAULT_MIRROR, build_image, find_image

    cache = cache_dir.absolute()
    if not force and (found := find_image(cache)) is not None:
        return found
    click.echo(f"building the guest image under {cache} (minutes; cached afterwards)", err=True)
    return build_image(cache, mirror=mirror or DEFAULT_MIRROR, force=force, log=lambda line: click.echo(line, err=True))


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"lab {status['name']}: {status['status']} (state in {status['state_dir']})")
    if status["error"]:
        click.echo(f"  error: {status['error']}")
    header = ("VM", "KIND", "TENANT", "MODE", "NETWORK", "IP", "MAC", "NETNS", "UUID")
    rows = [header] + [
        (v["name"], _kind(v), v["tenant"], v["mode"], v["network"], v["ip"], v["mac"], v["netns"], v["uuid"])
        for v in status["vms"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    procs = ", ".join(f"{p['role']} {p['pid']}{'' if p['alive'] else ' (dead)'}" for p in status["processes"])
    click.echo(f"  processes: {procs or 'none'}")
    for v in status["vms"]:
        if v.get("kind") == "qemu":
            click.echo(f"  {v['name']}: console {v['console']}, agent {v['agent_socket']}")
    faults = "; ".join(f"{f['description']} (breaks {', '.join(f['affects'])})" for f in status.get("faults", ()))
    click.echo(f"  faults: {faults or 'none'}")


def _kind(vm: dict[str, Any]) -> str:
    kind = str(vm.get("kind", "netns"))
    return f"qemu/{vm['datasource']}" if kind == "qemu" else kind
