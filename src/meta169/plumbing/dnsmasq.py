"""dnsmasq as a network's DHCP server: config rendering (pure), start, reload, stop.

Owns the dnsmasq configuration of one network and the lifecycle of the dnsmasq
process serving it inside a namespace. The option rules follow openstack/neutron
agent/linux/dhcp.py (``Dnsmasq._build_cmdline_callback``,
``_generate_opts_per_subnet``): static ``dhcp-range`` per subnet (only listed
hosts get leases), router, DNS, domain, MTU and the classless static routes of
:mod:`meta169.plumbing.dhcp_options` as options 121 and 249.

Isolation from the host: dnsmasq is started as ``dnsmasq --conf-file=OURS
--keep-in-foreground``; "the presence of this option stops dnsmasq from reading
the default configuration file" (dnsmasq(8), --conf-file), so /etc/dnsmasq.conf is
never read and ``conf-file=/dev/null`` inside our file would add nothing.
``no-hosts`` and ``no-resolv`` keep /etc/hosts and /etc/resolv.conf out, DNS is off
(``port=0``) unless asked for, and pid, lease and log files live in our state
directory. Processes are signalled by the PID we started, after checking that
PID's command line still names our config file.

Knows nothing of iptables or of how the namespace and its interfaces were made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from meta169.errors import CommandFailed, PlumbingError, ValidationError
from meta169.model import Instance, Network, Subnet, normalize_mac
from meta169.plumbing import dhcp_options, netns
from meta169.plumbing.command import stop_ours

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_LEASE_SECONDS = 86400  # neutron's dhcp_lease_duration default
MIN_LEASE_SECONDS = 120  # dnsmasq(8) --dhcp-range: "The minimum lease time is two minutes."
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True, slots=True)
class DhcpHost:
    """One reservation: this MAC gets this address (and host name)."""

    mac: str
    ip: IPAddress
    hostname: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        if self.hostname and not _LABEL_RE.fullmatch(self.hostname):
            raise ValidationError(f"DHCP host name {self.hostname!r} must be a single DNS label")

    def entry(self) -> str:
        """The ``dhcp-host`` value; IPv6 addresses are bracketed for dnsmasq."""
        ip = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return ",".join(p for p in (self.mac, ip, self.hostname) if p)


def hosts_for_network(network_id: str, instances: Iterable[Instance]) -> tuple[DhcpHost, ...]:
    """Reservations for every port of ``instances`` on ``network_id``.

    dnsmasq gets the first label of the instance's host name: a dotted name would be
    taken as an FQDN and checked against a ``domain`` we do not set.
    """
    hosts = []
    for inst in instances:
        label = inst.hostname.split(".", 1)[0]
        for port in inst.ports:
            if port.network_id == network_id:
                hosts += [DhcpHost(port.mac, ip, label) for ip in port.ips]
    return tuple(hosts)


@dataclass(frozen=True, slots=True)
class DnsmasqPaths:
    """The files of one dnsmasq instance, all inside ``state_dir``."""

    state_dir: Path

    @property
    def conf(self) -> Path:
        return self.state_dir / "dnsmasq.conf"

    @property
    def hosts(self) -> Path:
        return self.state_dir / "hosts"

    @property
    def leases(self) -> Path:
        return self.state_dir / "leases"

    @property
    def pid(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / "dnsmasq.log"

    @property
    def stderr(self) -> Path:
        return self.state_dir / "dnsmasq.stderr"


@dataclass(frozen=True, slots=True)
class DnsmasqConfig:
    """Everything needed to render one network's dnsmasq configuration.

    ``isolated``: no router serves the network, so the metadata route points at
    the DHCP port, whose addresses are ``dhcp_ips`` (one per IPv4 DHCP subnet).
    ``lease_seconds`` None means infinite leases.
    """

    network: Network
    interface: str
    state_dir: Path
    hosts: tuple[DhcpHost, ...] = ()
    isolated: bool = False
    dhcp_ips: tuple[IPAddress, ...] = ()
    lease_seconds: int | None = DEFAULT_LEASE_SECONDS
    domain: str | None = None
    enable_dns: bool = False
    inline_hosts: bool = False
    log_dhcp: bool = False
    user: str | None = None

    def __post_init__(self) -> None:
        netns.check_ifname(self.interface)
        if not self.state_dir.is_absolute():
            raise ValidationError(f"dnsmasq state directory {self.state_dir} must be absolute")
        if any(c in str(self.state_dir) for c in ",\n#\"'") or " " in str(self.state_dir):
            raise ValidationError(f"dnsmasq state directory {self.state_dir} has characters dnsmasq cannot take")
        if self.lease_seconds is not None and self.lease_seconds < MIN_LEASE_SECONDS:
            raise ValidationError(f"lease time {self.lease_seconds}s is below dnsmasq's minimum of 120s")
        if self.domain is not None and not _DOMAIN_RE.fullmatch(self.domain):
            raise ValidationError(f"domain {self.domain!r} is not a DNS name")
        if self.user is not None and not re.fullmatch(r"^[a-z_][a-z0-9_-]{0,31}$", self.user):
            raise ValidationError(f"user {self.user!r} is not a user name")
        for ip in self.dhcp_ips:
            if self.network.subnet_for(ip) is None:
                raise ValidationError(f"DHCP port IP {ip} is in no subnet of network {self.network.id}")
        for host in self.hosts:
            if self.network.subnet_for(host.ip) is None:
                raise ValidationError(f"host {host.mac} IP {host.ip} is in no subnet of network {self.network.id}")
        if self.isolated:
            for subnet in self.network.subnets:
                if subnet.version == 4 and subnet.dhcp:
                    self._dhcp_ip_in(subnet)  # raises when missing

    @property
    def paths(self) -> DnsmasqPaths:
        return DnsmasqPaths(self.state_dir)

    def _dhcp_ip_in(self, subnet: Subnet) -> ipaddress.IPv4Address:
        for ip in self.dhcp_ips:
            if isinstance(ip, ipaddress.IPv4Address) and ip in subnet.cidr:
                return ip
        raise ValidationError(f"isolated network {self.network.id}: no DHCP port IP in subnet {subnet.cidr}")


def subnet_tag(index: int) -> str:
    """dnsmasq tag of the network's ``index``-th subnet."""
    return f"subnet{index}"


