"""ISC dhclient as the guest-side DHCP client of labs and tests, with our own script.

Owns the client configuration (which declares and requests options 121 and
249), the argv, the run-once-then-daemon lifecycle and a parser for dhclient's
lease file. dhclient always gets our script (``-sf``), config (``-cf``), lease
(``-lf``) and pid file (``-pf``): nothing of the host's /etc or /var/lib/dhcp is
read or written, so labs and tests leave the host's own DHCP client alone. Knows
nothing of dnsmasq or of the metadata service.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from meta169.errors import CommandFailed, PlumbingError, ValidationError
from meta169.plumbing import dhcp_options, netns
from meta169.plumbing.command import stop_ours

RFC3442_OPTION = "rfc3442-classless-static-routes"
MS_ROUTES_OPTION = "ms-classless-static-routes"


def script_path() -> Path:
    """Path of the packaged ``dhclient-script``, made executable if it lost its mode bit."""
    path = Path(str(resources.files("meta169.plumbing").joinpath("dhclient-script")))
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        try:
            path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise PlumbingError(f"{path} is not executable and cannot be made so: {exc}") from exc
    return path


def render_conf(*, timeout: int = 15, request_ms_routes: bool = True) -> str:
    """dhclient.conf declaring options 121 (and 249) and requesting them.

    ISC dhclient has no built-in name for 121 or 249; declared as arrays of octets
    they reach the lease file as ``32,169,254,...`` and the script as
    ``new_rfc3442_classless_static_routes`` (Debian's /etc/dhcp/dhclient.conf
    declares 121 the same way).
    """
    if not 1 <= timeout <= 3600:
        raise ValidationError(f"dhclient timeout {timeout} outside 1..3600 s")
    requested = [
        "subnet-mask",
        "broadcast-address",
        "routers",
        "domain-name",
        "domain-name-servers",
        "domain-search",
        "host-name",
        "interface-mtu",
        RFC3442_OPTION,
    ]
    lines = [
        "# meta169: dhclient configuration (generated)",
        f"option {RFC3442_OPTION} code {dhcp_options.OPTION_CLASSLESS_STATIC_ROUTE} = array of unsigned integer 8;",
    ]
    if request_ms_routes:
        lines.append(
            f"option {MS_ROUTES_OPTION} code {dhcp_options.OPTION_MS_CLASSLESS_STATIC_ROUTE}"
            " = array of unsigned integer 8;"
        )
        requested.append(MS_ROUTES_OPTION)
    lines += [
        f"timeout {timeout};",
        "initial-interval 1;",
        "request " + ", ".join(requested) + ";",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class DhclientPaths:
    """dhclient's files for one interface, all inside ``state_dir``."""

    state_dir: Path
    interface: str

    @property
    def conf(self) -> Path:
        return self.state_dir / f"dhclient-{self.interface}.conf"

    @property
    def lease(self) -> Path:
        return self.state_dir / f"dhclient-{self.interface}.leases"

    @property
    def pid(self) -> Path:
        return self.state_dir / f"dhclient-{self.interface}.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / f"dhclient-{self.interface}.log"


def dhclient_argv(paths: DhclientPaths, *, script: Path, binary: str = "dhclient") -> list[str]:
    """``dhclient -4 -1 -v`` with our script, config, lease and pid files for one interface."""
    return [
        binary,
        "-4",
        "-1",
        "-v",
        "-sf",
        str(script),
        "-cf",
        str(paths.conf),
        "-lf",
        str(paths.lease),
        "-pf",
        str(paths.pid),
        netns.check_ifname(paths.interface),
    ]


@dataclass(frozen=True, slots=True)
class DhclientHandle:
    """A dhclient we started, holding a lease and renewing it in the foreground."""

    pid: int
    netns: str
    paths: DhclientPaths
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)


