"""The lab's topology as data: names, addresses, registry objects and daemon configs.

Pure. Everything the lab builds follows from a :class:`LabConfig` (name, state
directory, VMs per network), so ``lab status`` and ``lab down`` recompute the same
plan from the config stored in the state file. No IO here: :mod:`~meta169.lab.network`,
:mod:`~meta169.lab.seed` and :mod:`~meta169.lab.supervise` turn the plan into
namespaces, veths, rules, registry rows and processes.

Topology: two tenants whose networks both use 10.0.0.0/24, with the same VM
addresses (10.0.0.11, 10.0.0.12, ...) in both, so the metadata service must tell
two guests apart by their network (or router), not by address alone.

- tenant A, routed (``net-a``, ``router-a``): a router namespace holds the gateway
  10.0.0.1 and the REDIRECT rules of :mod:`meta169.plumbing.iptables` for IPv4 and
  IPv6; the proxy listens on 0.0.0.0:9697 and [::]:9697 there. dnsmasq at 10.0.0.2
  pushes 169.254.169.254/32 via the gateway.
- tenant B, isolated (``net-b``, no router): the DHCP namespace holds 10.0.0.2,
  169.254.169.254/32 and fe80::a9fe:a9fe/128 on its port, dnsmasq pushes the /32 via
  10.0.0.2, and the proxy listens on 169.254.169.254:80 and [fe80::a9fe:a9fe]:80.

Each network's L2 is a Linux bridge inside a "switch" namespace; every other
namespace (router, DHCP, VMs) has one veth leg into it. No leg is ever in the host
namespace. Interface names live inside the lab's namespaces only, so they cannot
clash with the host's; namespace names carry the lab's prefix ``m169lab-<name>-``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import sys
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from meta169.errors import ConfigError
from meta169.lab.names import (
    DEFAULT_NAME,
    DEFAULT_STATE_ROOT,
    DEFAULT_VMS_PER_NETWORK,
    MAX_VMS_PER_NETWORK,
    STATE_FILE,
)
from meta169.model import Instance, MetadataOptions, Network, Port, Router, SSHKey, Subnet
from meta169.plumbing import dnsmasq, iptables
from meta169.plumbing.dhclient import DhclientPaths

Mode: TypeAlias = Literal["router", "isolated"]
# A VM is a bare namespace running dhclient, or a QEMU guest booting Debian 12 with
# cloud-init (meta169.lab.qemu); a guest's SMBIOS points its ds-identify at OpenStack or EC2.
Kind: TypeAlias = Literal["netns", "qemu"]
Datasource: TypeAlias = Literal["openstack", "ec2"]
DATASOURCES: tuple[Datasource, ...] = ("openstack", "ec2")

NETNS_PREFIX = "m169lab-"
PROXY_PORT = iptables.DEFAULT_PROXY_PORT

SUBNET = ipaddress.IPv4Network("10.0.0.0/24")
GATEWAY_IP = ipaddress.IPv4Address("10.0.0.1")
DHCP_IP = ipaddress.IPv4Address("10.0.0.2")
FIRST_VM_HOST = 11  # a1 and b1 are 10.0.0.11, a2 and b2 10.0.0.12, ...
METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
METADATA_V6 = ipaddress.IPv6Address("fe80::a9fe:a9fe")

# Interface names, each inside one lab namespace (IFNAMSIZ: at most 15 characters).
VM_IFACE = "eth0"
BRIDGE = "m169br"
ROUTER_IFACE = "m169qr"  # neutron's router legs are qr-...
DHCP_IFACE = "m169tap"  # neutron's DHCP ports are tap...
SWITCH_PORT_PREFIX = "m169p-"

_NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
# Nova's MAC prefix (fa:16:3e); the fourth octet tells the tenants apart.
_MAC_PREFIX = "fa:16:3e"


@dataclass(frozen=True, slots=True)
class QemuGuest:
    """``lab up --qemu VM[=DATASOURCE]``: VM ``vm`` boots as a QEMU guest that cloud-init's
    ds-identify sees as an OpenStack Nova or an EC2 instance."""

    vm: str
    datasource: Datasource = "openstack"

    def __post_init__(self) -> None:
        if self.datasource not in DATASOURCES:
            raise ConfigError(f"QEMU guest {self.vm}: datasource must be one of {', '.join(DATASOURCES)}")

    @classmethod
    def parse(cls, text: str, default: Datasource = "openstack") -> QemuGuest:
        """``a1`` or ``b1=ec2``."""
        vm, _, datasource = text.partition("=")
        return cls(vm, datasource or default)  # type: ignore[arg-type]  # checked in __post_init__


@dataclass(frozen=True, slots=True)
class LabConfig:
    """What a lab is made of; the one config object of ``meta169 lab``.

    ``state_dir`` holds the state file, the registry, sockets, pid files and logs;
    it and its parents must be searchable by others (dnsmasq re-reads its hosts
    file after dropping root). The binaries are seams for tests that inject a
    failure; ``python`` runs ``meta169 serve`` and ``meta169 proxy``. ``qemu`` names the
    VMs that boot as QEMU guests from the image in ``guest_image`` (a directory of
    :mod:`meta169.lab.image`).
    """

    name: str = DEFAULT_NAME
    state_dir: Path | None = None
    vms_per_network: int = DEFAULT_VMS_PER_NETWORK
    dnsmasq_binary: str = "dnsmasq"
    dhclient_binary: str = "dhclient"
    python: str = field(default_factory=lambda: sys.executable)
    ready_timeout: float = 20.0
    qemu: tuple[QemuGuest, ...] = ()
    guest_image: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"lab name {self.name!r} must be 1-12 of [a-z0-9]")
        if not 1 <= self.vms_per_network <= MAX_VMS_PER_NETWORK:
            raise ConfigError(f"VMs per network must be 1..{MAX_VMS_PER_NETWORK}, not {self.vms_per_network}")
        if self.state_dir is None:
            object.__setattr__(self, "state_dir", DEFAULT_STATE_ROOT / self.name)
        elif not self.state_dir.is_absolute():
            raise ConfigError(f"lab state directory {self.state_dir} must be absolute")
        if self.ready_timeout <= 0:
            raise ConfigError("ready_timeout must be positive")
        names = [g.vm for g in self.qemu]
        if len(set(names)) != len(names):
            raise ConfigError(f"a VM is named twice among the QEMU guests: {', '.join(names)}")
        if self.qemu and self.guest_image is None:
            raise ConfigError("QEMU guests need a guest image (meta169 lab guest build)")

    @property
    def directory(self) -> Path:
        assert self.state_dir is not None  # set in __post_init__
        return self.state_dir

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state_dir": str(self.directory),
            "vms_per_network": self.vms_per_network,
            "dnsmasq_binary": self.dnsmasq_binary,
            "dhclient_binary": self.dhclient_binary,
            "python": self.python,
            "ready_timeout": self.ready_timeout,
            "qemu": [[g.vm, g.datasource] for g in self.qemu],
            "guest_image": None if self.guest_image is None else str(self.guest_image),
        }

    @classmethod
    def from_json(cls, data: Any) -> LabConfig:
        if not isinstance(data, dict):
            raise ConfigError("lab config in the state file is not an object")
        try:
            return cls(
                name=str(data["name"]),
                state_dir=Path(str(data["state_dir"])),
                vms_per_network=int(data["vms_per_network"]),
                dnsmasq_binary=str(data.get("dnsmasq_binary", "dnsmasq")),
                dhclient_binary=str(data.get("dhclient_binary", "dhclient")),
                python=str(data.get("python") or sys.executable),
                ready_timeout=float(data.get("ready_timeout", 20.0)),
                qemu=tuple(QemuGuest(str(vm), str(ds)) for vm, ds in data.get("qemu", ())),  # type: ignore[arg-type]
                guest_image=None if data.get("guest_image") is None else Path(str(data["guest_image"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"lab config in the state file is incomplete: {exc}") from exc


def netns_prefix(name: str) -> str:
    """Prefix of every namespace of lab ``name``; ``lab down`` sweeps by it."""
    return f"{NETNS_PREFIX}{name}-"


def eui64_link_local(mac: str) -> ipaddress.IPv6Address:
    """The fe80:: address the kernel derives from ``mac`` (RFC 4291 appendix A, EUI-64).

    Guests talk to fe80::a9fe:a9fe from this address, so the registry knows it as
    one of the port's IPs and ``serve`` identifies IPv6 callers by it.
    """
    octets = bytes(int(part, 16) for part in mac.split(":"))
    iid = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def lab_ssh_key(instance_uuid: str, comment: str) -> str:
    """A well-formed, deterministic ssh-ed25519 public key line (never a usable key pair).

    The blob is the OpenSSH wire format (RFC 8709 section 4): string "ssh-ed25519",
    string <32 bytes>; the 32 bytes are a hash of the uuid, so each VM's key differs.
    """
    kind = b"ssh-ed25519"
    key = hashlib.sha256(f"meta169-lab-key:{instance_uuid}".encode()).digest()
    blob = len(kind).to_bytes(4, "big") + kind + len(key).to_bytes(4, "big") + key
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


# Where the lab's user-data script leaves its mark in a guest that runs it (a QEMU
# guest's cloud-init runs runcmd in its final stage; a namespace VM runs none).
USER_DATA_MARK = "/var/lib/meta169-lab/user-data-ran"


def user_data_mark(lab: str, vm: str) -> str:
    """The line the user-data script of ``vm`` writes to :data:`USER_DATA_MARK`."""
    return f"meta169 lab {lab} vm {vm} user-data ran"


def lab_user_data(lab: str, vm: str) -> bytes:
    script = f'mkdir -p {USER_DATA_MARK.rsplit("/", 1)[0]} && echo "{user_data_mark(lab, vm)}" > {USER_DATA_MARK}'
    return f"#cloud-config\n# meta169 lab {lab}, vm {vm}\nhostname: {vm}\nruncmd:\n  - [sh, -c, '{script}']\n".encode()


@dataclass(frozen=True, slots=True)
class VMPlan:
    """One guest: a namespace with ``eth0`` on its tenant's bridge, running dhclient."""

    name: str
    netns: str
    tenant: str
    network_id: str
    project_id: str
    mode: Mode
    ip: ipaddress.IPv4Address
    mac: str
    uuid: str
    switch_port: str
    kind: Kind = "netns"
    datasource: Datasource | None = None

    @property
    def hostname(self) -> str:
        return self.name

    @property
    def link_local(self) -> ipaddress.IPv6Address:
        return eui64_link_local(self.mac)

    @property
    def iface(self) -> str:
        return VM_IFACE


