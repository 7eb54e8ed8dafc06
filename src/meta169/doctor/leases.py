"""What DHCP gave the guest: addresses, routers and option 121/249 routes, per client.

Pure. Lease formats:

- ISC dhclient (Debian, RHEL, NetworkManager's dhclient backend): ``lease { ... }``
  blocks, option 121 as ``option rfc3442-classless-static-routes 32,169,...;``
  (declared as an array of octets) or, undeclared, ``option unknown-121 20:a9:...;``
  [meta169.plumbing.dhclient].
- systemd-networkd ``/run/systemd/netif/leases/IFINDEX`` (and NetworkManager's
  internal client before 1.20, which used the same code): ``KEY=VALUE``;
  ``CLASSLESS_ROUTES=169.254.169.254/32,10.0.0.1 ...`` since systemd 246,
  ``ROUTES=`` before; private options such as 249 as ``OPTION_249=<hex>``
  [systemd src/libsystemd-network/sd-dhcp-lease.c dhcp_lease_save]. Newer
  systemd writes JSON (``Classless_Routes``); both are read.
- NetworkManager's internal client since 1.20 (n-dhcp4) stores only
  ``ADDRESS=`` [NetworkManager src/core/dhcp/nm-dhcp-nettools.c lease_save]: its
  options are in ``nmcli -f GENERAL.DEVICE,DHCP4 device show`` instead
  (``classless_static_routes = 169.254.169.254/32 10.0.0.1 ...``), which the
  collector records.
- BusyBox udhcpc (Alpine) keeps no lease file: its script gets the options as
  environment (``staticroutes='169.254.169.254/32 10.0.0.1 ...'``,
  ``msstaticroutes``); a dump of that environment (``env`` or ``set`` output) is read.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from meta169.errors import ValidationError
from meta169.plumbing import dhclient, dhcp_options
from meta169.plumbing.dhcp_options import ClasslessRoute

LeaseClient: TypeAlias = Literal["dhclient", "networkd", "networkmanager", "udhcpc"]

METADATA_V4 = dhcp_options.METADATA_V4


@dataclass(frozen=True, slots=True)
class DhcpLease:
    """One lease. ``classless`` is None when the format cannot tell whether option 121 came."""

    client: LeaseClient
    source: str
    interface: str = ""
    address: ipaddress.IPv4Address | None = None
    routers: tuple[ipaddress.IPv4Address, ...] = ()
    server: ipaddress.IPv4Address | None = None
    classless: tuple[ClasslessRoute, ...] | None = None
    ms_classless: tuple[ClasslessRoute, ...] | None = None
    evidence: tuple[str, ...] = ()

    @property
    def records_routes(self) -> bool:
        return self.classless is not None or self.ms_classless is not None

    @property
    def routes(self) -> tuple[ClasslessRoute, ...]:
        """The routes a client applies: option 121, else 249 (clients prefer 121)."""
        return self.classless or self.ms_classless or ()

    @property
    def metadata_route(self) -> ClasslessRoute | None:
        """The pushed route whose destination covers 169.254.169.254 most specifically."""
        covering = [r for r in self.routes if METADATA_V4 in r.destination and r.destination.prefixlen > 0]
        return max(covering, key=lambda r: r.destination.prefixlen, default=None)

    @property
    def has_metadata_host_route(self) -> bool:
        route = self.metadata_route
        return route is not None and route.destination.prefixlen == 32

    @property
    def default_route(self) -> ClasslessRoute | None:
        return next((r for r in self.routes if r.destination.prefixlen == 0), None)

    def describe(self) -> str:
        where = f" on {self.interface}" if self.interface else ""
        return f"{self.client} lease{where} ({self.source})"


def _v4(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text.strip().strip('"'))
    except ValueError:
        return None


def _v4_list(text: str) -> tuple[ipaddress.IPv4Address, ...]:
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        ip = _v4(part) if part else None
        if ip is not None:
            out.append(ip)
    return tuple(out)


def _hex_octets(text: str) -> bytes:
    body = text.strip().strip(";").replace(":", "").replace(" ", "")
    if len(body) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", body):
        # dhclient drops leading zeros in its colon form: "0:a9:fe" means 00:a9:fe.
        parts = text.strip().strip(";").split(":")
        try:
            return bytes(int(p, 16) for p in parts if p)
        except ValueError as exc:
            raise ValidationError(f"not hex octets: {text!r}") from exc
    return bytes.fromhex(body)


def _pairs_routes(text: str) -> tuple[ClasslessRoute, ...]:
    """``dst/len gw dst/len gw`` (udhcpc, NetworkManager) into routes."""
    parts = text.split()
    if len(parts) % 2:
        raise ValidationError(f"route list {text!r} has an odd number of fields")
    out = []
    for dest, gateway in zip(parts[::2], parts[1::2], strict=True):
        try:
            out.append(ClasslessRoute(ipaddress.IPv4Network(dest, strict=False), ipaddress.IPv4Address(gateway)))
        except ValueError as exc:
            raise ValidationError(f"bad route {dest} {gateway}: {exc}") from exc
    return tuple(out)


def _sd_routes(text: str) -> tuple[ClasslessRoute, ...]:
    """systemd's ``dst/len,gw dst/len,gw`` into routes."""
    out = []
    for item in text.split():
        dest, _, gateway = item.partition(",")
        try:
            out.append(ClasslessRoute(ipaddress.IPv4Network(dest, strict=False), ipaddress.IPv4Address(gateway)))
        except ValueError as exc:
            raise ValidationError(f"bad route {item!r}: {exc}") from exc
    return tuple(out)


