#!/usr/bin/env python3
"""Run cloud-init 22.4.2's own OpenStack or Ec2 datasource against one metadata URL.

Usage::

    python ci_driver.py --cloudinit-path DIR --source openstack|ec2 --url http://H:P
                        [--imdsv2] [--timeout S] [--max-wait S] [--retries N]
                        [--allow-net CIDR ...] [--host-macs] [--deadline S]

DIR is the ``dist-packages`` directory printed by ``scripts/fetch-cloud-init``.
Prints one JSON object on stdout (see ``run``); cloud-init's DEBUG log goes to
stderr. Exit codes: 0 crawl succeeded and every field could be read, 1 the
datasource failed or a field raised (the JSON says which), 2 bad arguments or
cloud-init not importable, 3 the network guard refused a destination.

What is bypassed, and nothing else:
- OpenStack: ``detect_openstack`` (DMI product name / asset tag checks) is
  replaced by ``True``; the rest of ``DataSourceOpenStack.get_data`` runs as is.
- Ec2: the platform is forced through the datasource's cached ``_cloud_name``
  (``unknown`` = IMDSv1 as on any non-AWS cloud, ``aws`` with --imdsv2, which is
  the only platform on which 22.4.2 takes the token path: ``_maybe_fetch_api_token``
  and ``_get_headers`` both test ``cloud_name == "aws"``).
- ``util._DNS_REDIRECT_IP`` is preset to an empty set, so ``is_resolvable`` does
  not look up its three "must not exist" names (that would be real DNS traffic).
- OpenStack's ``MetadataReader._read_ec2_metadata`` always crawls the hard-coded
  http://169.254.169.254/latest/meta-data/ (``sources/helpers/openstack.py``
  calls ``ec2.get_instance_metadata`` without an address); the driver hands it
  --url instead, and reports that it did.

Safety: before cloud-init is imported, socket connect/connect_ex/sendto,
create_connection and the resolver functions are wrapped so that any destination
outside --allow-net (default 127.0.0.0/8 and ::1) and any name lookup other than
an IP literal or ``localhost`` ends the process at once with exit code 3. The
process exits from inside the hook, so no ``except`` in cloud-init or requests
can swallow it.
"""

from __future__ import annotations

import argparse
import base64
import copy
import faulthandler
import importlib
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_DATASOURCE_FAILED = 1
EXIT_USAGE = 2
EXIT_GUARD = 3

CLOUDINIT_VERSION = "22.4.2"
# The address cloud-init's OpenStack helper crawls no matter what metadata_urls say
# (cloudinit/sources/helpers/ec2.py get_instance_metadata default argument).
HARDCODED_EC2_ADDRESS = "http://169.254.169.254"
DEFAULT_ALLOW_NET = ("127.0.0.0/8", "::1/128")
# IMDSv2 header names (cloudinit/sources/DataSourceEc2.py AWS_TOKEN_*).
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
# Log lines cloud-init writes when it retries or waits (url_helper.readurl and
# wait_for_url, "Calling '...' failed" from wait_for_url's status callback).
RETRY_LOG_RE = re.compile(r"please wait|retry|calling '.*' failed", re.IGNORECASE)
PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------------------
# Network guard (pure policy + installation)


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings; a bare address is a host network."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the IP address written in host (scope id and brackets dropped), else None."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def destination_allowed(host: str, allowed: Sequence[IPNetwork]) -> bool:
    """True when host is an IP literal inside one of the allowed networks."""
    addr = literal_address(host)
    if addr is None:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in allowed)


def _guard_violation(what: str, allowed: Sequence[IPNetwork]) -> NoReturn:
    nets = ", ".join(str(n) for n in allowed)
    sys.stderr.write(f"ci_driver: NETWORK GUARD refused {what} (allowed: {nets}); nothing was sent. Exiting.\n")
    sys.stderr.flush()
    os._exit(EXIT_GUARD)