@dataclass(frozen=True, slots=True)
class TenantPlan:
    """One tenant: its network, its switch, DHCP and (routed) router namespaces, its VMs."""

    key: str
    mode: Mode
    network: Network
    router_id: str | None
    switch_ns: str
    dhcp_ns: str
    router_ns: str | None
    vms: tuple[VMPlan, ...]

    @property
    def project_id(self) -> str:
        return self.network.project_id

    @property
    def namespaces(self) -> tuple[str, ...]:
        infra = (self.switch_ns, self.dhcp_ns) + ((self.router_ns,) if self.router_ns else ())
        return infra + tuple(vm.netns for vm in self.vms)

    @property
    def metadata_ns(self) -> str:
        """Where this tenant's proxy listeners live: the router's or the DHCP namespace."""
        return self.router_ns if self.router_ns is not None else self.dhcp_ns


@dataclass(frozen=True, slots=True)
class LabPaths:
    """Files of one lab, all inside its state directory."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def registry_url(self) -> str:
        return f"sqlite://{self.registry}"

    @property
    def serve_socket(self) -> Path:
        return self.root / "serve.sock"

    @property
    def listeners(self) -> Path:
        return self.root / "listeners.json"

    @property
    def identity_dir(self) -> Path:
        """The lab's identity signing key and certificate (``meta169 identity init`` layout)."""
        return self.root / "identity"

    def secret(self, role: str) -> Path:
        """The shared-secret file ``role`` (serve or proxy) reads while the lab runs on TCP."""
        return self.root / f"{role}.secret"

    @property
    def guest_root(self) -> Path:
        """An empty directory: the guest doctor's ``--files-root`` (a VM shares the host's files)."""
        return self.root / "guest-root"

    def pid_file(self, role: str) -> Path:
        return self.root / f"{role}.pid"

    def log(self, role: str) -> Path:
        return self.root / f"{role}.log"

    def dnsmasq_dir(self, tenant: str) -> Path:
        return self.root / f"dnsmasq-{tenant}"

    def vm_dir(self, vm: str) -> Path:
        return self.root / f"vm-{vm}"

    def dhclient(self, vm: str) -> DhclientPaths:
        return DhclientPaths(self.vm_dir(vm), VM_IFACE)

    def qemu_pid_file(self, vm: str) -> Path:
        """QEMU's own pid file for guest ``vm``; as its argument, the marker of the process."""
        return self.vm_dir(vm) / "qemu.pid"