# --- dhclient -------------------------------------------------------------------------------


def parse_dhclient(text: str, source: str, *, client: LeaseClient = "dhclient") -> tuple[DhcpLease, ...]:
    """Every lease block of a dhclient lease file, oldest first."""
    out = []
    for lease in dhclient.parse_leases(text):
        opts = lease.options
        evidence: list[str] = []
        classless: tuple[ClasslessRoute, ...] = ()
        ms: tuple[ClasslessRoute, ...] = ()
        for name, code in ((dhclient.RFC3442_OPTION, 121), ("unknown-121", 121),
                           (dhclient.MS_ROUTES_OPTION, 249), ("unknown-249", 249)):  # fmt: skip
            if name not in opts:
                continue
            raw = opts[name]
            routes = (
                dhcp_options.from_dhclient(raw)
                if not name.startswith("unknown")
                else dhcp_options.decode(_hex_octets(raw))
            )
            evidence.append(f"option {name} {raw};  (= {', '.join(str(r) for r in routes)})")
            if code == 121:
                classless = classless or routes
            else:
                ms = ms or routes
        if "routers" in opts:
            evidence.append(f"option routers {opts['routers']};")
        out.append(
            DhcpLease(
                client=client,
                source=source,
                interface=lease.interface,
                address=_v4(lease.fixed_address),
                routers=_v4_list(opts.get("routers", "")),
                server=_v4(opts.get("dhcp-server-identifier", "")),
                classless=classless,
                ms_classless=ms,
                evidence=tuple(evidence),
            )
        )
    return tuple(out)


# --- systemd-networkd / NetworkManager internal ------------------------------------------------