def _serves(subnet: Subnet) -> bool:
    # SLAAC subnets get no DHCPv6 at all, neither addresses nor options
    # [neutron dhcp.py: "we don't setup anything for SLAAC"].
    return subnet.dhcp and subnet.ipv6_mode != "slaac"


def _lease(cfg: DnsmasqConfig) -> str:
    return "infinite" if cfg.lease_seconds is None else f"{cfg.lease_seconds}s"


def _addr(ip: IPAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _subnet_lines(cfg: DnsmasqConfig, index: int, subnet: Subnet) -> list[str]:
    tag = subnet_tag(index)
    opt = f"dhcp-option=tag:{tag},"
    if subnet.version == 4:
        assert isinstance(subnet.cidr, ipaddress.IPv4Network)
        lines = [f"dhcp-range=set:{tag},{subnet.cidr.network_address},static,{subnet.cidr.netmask},{_lease(cfg)}"]
        # Without a router, an option with no value stops dnsmasq from announcing
        # itself as the router (dnsmasq(8), --dhcp-option: "--dhcp-option =
        # option:router will result in no router option being sent").
        lines.append(f"{opt}option:router,{subnet.gateway}" if subnet.gateway else f"{opt}option:router")
        if subnet.dns:
            lines.append(f"{opt}option:dns-server,{','.join(str(d) for d in subnet.dns)}")
        if cfg.domain:
            lines.append(f"{opt}option:domain-name,{cfg.domain}")
            lines.append(f"{opt}option:domain-search,{cfg.domain}")
        dhcp_ip = cfg._dhcp_ip_in(subnet) if cfg.isolated else None
        routes = dhcp_options.classless_routes(subnet, isolated=cfg.isolated, dhcp_ip=dhcp_ip)
        if routes:
            value = dhcp_options.to_dnsmasq(routes)
            lines.append(f"{opt}option:classless-static-route,{value}")
            lines.append(f"{opt}{dhcp_options.OPTION_MS_CLASSLESS_STATIC_ROUTE},{value}")
        # Forced: clients rarely list option 26 in their request, and dnsmasq
        # sends only requested options otherwise (neutron forces it too).
        lines.append(f"dhcp-option-force=tag:{tag},option:mtu,{cfg.network.mtu}")
        return lines
    lines = [f"dhcp-range=set:{tag},{subnet.cidr.network_address},static,{subnet.cidr.prefixlen},{_lease(cfg)}"]
    if subnet.dns:
        lines.append(f"{opt}option6:dns-server,{','.join(_addr(d) for d in subnet.dns)}")
    if cfg.domain:
        lines.append(f"{opt}option6:domain-search,{cfg.domain}")
    return lines


def _served_hosts(cfg: DnsmasqConfig) -> list[DhcpHost]:
    hosts = []
    for host in cfg.hosts:
        subnet = cfg.network.subnet_for(host.ip)
        if subnet is not None and _serves(subnet):
            hosts.append(host)
    return hosts


def render_config(cfg: DnsmasqConfig) -> str:
    """The dnsmasq configuration file for ``cfg`` (one option per line)."""
    paths = cfg.paths
    lines = [
        f"# meta169: DHCP for network {cfg.network.id} (generated; edits are overwritten)",
        f"interface={cfg.interface}",
        "except-interface=lo",
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
    ]
    if not cfg.enable_dns:
        # dnsmasq(8) --port: "Setting this to zero completely disables DNS function".
        lines.append("port=0")
    if cfg.user:
        lines.append(f"user={cfg.user}")
    lines += [
        f"pid-file={paths.pid}",
        f"dhcp-leasefile={paths.leases}",
        f"log-facility={paths.log}",
    ]
    if cfg.log_dhcp:
        lines.append("log-dhcp")
    if cfg.inline_hosts:
        lines += [f"dhcp-host={h.entry()}" for h in _served_hosts(cfg)]
    else:
        lines.append(f"dhcp-hostsfile={paths.hosts}")
    for index, subnet in enumerate(cfg.network.subnets):
        if _serves(subnet):
            lines += _subnet_lines(cfg, index, subnet)
    return "\n".join(lines) + "\n"


def render_hosts(cfg: DnsmasqConfig) -> str:
    """The ``dhcp-hostsfile`` contents: one ``mac,ip[,name]`` per line (dnsmasq(8))."""
    return "".join(f"{h.entry()}\n" for h in _served_hosts(cfg))


def dnsmasq_argv(cfg: DnsmasqConfig, *, binary: str = "dnsmasq") -> list[str]:
    """How to run dnsmasq for ``cfg`` (to be wrapped by ``netns.in_netns``)."""
    return [binary, f"--conf-file={cfg.paths.conf}", "--keep-in-foreground"]


# --- files and processes (IO) -----------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    # Readable by dnsmasq after it drops root (it re-reads the hosts file on SIGHUP
    # as its unprivileged user), and replaced in one rename so it never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_traversable(directory: Path) -> None:
    for part in (directory, *directory.parents):
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise PlumbingError(
                f"{part} is not searchable by others (mode {stat.filemode(mode)}): dnsmasq, once it "
                f"drops root, could not re-read {directory}/hosts on reload; use a state directory "
                "whose parents are world-searchable"
            )


def write_files(cfg: DnsmasqConfig) -> DnsmasqPaths:
    """Write the config and hosts files into the state directory (created 0755)."""
    paths = cfg.paths
    try:
        paths.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        _write_atomic(paths.conf, render_config(cfg))
        if not cfg.inline_hosts:
            _write_atomic(paths.hosts, render_hosts(cfg))
    except OSError as exc:
        raise PlumbingError(f"cannot write dnsmasq files in {paths.state_dir}: {exc}") from exc
    return paths


@dataclass(frozen=True, slots=True)
class DnsmasqHandle:
    """A running dnsmasq we started: its PID, namespace and files."""

    pid: int
    netns: str
    paths: DnsmasqPaths
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_ours(pid: int, paths: DnsmasqPaths) -> bool:
    """True when ``pid`` is alive and is a dnsmasq reading our config file."""
    args = _cmdline(pid)
    return bool(args) and os.path.basename(args[0]).startswith("dnsmasq") and (f"--conf-file={paths.conf}" in args)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def start(cfg: DnsmasqConfig, netns_name: str, *, binary: str = "dnsmasq", timeout: float = 10.0) -> DnsmasqHandle:
    """Write the files and run dnsmasq inside ``netns_name``; return once its pid file names it.

    ``ip netns exec`` execs dnsmasq in place, so the PID we hold is dnsmasq's own.
    """
    netns.check_name(netns_name)
    paths = write_files(cfg)
    if cfg.user != "root":
        _check_traversable(paths.state_dir)
    paths.pid.unlink(missing_ok=True)
    argv = netns.in_netns(netns_name, dnsmasq_argv(cfg, binary=binary))
    try:
        with open(paths.stderr, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    except OSError as exc:
        raise CommandFailed(argv, 127, str(exc)) from exc
    deadline = time.monotonic() + timeout
    while _read_pid(paths.pid) != proc.pid:
        rc = proc.poll()
        if rc is not None:
            raise CommandFailed(argv, rc, _tail(paths.stderr) + _tail(paths.log))
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise PlumbingError(f"dnsmasq in {netns_name} wrote no pid file within {timeout:g}s: {_tail(paths.log)}")
        time.sleep(0.02)
    return DnsmasqHandle(pid=proc.pid, netns=netns_name, paths=paths, process=proc)


def reload(handle: DnsmasqHandle, cfg: DnsmasqConfig) -> None:
    """Rewrite the hosts file and SIGHUP our dnsmasq, which re-reads it.

    dnsmasq(8) NOTES: on SIGHUP it "re-loads ... any file given by --dhcp-hostsfile
    ... SIGHUP does NOT re-read the configuration file"; leases are kept (the lease
    change script "is called for all existing DHCP leases"). Options and ranges are
    in the configuration file, so changing them needs :func:`stop` and :func:`start`.
    """
    if cfg.inline_hosts:
        raise PlumbingError("inline dhcp-host lines live in the config file, which SIGHUP does not re-read")
    if cfg.paths != handle.paths:
        raise PlumbingError(f"config for {cfg.state_dir} does not belong to dnsmasq {handle.pid}")
    try:
        _write_atomic(handle.paths.hosts, render_hosts(cfg))
    except OSError as exc:
        raise PlumbingError(f"cannot write {handle.paths.hosts}: {exc}") from exc
    if not is_ours(handle.pid, handle.paths):
        raise PlumbingError(f"PID {handle.pid} is no longer our dnsmasq; not signalling it")
    os.kill(handle.pid, signal.SIGHUP)


def running(handle: DnsmasqHandle) -> bool:
    if handle.process is not None and handle.process.poll() is not None:
        return False
    return is_ours(handle.pid, handle.paths)


def stop(handle: DnsmasqHandle, *, timeout: float = 5.0) -> None:
    """SIGTERM our dnsmasq (SIGKILL after ``timeout``); a no-op when it is already gone."""
    stop_ours(handle.process, handle.pid, lambda pid: is_ours(pid, handle.paths), timeout=timeout)