@dataclass(frozen=True, slots=True)
class LabPlan:
    """Everything one lab is: its config, tenants, VMs and files."""

    config: LabConfig
    tenants: tuple[TenantPlan, ...]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def prefix(self) -> str:
        return netns_prefix(self.config.name)

    @property
    def paths(self) -> LabPaths:
        return LabPaths(self.config.directory)

    @property
    def vms(self) -> tuple[VMPlan, ...]:
        return tuple(vm for t in self.tenants for vm in t.vms)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(ns for t in self.tenants for ns in t.namespaces)

    @property
    def qemu_vms(self) -> tuple[VMPlan, ...]:
        return tuple(vm for vm in self.vms if vm.kind == "qemu")

    def vm(self, name: str) -> VMPlan:
        for vm in self.vms:
            if vm.name == name:
                return vm
        known = ", ".join(v.name for v in self.vms)
        raise ConfigError(f"lab {self.name} has no VM {name!r} (it has {known})")

    def tenant(self, key: str) -> TenantPlan:
        for tenant in self.tenants:
            if tenant.key == key:
                return tenant
        raise ConfigError(f"lab {self.name} has no tenant {key!r}")

    def tenant_of(self, vm: VMPlan) -> TenantPlan:
        return self.tenant(vm.tenant)


def lab_mac(tenant: str, host: int) -> str:
    """The fixed MAC of host number ``host`` (the last octet of its IPv4 address) in ``tenant``."""
    return f"{_MAC_PREFIX}:0{tenant}:00:{host:02x}"