def _env_pairs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def parse_sd_lease(text: str, source: str, *, interface: str = "", client: LeaseClient = "networkd") -> DhcpLease:
    """A systemd-style lease (``KEY=VALUE``, or JSON from newer systemd)."""
    if text.lstrip().startswith("{"):
        return _parse_sd_json(text, source, interface=interface, client=client)
    env = _env_pairs(text)
    evidence: list[str] = []
    classless: tuple[ClasslessRoute, ...] | None = None
    for key in ("CLASSLESS_ROUTES", "ROUTES"):
        if key in env:
            classless = _sd_routes(env[key])
            evidence.append(f"{key}={env[key]}")
            break
    ms: tuple[ClasslessRoute, ...] | None = None
    if "OPTION_249" in env:
        ms = dhcp_options.decode(_hex_octets(env["OPTION_249"]))
        evidence.append(f"OPTION_249={env['OPTION_249']}  (= {', '.join(str(r) for r in ms)})")
    if "OPTION_121" in env and classless is None:
        classless = dhcp_options.decode(_hex_octets(env["OPTION_121"]))
        evidence.append(f"OPTION_121={env['OPTION_121']}")
    if "ROUTER" in env:
        evidence.append(f"ROUTER={env['ROUTER']}")
    only_address = set(env) <= {"ADDRESS"}
    if classless is None and not only_address:
        classless = ()  # networkd records option 121 whenever it came: absent means not sent
    return DhcpLease(
        client=client,
        source=source,
        interface=interface,
        address=_v4(env.get("ADDRESS", "")),
        routers=_v4_list(env.get("ROUTER", "")),
        server=_v4(env.get("SERVER_ADDRESS", "")),
        classless=classless,
        ms_classless=ms if ms is not None else (None if only_address else ()),
        evidence=tuple(evidence),
    )


def _json_addr(value: Any) -> str:
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) for v in value):
        return ".".join(str(v) for v in value)
    return str(value)


def _parse_sd_json(text: str, source: str, *, interface: str, client: LeaseClient) -> DhcpLease:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"{source}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValidationError(f"{source}: expected a JSON object")

    def routes(key: str) -> tuple[ClasslessRoute, ...]:
        out = []
        for item in data.get(key) or ():
            dest = item.get("DestinationString") or _json_addr(item.get("Destination"))
            gateway = item.get("GatewayString") or _json_addr(item.get("Gateway"))
            plen = int(item.get("DestinationPrefixLength", 32))
            out.append(ClasslessRoute(ipaddress.IPv4Network(f"{dest}/{plen}", strict=False),
                                      ipaddress.IPv4Address(gateway)))  # fmt: skip
        return tuple(out)

    classless = routes("Classless_Routes")
    ms: tuple[ClasslessRoute, ...] = ()
    for option in data.get("Private_Options") or ():
        if option.get("Option") == 249:
            ms = dhcp_options.decode(_hex_octets(str(option.get("Data", ""))))
    evidence = []
    if classless:
        evidence.append("Classless_Routes: " + ", ".join(str(r) for r in classless))
    routers = tuple(ipaddress.IPv4Address(_json_addr(r)) for r in data.get("Router") or ())
    server = data.get("Server_AddressString") or data.get("Server_Address")
    return DhcpLease(
        client=client,
        source=source,
        interface=interface,
        address=_v4(str(data.get("AddressString") or _json_addr(data.get("Address", "")))),
        routers=routers,
        server=_v4(_json_addr(server)) if server else None,
        classless=classless,
        ms_classless=ms,
        evidence=tuple(evidence),
    )


# --- udhcpc ---------------------------------------------------------------------------------------


def parse_udhcpc_env(text: str, source: str) -> DhcpLease:
    """A dump of the environment udhcpc gives its script (``interface``, ``ip``, ``staticroutes``)."""
    env = _env_pairs(text)
    evidence = []
    classless: tuple[ClasslessRoute, ...] = ()
    ms: tuple[ClasslessRoute, ...] = ()
    if env.get("staticroutes"):
        classless = _pairs_routes(env["staticroutes"])
        evidence.append(f"staticroutes='{env['staticroutes']}'")
    if env.get("msstaticroutes"):
        ms = _pairs_routes(env["msstaticroutes"])
        evidence.append(f"msstaticroutes='{env['msstaticroutes']}'")
    if env.get("router"):
        evidence.append(f"router='{env['router']}'")
    return DhcpLease(
        client="udhcpc",
        source=source,
        interface=env.get("interface", ""),
        address=_v4(env.get("ip", "")),
        routers=_v4_list(env.get("router", "")),
        server=_v4(env.get("serverid", "")),
        classless=classless,
        ms_classless=ms,
        evidence=tuple(evidence),
    )