def start(
    netns_name: str,
    interface: str,
    state_dir: Path,
    *,
    timeout: int = 15,
    script: Path | None = None,
    binary: str = "dhclient",
) -> DhclientHandle:
    """Run dhclient on ``interface`` inside ``netns_name``; return once it holds a lease.

    dhclient stays our child (``-d``: no daemon), so stopping it also reaps it; with
    ``-1`` it exits non-zero when no lease comes within the configured timeout.
    Readiness is the lease file naming an address: dhclient writes it once the
    script has applied the lease (BOUND).
    """
    netns.check_name(netns_name)
    paths = DhclientPaths(state_dir, netns.check_ifname(interface))
    try:
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        paths.conf.write_text(render_conf(timeout=timeout))
        for stale in (paths.pid, paths.lease):
            stale.unlink(missing_ok=True)
    except OSError as exc:
        raise PlumbingError(f"cannot prepare dhclient files in {state_dir}: {exc}") from exc
    argv = netns.in_netns(netns_name, [*dhclient_argv(paths, script=script or script_path(), binary=binary), "-d"])
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    try:
        with open(paths.log, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    except OSError as exc:
        raise CommandFailed(argv, 127, str(exc)) from exc
    deadline = time.monotonic() + timeout + 5
    while not _has_lease(paths.lease):
        rc = proc.poll()
        if rc is not None:
            raise CommandFailed(argv, rc, paths.log.read_text(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise PlumbingError(f"dhclient on {interface} in {netns_name} got no lease in {timeout + 5}s")
        time.sleep(0.05)
    return DhclientHandle(pid=proc.pid, netns=netns_name, paths=paths, process=proc)


def _has_lease(path: Path) -> bool:
    try:
        return any(lease.fixed_address for lease in parse_leases(path.read_text()))
    except (OSError, ValidationError):
        return False  # not written yet, or caught half-written


def is_ours(pid: int, paths: DhclientPaths) -> bool:
    """True when ``pid`` is a live dhclient using our lease file."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return False
    return bool(args) and os.path.basename(args[0]).startswith("dhclient") and str(paths.lease) in args


def stop(handle: DhclientHandle, *, timeout: float = 5.0) -> None:
    """SIGTERM our dhclient (no release: the address stays); a no-op when it is gone."""
    stop_ours(handle.process, handle.pid, lambda pid: is_ours(pid, handle.paths), timeout=timeout)


# --- lease file (pure) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """One ``lease { ... }`` block of a dhclient lease file."""

    interface: str
    fixed_address: str
    options: Mapping[str, str] = field(default_factory=dict)
    statements: Mapping[str, str] = field(default_factory=dict)

    @property
    def classless_routes(self) -> tuple[dhcp_options.ClasslessRoute, ...]:
        """Option 121 as routes; () when the lease has none."""
        raw = self.options.get(RFC3442_OPTION)
        return dhcp_options.from_dhclient(raw) if raw else ()

    @property
    def ms_classless_routes(self) -> tuple[dhcp_options.ClasslessRoute, ...]:
        raw = self.options.get(MS_ROUTES_OPTION)
        return dhcp_options.from_dhclient(raw) if raw else ()


_STATEMENT_RE = re.compile(r"^(option\s+)?([A-Za-z0-9-]+)\s*(.*?)\s*;$")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def parse_leases(text: str) -> tuple[Lease, ...]:
    """Every lease in a dhclient lease file, oldest first (dhclient appends)."""
    leases: list[Lease] = []
    current: dict[str, str] | None = None
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "lease {":
            if current is not None:
                raise ValidationError(f"lease file line {number}: nested lease block")
            current, options = {}, {}
        elif line == "}":
            if current is None:
                raise ValidationError(f"lease file line {number}: '}}' outside a lease block")
            leases.append(
                Lease(
                    interface=_unquote(current.pop("interface", "")),
                    fixed_address=current.pop("fixed-address", ""),
                    options=options,
                    statements=current,
                )
            )
            current = None
        elif current is not None:
            match = _STATEMENT_RE.match(line)
            if match is None:
                raise ValidationError(f"lease file line {number}: cannot parse {line!r}")
            target = options if match.group(1) else current
            target[match.group(2)] = _unquote(match.group(3))
        # Statements outside lease blocks (default-duid ...) do not describe a lease.
    if current is not None:
        raise ValidationError("lease file ends inside a lease block")
    return tuple(leases)