def _vm(config: LabConfig, tenant: str, index: int, network: Network, mode: Mode) -> VMPlan:
    name = f"{tenant}{index}"
    host = FIRST_VM_HOST + index - 1
    guest = next((g for g in config.qemu if g.vm == name), None)
    uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"meta169-lab:{config.name}:{name}"))
    if guest is not None and guest.datasource == "ec2":
        # cloud-init identifies AWS by an SMBIOS uuid and serial that both start with
        # "ec2" (ds-identify ec2_identify_platform, DataSourceEc2.identify_aws).
        uuid = "ec2" + uuid[3:]
    return VMPlan(
        name=name,
        netns=f"{netns_prefix(config.name)}{name}",
        tenant=tenant,
        network_id=network.id,
        project_id=network.project_id,
        mode=mode,
        ip=SUBNET.network_address + host,
        mac=lab_mac(tenant, host),
        uuid=uuid,
        switch_port=f"{SWITCH_PORT_PREFIX}{name}",
        kind="netns" if guest is None else "qemu",
        datasource=None if guest is None else guest.datasource,
    )


def plan_lab(config: LabConfig) -> LabPlan:
    """The lab ``config`` describes: tenant ``a`` routed, tenant ``b`` isolated."""
    prefix = netns_prefix(config.name)
    tenants = []
    planned: list[str] = []
    layout: tuple[tuple[str, Mode], ...] = (("a", "router"), ("b", "isolated"))
    for key, mode in layout:
        routed = mode == "router"
        network = Network(
            id=f"net-{key}",
            project_id=f"proj-{key}",
            name=f"lab {config.name} tenant {key} ({mode})",
            subnets=(Subnet(cidr=SUBNET, gateway=GATEWAY_IP if routed else None, dhcp=True),),
        )
        vms = tuple(_vm(config, key, i, network, mode) for i in range(1, config.vms_per_network + 1))
        planned.extend(vm.name for vm in vms)
        tenants.append(
            TenantPlan(
                key=key,
                mode=mode,
                network=network,
                router_id=f"router-{key}" if routed else None,
                switch_ns=f"{prefix}sw-{key}",
                dhcp_ns=f"{prefix}dhcp-{key}",
                router_ns=f"{prefix}rtr-{key}" if routed else None,
                vms=vms,
            )
        )
    unknown = [g.vm for g in config.qemu if g.vm not in planned]
    if unknown:
        raise ConfigError(f"no VM {', '.join(unknown)} to boot with QEMU (the lab has {', '.join(planned)})")
    return LabPlan(config=config, tenants=tuple(tenants))