def install_net_guard(allowed: Sequence[IPNetwork]) -> None:
    """Make every connection or lookup outside `allowed` end the process (exit 3)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_create_connection = socket.create_connection
    real_getaddrinfo = socket.getaddrinfo
    inet = (socket.AF_INET, socket.AF_INET6)

    def check(family: int, address: Any) -> None:
        if family not in inet:
            return  # AF_UNIX and friends never leave the machine
        host = address[0] if isinstance(address, tuple) and address else address
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not isinstance(host, str) or not destination_allowed(host, allowed):
            _guard_violation(f"a connection to {address!r}", allowed)

    def connect(self: socket.socket, address: Any) -> None:
        check(self.family, address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self.family, address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        check(self.family, args[-1])
        return real_sendto(self, data, *args)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        host = str(address[0])
        if literal_address(host) is not None and not destination_allowed(host, allowed):
            _guard_violation(f"a connection to {address!r}", allowed)
        return real_create_connection(address, *args, **kwargs)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        if name is None or (isinstance(name, str) and literal_address(name) is not None):
            return real_getaddrinfo(host, port, *args, **kwargs)  # no DNS for literals
        if isinstance(name, str) and name.rstrip(".").lower() == "localhost":
            return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
        _guard_violation(f"a name lookup of {name!r}", allowed)

    def refuse_lookup(name: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _guard_violation(f"a name lookup of {name!r}", allowed)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.sendto = sendto  # type: ignore[assignment]
    socket.create_connection = create_connection
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = refuse_lookup
    socket.gethostbyname_ex = refuse_lookup
    socket.gethostbyaddr = refuse_lookup


# ---------------------------------------------------------------------------
# Observation: every HTTP attempt and every log line


@dataclass(frozen=True)
class Attempt:
    """One HTTP request that left requests.Session (retries are separate attempts)."""

    method: str
    url: str
    status: int | None
    error: str | None
    bytes: int | None
    seconds: float
    token_sent: bool
    token_ttl: str | None


class Recorder(logging.Handler):
    """Collects HTTP attempts (via requests.Session.request) and log records."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.attempts: list[Attempt] = []
        self.messages: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.messages.append((record.levelno, record.name, record.getMessage()))

    def add(self, attempt: Attempt) -> None:
        with self._lock:
            self.attempts.append(attempt)

    def hook_requests(self, requests: Any) -> None:
        session_cls = requests.Session
        real_request = session_cls.request
        recorder = self

        def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            headers = kwargs.get("headers") or {}
            start = time.monotonic()
            try:
                response = real_request(self, method, url, *args, **kwargs)
            except Exception as exc:
                recorder.add(_attempt(method, url, None, exc, start, headers, None))
                raise
            # Only a fully read body can be measured without consuming it.
            size = None if kwargs.get("stream") else len(response.content)
            recorder.add(_attempt(method, url, response.status_code, None, start, headers, size))
            return response

        session_cls.request = request

    def retry_log_lines(self) -> list[str]:
        return [msg for _, _, msg in self.messages if RETRY_LOG_RE.search(msg)]

    def warnings(self) -> list[str]:
        return [f"{name}: {msg}" for lvl, name, msg in self.messages if lvl >= logging.WARNING]


def _attempt(
    method: str,
    url: str,
    status: int | None,
    exc: BaseException | None,
    start: float,
    headers: dict[str, Any],
    size: int | None,
) -> Attempt:
    return Attempt(
        method=str(method).upper(),
        url=str(url),
        status=status,
        error=None if exc is None else f"{type(exc).__name__}: {exc}",
        bytes=size,
        seconds=round(time.monotonic() - start, 4),
        token_sent=bool(headers.get(TOKEN_HEADER)),
        token_ttl=None if headers.get(TOKEN_TTL_HEADER) is None else str(headers[TOKEN_TTL_HEADER]),
    )


def repeated_requests(attempts: Sequence[Attempt]) -> dict[str, int]:
    """Map "METHOD url" to how many times it was sent again after the first time.

    Not every repeat is a retry: DataSourceOpenStack reads /openstack twice by
    design (wait_for_metadata_service, then _find_working_version).
    """
    counts = Counter(f"{a.method} {a.url}" for a in attempts)
    return {key: n - 1 for key, n in counts.items() if n > 1}