# --- nmcli ------------------------------------------------------------------------------------------

_NMCLI_RE = re.compile(r"^(GENERAL\.DEVICE|DHCP4\.OPTION\[\d+\])\s*:\s*(.*)$")


def parse_nmcli_dhcp4(text: str, source: str = "nmcli -f GENERAL.DEVICE,DHCP4 device show") -> tuple[DhcpLease, ...]:
    """One lease per device block of ``nmcli -f GENERAL.DEVICE,DHCP4 device show`` (plain or -t)."""
    blocks: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        match = _NMCLI_RE.match(raw.strip())
        if match is None:
            continue
        key, value = match.group(1), match.group(2).strip()
        if key == "GENERAL.DEVICE":
            blocks.append((value, {}))
        elif blocks:
            name, _, option = value.partition("=")
            blocks[-1][1][name.strip()] = option.strip()
    out = []
    for device, opts in blocks:
        if not opts:
            continue
        evidence = []
        classless: tuple[ClasslessRoute, ...] = ()
        for name in ("classless_static_routes", "rfc3442_classless_static_routes"):
            if opts.get(name):
                classless = _pairs_routes(opts[name])
                evidence.append(f"DHCP4.OPTION {name} = {opts[name]}")
                break
        ms: tuple[ClasslessRoute, ...] = ()
        if opts.get("ms_classless_static_routes"):
            ms = _pairs_routes(opts["ms_classless_static_routes"])
            evidence.append(f"DHCP4.OPTION ms_classless_static_routes = {opts['ms_classless_static_routes']}")
        if opts.get("routers"):
            evidence.append(f"DHCP4.OPTION routers = {opts['routers']}")
        out.append(
            DhcpLease(
                client="networkmanager",
                source=source,
                interface=device,
                address=_v4(opts.get("ip_address", "")),
                routers=_v4_list(opts.get("routers", "")),
                server=_v4(opts.get("dhcp_server_identifier", "")),
                classless=classless,
                ms_classless=ms,
                evidence=tuple(evidence),
            )
        )
    return tuple(out)


# --- dispatch ------------------------------------------------------------------------------------------

LEASE_GLOBS: tuple[str, ...] = (
    "/var/lib/dhclient/*",
    "/var/lib/dhcp/*.leases",
    "/var/lib/dhcp/*.lease",
    "/var/lib/dhcp3/*.leases",
    "/var/lib/NetworkManager/*.lease",
    "/run/systemd/netif/leases/*",
    "/run/udhcpc/*",
    "/var/run/udhcpc/*",
    "/var/lib/udhcpc/*",
)


def parse_lease_file(path: str, text: str, ifnames: Mapping[int, str]) -> tuple[DhcpLease, ...]:
    """The leases in the file at guest ``path``; ``ifnames`` maps ifindex to name (networkd)."""
    name = path.rsplit("/", 1)[-1]
    if re.search(r"^\s*lease\s*\{", text, re.MULTILINE):
        client: LeaseClient = "networkmanager" if "/NetworkManager/" in path else "dhclient"
        return parse_dhclient(text, path, client=client)
    if path.startswith("/run/systemd/netif/leases/"):
        index = int(name) if name.isdigit() else 0
        return (parse_sd_lease(text, path, interface=ifnames.get(index, name)),)
    if path.startswith("/var/lib/NetworkManager/") and name.endswith(".lease"):
        # internal-<connection uuid>-<iface>.lease
        iface = name.removesuffix(".lease").rsplit("-", 1)[-1]
        return (parse_sd_lease(text, path, interface=iface, client="networkmanager"),)
    if "udhcpc" in path or re.search(r"^\s*(export\s+)?staticroutes=", text, re.MULTILINE):
        return (parse_udhcpc_env(text, path),)
    return ()