# --- what the lab writes into the registry ---------------------------------------------


def networks(plan: LabPlan) -> tuple[Network, ...]:
    return tuple(t.network for t in plan.tenants)


def routers(plan: LabPlan) -> tuple[Router, ...]:
    return tuple(
        Router(id=t.router_id, network_ids=(t.network.id,), project_id=t.project_id)
        for t in plan.tenants
        if t.router_id is not None
    )


def instance(plan: LabPlan, vm: VMPlan) -> Instance:
    """The registry entry of ``vm``: its IPv4 address and its EUI-64 link-local one."""
    return Instance(
        uuid=vm.uuid,
        name=vm.name,
        hostname=vm.hostname,
        project_id=vm.project_id,
        metadata={"lab": plan.name, "vm": vm.name, "tenant": vm.tenant, "mode": vm.mode},
        keys=(SSHKey(name=f"lab-{vm.name}", data=lab_ssh_key(vm.uuid, f"{vm.name}@meta169-lab")),),
        user_data=lab_user_data(plan.name, vm.name),
        ports=(Port(network_id=vm.network_id, mac=vm.mac, ips=(vm.ip, vm.link_local)),),
        # An EC2 guest must take the IMDSv2 path: a token first, every request with it.
        metadata_options=MetadataOptions(http_tokens="required") if vm.datasource == "ec2" else None,
    )


def instances(plan: LabPlan) -> tuple[Instance, ...]:
    return tuple(instance(plan, vm) for vm in plan.vms)


# --- daemon configuration ----------------------------------------------------------------


def dnsmasq_config(plan: LabPlan, tenant: TenantPlan) -> dnsmasq.DnsmasqConfig:
    """dnsmasq for ``tenant``'s network on its DHCP port: one reservation per VM."""
    hosts = tuple(dnsmasq.DhcpHost(vm.mac, vm.ip, vm.hostname) for vm in tenant.vms)
    return dnsmasq.DnsmasqConfig(
        network=tenant.network,
        interface=DHCP_IFACE,
        state_dir=plan.paths.dnsmasq_dir(tenant.key),
        hosts=hosts,
        isolated=tenant.mode == "isolated",
        dhcp_ips=(DHCP_IP,),
        log_dhcp=True,
    )


def router_rulesets(tenant: TenantPlan) -> tuple[iptables.RuleSet, ...]:
    """Router mode, IPv4 and IPv6: REDIRECT port 80 of the metadata address to the proxy."""
    if tenant.router_ns is None:
        return ()
    return tuple(iptables.router_rules([ROUTER_IFACE], family=f, proxy_port=PROXY_PORT) for f in (4, 6))