def retried_requests(attempts: Sequence[Attempt]) -> dict[str, int]:
    """Map "METHOD url" to how many times it was sent again after it had failed.

    Failed means no HTTP answer or a status >= 400; these repeats are what the
    guest pays for in sleeps (1 s each in url_helper.readurl).
    """
    failed: set[str] = set()
    retried: Counter[str] = Counter()
    for a in attempts:
        key = f"{a.method} {a.url}"
        if key in failed:
            retried[key] += 1
        if a.status is None or a.status >= 400:
            failed.add(key)
        else:
            failed.discard(key)
    return dict(retried)


# ---------------------------------------------------------------------------
# Helpers over cloud-init data


def known_macs_from_links(network_json: Any) -> dict[str, str]:
    """Name every link that carries a MAC eth0, eth1... in document order.

    convert_net_json looks physical links up by MAC among the machine's NICs;
    outside a guest there are none, so the links themselves stand in for them.
    """
    macs: dict[str, str] = {}
    links = network_json.get("links", []) if isinstance(network_json, dict) else []
    for link in links:
        mac = link.get("ethernet_mac_address") if isinstance(link, dict) else None
        if mac and str(mac).lower() not in macs:
            macs[str(mac).lower()] = f"eth{len(macs)}"
    return macs


def decode_userdata(raw: Any) -> tuple[str | None, str | None]:
    """Return (text, base64) for user data: text when it is UTF-8, else base64."""
    if raw is None:
        return None, None
    if isinstance(raw, str):
        return raw, None
    data = bytes(raw)
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(data).decode("ascii")


def json_default(value: Any) -> Any:
    # cloud-init's own convention for bytes in instance-data.json (util.json_dumps).
    if isinstance(value, bytes | bytearray):
        return "ci-b64:" + base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


# ---------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Options:
    cloudinit_path: Path
    source: str
    url: str
    imdsv2: bool
    timeout: int
    max_wait: int | None
    retries: int
    allow_net: tuple[IPNetwork, ...]
    host_macs: bool


class CloudInit:
    """The cloud-init modules the driver uses, imported from the extracted tree.

    Typed Any: cloud-init ships no type information, and the driver patches a
    few of their attributes (documented in the module docstring).
    """

    def __init__(self, path: Path) -> None:
        sys.path.insert(0, str(path))
        mod = importlib.import_module
        self.version: Any = mod("cloudinit.version")
        self.util: Any = mod("cloudinit.util")
        self.helpers: Any = mod("cloudinit.helpers")
        self.distros: Any = mod("cloudinit.distros")
        self.url_helper: Any = mod("cloudinit.url_helper")
        self.ec2_helper: Any = mod("cloudinit.sources.helpers.ec2")
        self.openstack: Any = mod("cloudinit.sources.helpers.openstack")
        self.ds_openstack: Any = mod("cloudinit.sources.DataSourceOpenStack")
        self.ds_ec2: Any = mod("cloudinit.sources.DataSourceEc2")
        self.requests: Any = mod("requests")
        loaded_from = Path(str(self.util.__file__)).resolve()
        if not loaded_from.is_relative_to(path.resolve()):
            raise ImportError(f"cloudinit was imported from {loaded_from}, not from {path}")


def redirect_openstack_ec2_crawl(ci: CloudInit, url: str) -> list[str]:
    """Point the OpenStack helper's address-less EC2 crawl at url; return a log of it."""
    real = ci.ec2_helper.get_instance_metadata
    substituted: list[str] = []

    def get_instance_metadata(*args: Any, **kwargs: Any) -> Any:
        # Positional order: (api_version, metadata_address, ...); the OpenStack
        # reader passes neither, DataSourceEc2 always passes the address.
        if len(args) < 2 and "metadata_address" not in kwargs:
            kwargs["metadata_address"] = url
            substituted.append(url)
        return real(*args, **kwargs)

    ci.ec2_helper.get_instance_metadata = get_instance_metadata
    return substituted