def proxy_listeners(plan: LabPlan) -> tuple[dict[str, Any], ...]:
    """The listeners of the lab's one proxy, in ``meta169 proxy --listeners`` form."""
    out: list[dict[str, Any]] = []
    for tenant in plan.tenants:
        if tenant.router_id is not None:
            for address in ("0.0.0.0", "::"):
                out.append(
                    {"netns": tenant.metadata_ns, "address": address, "port": PROXY_PORT, "router": tenant.router_id}
                )
        else:
            out.append({"netns": tenant.dhcp_ns, "address": str(METADATA_V4), "port": 80, "network": tenant.network.id})
            out.append(
                {
                    "netns": tenant.dhcp_ns,
                    "address": str(METADATA_V6),
                    "interface": DHCP_IFACE,
                    "port": 80,
                    "network": tenant.network.id,
                }
            )
    return tuple(out)


def listeners_document(plan: LabPlan) -> dict[str, Any]:
    return {"listeners": list(proxy_listeners(plan))}


@dataclass(frozen=True, slots=True)
class TcpUpstream:
    """serve's second proxy listener, on loopback TCP with an HMAC secret, and the
    secret file the proxy signs with (the ``secret-mismatch`` fault gives it another)."""

    port: int
    serve_secret: Path
    proxy_secret: Path

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"TCP upstream port {self.port} is out of range")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def upstream(plan: LabPlan, tcp: TcpUpstream | None = None) -> str:
    """Where the lab's proxy sends requests: serve's Unix socket, or its TCP listener."""
    return tcp.address if tcp is not None else f"unix:{plan.paths.serve_socket}"


# The lab's serve and proxy take every setting from their command line, never from
# the machine's /etc/meta169/meta169.toml (an operator's production settings).
LAB_CONFIG = "/dev/null"


def serve_argv(plan: LabPlan, tcp: TcpUpstream | None = None) -> list[str]:
    """``meta169 serve`` on a Unix socket in the state directory, trusting the proxy's stamp
    (and, with ``tcp``, also on loopback TCP, trusting requests signed with its secret),
    signing EC2 identity documents with the lab's key."""
    paths = plan.paths
    argv = [
        plan.config.python, "-m", "meta169", "-v", "--config", LAB_CONFIG, "--registry", paths.registry_url,
        "serve", "--listen", f"unix:{paths.serve_socket}=proxy", "--identity-key-dir", str(paths.identity_dir),
    ]  # fmt: skip
    if tcp is not None:
        argv += ["--listen", f"{tcp.address}=proxy", "--proxy-secret-file", str(tcp.serve_secret)]
    return argv


def proxy_argv(plan: LabPlan, tcp: TcpUpstream | None = None) -> list[str]:
    paths = plan.paths
    argv = [
        plan.config.python, "-m", "meta169", "-v", "--config", LAB_CONFIG,
        "proxy", "--upstream", upstream(plan, tcp), "--listeners", str(paths.listeners),
    ]  # fmt: skip
    if tcp is not None:
        argv += ["--secret-file", str(tcp.proxy_secret)]
    return argv


def process_markers(plan: LabPlan) -> tuple[str, ...]:
    """Arguments only this lab's processes carry; ``lab down`` sweeps /proc for them.

    Each names a file inside this lab's state directory, so no other process,
    another lab's included, has it as a whole argument.
    """
    paths = plan.paths
    markers = [f"unix:{paths.serve_socket}=proxy", str(paths.listeners)]
    markers += [f"--conf-file={dnsmasq_config(plan, t).paths.conf}" for t in plan.tenants]
    markers += [str(paths.dhclient(vm.name).lease) for vm in plan.vms]
    markers += [str(paths.qemu_pid_file(vm.name)) for vm in plan.qemu_vms]
    return tuple(markers)