def build_datasource(ci: CloudInit, opts: Options, workdir: Path) -> Any:
    paths = ci.helpers.Paths(
        {
            "cloud_dir": str(workdir / "var-lib-cloud"),
            "run_dir": str(workdir / "run-cloud-init"),
            "templates_dir": str(workdir / "templates"),
        }
    )
    distro = ci.distros.fetch("debian")("debian", {}, paths)
    ds_cls = ci.ds_openstack.DataSourceOpenStack if opts.source == "openstack" else (ci.ds_ec2.DataSourceEc2)
    ds_cfg: dict[str, Any] = {
        "metadata_urls": [opts.url],
        "timeout": opts.timeout,
        "retries": opts.retries,
    }
    if opts.max_wait is not None:
        ds_cfg["max_wait"] = opts.max_wait
    sys_cfg = {
        # DataSourceOpenStack._get_data reads datasource_list ("Oracle" in ...).
        "datasource_list": [ds_cls.dsname],
        "datasource": {ds_cls.dsname: ds_cfg},
    }
    ds = ds_cls(sys_cfg, distro, paths)
    if opts.source == "ec2":
        ds._cloud_name = "aws" if opts.imdsv2 else "unknown"
    return ds


def read_fields(fields: dict[str, Callable[[], Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, getter in fields.items():
        try:
            values[name] = getter()
        except Exception as exc:
            values[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}"
    return values, errors


def configure_logging(recorder: Recorder) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(stream)
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)


def run(opts: Options, log: Recorder) -> dict[str, Any]:
    """Crawl with the real datasource and return the JSON-ready report."""
    started = time.monotonic()
    ci = CloudInit(opts.cloudinit_path)
    # After the import: cloudinit/log.py resets the root logger when it loads.
    configure_logging(log)
    log.hook_requests(ci.requests)
    # No DNS-redirection probe (util.is_resolvable looks up three bogus names once).
    ci.util._DNS_REDIRECT_IP = set()
    substituted: list[str] = []
    if opts.source == "openstack":
        ci.ds_openstack.detect_openstack = lambda accept_oracle=False: True
        substituted = redirect_openstack_ec2_crawl(ci, opts.url)

    with tempfile.TemporaryDirectory(prefix="meta169-ci-") as tmp:
        ds = build_datasource(ci, opts, Path(tmp))
        crawl_start = time.monotonic()
        try:
            got = bool(ds.get_data())
            crawl_error = None
        except Exception as exc:
            got = False
            crawl_error = f"{type(exc).__name__}: {exc}"
        crawl_seconds = time.monotonic() - crawl_start
        report = collect(ci, ds, opts) if got else ({}, {})

    values, errors = report
    if crawl_error:
        errors["get_data"] = crawl_error
    elif not got:
        errors["get_data"] = "get_data() returned False"
    attempts = list(log.attempts)
    return {
        "ok": got and not errors,
        "source": opts.source,
        "url": opts.url,
        "imdsv2": opts.imdsv2,
        "cloudinit_version": ci.version.version_string(),
        "get_data": got,
        **values,
        "errors": errors,
        # Where DataSourceOpenStack's EC2 crawl went (None for --source ec2).
        "ec2_crawl_address": substituted[0] if substituted else None,
        "requests": [asdict(a) for a in attempts],
        "retries": {
            "count": sum(retried_requests(attempts).values()),
            "by_request": retried_requests(attempts),
            "repeated": repeated_requests(attempts),
            "log_lines": log.retry_log_lines(),
        },
        "warnings": log.warnings(),
        "crawl_seconds": round(crawl_seconds, 3),
        "elapsed_seconds": round(time.monotonic() - started, 3),
    }


def collect(ci: CloudInit, ds: Any, opts: Options) -> tuple[dict[str, Any], dict[str, str]]:
    userdata_text, userdata_b64 = decode_userdata(ds.userdata_raw)
    fields: dict[str, Callable[[], Any]] = {
        "instance_id": ds.get_instance_id,
        "local_hostname": lambda: (ds.metadata or {}).get("local-hostname"),
        "hostname": lambda: ds.get_hostname(metadata_only=True).hostname,
        "fqdn": lambda: ds.get_hostname(fqdn=True, metadata_only=True).hostname,
        "public_ssh_keys": ds.get_public_ssh_keys,
        "userdata_raw": lambda: userdata_text,
        "userdata_raw_b64": lambda: userdata_b64,
        "availability_zone": lambda: ds.availability_zone,
        "region": lambda: ds.region,
        "platform_type": lambda: ds.platform_type,
        "cloud_name": lambda: ds.cloud_name,
        "metadata": lambda: ds.metadata,
        "vendordata_present": lambda: bool(ds.vendordata_raw),
    }
    if opts.source == "openstack":
        network_json = ds.network_json if isinstance(ds.network_json, dict | list) else None
        known = None if opts.host_macs else known_macs_from_links(network_json)
        fields.update(
            {
                "vendordata2_present": lambda: bool(ds.vendordata2_raw),
                "network_json": lambda: network_json,
                "ec2_metadata": lambda: ds.ec2_metadata,
                "ec2_metadata_keys": lambda: sorted(ds.ec2_metadata or {}),
                "files": lambda: ds.files,
                "known_macs": lambda: known,
                # convert_net_json updates the services dicts in place: give it a copy.
                "network_config": lambda: ci.openstack.convert_net_json(copy.deepcopy(network_json), known_macs=known),
            }
        )
    else:
        crawled = getattr(ds, "_crawled_metadata", None) or {}
        fields.update(
            {
                "ec2_metadata_keys": lambda: sorted(ds.metadata or {}),
                "ec2_api_version": lambda: crawled.get("_metadata_api_version"),
                "identity": lambda: getattr(ds, "identity", None),
                "imds_token_obtained": lambda: bool(ds._api_token),
                "metadata_address": lambda: ds.metadata_address,
            }
        )
    return read_fields(fields)


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cloudinit-path", required=True, type=Path)
    parser.add_argument("--source", required=True, choices=("openstack", "ec2"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--imdsv2", action="store_true", help="ec2 only: force the AWS token path")
    parser.add_argument("--timeout", type=int, default=5, help="per-request timeout (ds_cfg)")
    parser.add_argument(
        "--max-wait",
        type=int,
        default=None,
        help="ds_cfg max_wait; default: OpenStack's own (-1, one try), 10 for Ec2 "
        "(Ec2 gives up at once when max_wait <= 0)",
    )
    parser.add_argument("--retries", type=int, default=5, help="ds_cfg retries (cloud-init: 5)")
    parser.add_argument("--allow-net", action="append", default=None, metavar="CIDR")
    parser.add_argument(
        "--host-macs",
        action="store_true",
        help="convert_net_json looks links up among this machine's NICs (as in a guest)",
    )
    parser.add_argument("--deadline", type=float, default=120.0, help="dump stacks and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        allowed = parse_networks(args.allow_net or DEFAULT_ALLOW_NET)
    except ValueError as exc:
        print(f"ci_driver: bad --allow-net: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.imdsv2 and args.source != "ec2":
        print("ci_driver: --imdsv2 applies to --source ec2 only", file=sys.stderr)
        return EXIT_USAGE
    # The guard goes in before cloud-init or requests is imported.
    install_net_guard(allowed)
    for var in PROXY_ENV:
        # A proxy from the caller's environment would silently change the
        # destination (requests honours these); the harness talks direct.
        os.environ.pop(var, None)
        os.environ.pop(var.upper(), None)
    faulthandler.dump_traceback_later(args.deadline, exit=True)

    max_wait = args.max_wait
    if max_wait is None and args.source == "ec2":
        max_wait = 10
    opts = Options(
        cloudinit_path=args.cloudinit_path,
        source=args.source,
        url=args.url.rstrip("/"),
        imdsv2=args.imdsv2,
        timeout=args.timeout,
        max_wait=max_wait,
        retries=args.retries,
        allow_net=allowed,
        host_macs=args.host_macs,
    )

    recorder = Recorder()
    try:
        report = run(opts, recorder)
    except ImportError as exc:
        print(
            f"ci_driver: cannot import cloud-init from {opts.cloudinit_path}: {exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    json.dump(report, sys.stdout, default=json_default, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if report["cloudinit_version"] != CLOUDINIT_VERSION:
        print(
            f"ci_driver: expected cloud-init {CLOUDINIT_VERSION}, got {report['cloudinit_version']}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return EXIT_OK if report["ok"] else EXIT_DATASOURCE_FAILED


if __name__ == "__main__":
    sys.exit(main())
