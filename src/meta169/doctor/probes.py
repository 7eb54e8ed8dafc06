"""Live probes of the metadata service from the guest, with short timeouts, as data.

The probe results are facts like any other: the live doctor records them in the
bundle (``probes.json``) and the checks read them from there, so an offline
analysis sees exactly what the guest saw. Every network call goes through the
client (:mod:`meta169.client`); ``connect`` and ``transport`` are seams.

Order: a TCP connect to port 80 first (refused, timed out and unreachable tell
different stories); only when it succeeds ``GET /openstack``,
``GET /latest/meta-data/`` and the IMDSv2 ``PUT /latest/api/token``. With the
default endpoint, ``GET /openstack`` also goes to ``fe80::a9fe:a9fe`` on each
link that has an IPv6 link-local address.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from meta169.client.client import TOKEN_PATH, TTL_HEADER, ClientConfig, MetadataClient
from meta169.client.transport import HTTPTransport, Reply, open_connection
from meta169.client.url import IPV6_METADATA, Endpoint
from meta169.doctor.links import Link
from meta169.errors import ClientError, ValidationError

Outcome: TypeAlias = Literal["ok", "http", "refused", "timeout", "unreachable", "read-timeout", "error", "skipped"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "http", "refused", "timeout", "unreachable", "read-timeout", "error", "skipped")
DEFAULT_TIMEOUT = 3.0

# ClientError.reason -> outcome; "connect", "protocol" and "status" are plain errors.
_REASON_OUTCOME: dict[str, Outcome] = {
    "refused": "refused",
    "timeout": "timeout",
    "unreachable": "unreachable",
    "read-timeout": "read-timeout",
}

Connector: TypeAlias = Callable[[Endpoint, float], socket.socket]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe: what was asked, what came back, how long it took."""

    name: str
    target: str
    outcome: Outcome
    status: int | None = None
    detail: str = ""
    seconds: float = 0.0
    interface: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValidationError(f"probe {self.name}: unknown outcome {self.outcome!r}")

    @property
    def reached(self) -> bool:
        """Something answered at the HTTP level (any status)."""
        return self.outcome in ("ok", "http")

    @property
    def evidence(self) -> str:
        if self.outcome == "skipped":
            return f"probe {self.name} {self.target}: skipped ({self.detail})"
        if self.outcome in ("ok", "http"):
            what = f"HTTP {self.status}" if self.status is not None else "connected"
            if self.outcome == "http" and self.detail:
                what += f" ({self.detail})"
            took = f" in {self.seconds:.2f}s"
        else:
            what = f"{self.outcome} ({self.detail})" if self.detail else self.outcome
            took = f" after {self.seconds:.2f}s"
        return f"probe {self.name} {self.target}: {what}{took if self.seconds else ''}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "target": self.target, "outcome": self.outcome}
        if self.status is not None:
            out["status"] = self.status
        if self.detail:
            out["detail"] = self.detail
        out["seconds"] = round(self.seconds, 3)
        if self.interface:
            out["interface"] = self.interface
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProbeResult:
        try:
            status = data.get("status")
            return cls(
                name=str(data["name"]),
                target=str(data.get("target", "")),
                outcome=data["outcome"],
                status=int(status) if status is not None else None,
                detail=str(data.get("detail", "")),
                seconds=float(data.get("seconds", 0.0)),
                interface=str(data.get("interface", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"probe record {dict(data)!r}: {exc}") from exc


def _from_error(name: str, target: str, exc: ClientError, seconds: float, interface: str = "") -> ProbeResult:
    outcome = _REASON_OUTCOME.get(exc.reason, "error")
    detail = str(exc).removeprefix(f"{exc.url}: ") if exc.url else str(exc)
    return ProbeResult(name, target, outcome, exc.status, detail, seconds, interface)


def _from_reply(name: str, target: str, reply: Reply, seconds: float, interface: str = "") -> ProbeResult:
    outcome: Outcome = "ok" if reply.ok else "http"
    snippet = reply.body[:120].decode("utf-8", errors="replace").strip().replace("\n", " | ")
    return ProbeResult(name, target, outcome, reply.status, snippet, seconds, interface)


def probe_connect(endpoint: Endpoint, timeout: float, connect: Connector = open_connection) -> ProbeResult:
    """TCP connect to the endpoint: ok, refused, timeout, unreachable or error."""
    target = f"{endpoint.socket_host}:{endpoint.port}"
    start = time.monotonic()
    try:
        sock = connect(endpoint, timeout)
    except ClientError as exc:
        return _from_error("tcp", target, exc, time.monotonic() - start)
    sock.close()
    return ProbeResult("tcp", target, "ok", None, "", time.monotonic() - start)


def probe_http(
    name: str,
    endpoint: Endpoint,
    method: str,
    path: str,
    timeout: float,
    *,
    headers: Mapping[str, str] | None = None,
    connect: Connector = open_connection,
    interface: str = "",
) -> ProbeResult:
    """One request, no retries, no token: the raw behaviour of the service."""
    transport = HTTPTransport(endpoint, timeout, connect=connect)
    client = MetadataClient(endpoint, ClientConfig(imdsv2="off", timeout=timeout, retries=0), transport=transport)
    target = f"{method} {endpoint.url(path)}"
    start = time.monotonic()
    try:
        reply = client.request(method, path, headers or {})
    except ClientError as exc:
        return _from_error(name, target, exc, time.monotonic() - start, interface)
    return _from_reply(name, target, reply, time.monotonic() - start, interface)


def ipv6_endpoints(links: Sequence[Link]) -> tuple[tuple[str, Endpoint], ...]:
    """(interface, fe80::a9fe:a9fe%interface) for each up, non-loopback link with an fe80:: address."""
    out = []
    for link in links:
        if link.is_loopback or not link.up:
            continue
        if any(a.ip.is_link_local for a in link.ipv6):
            out.append((link.name, Endpoint(host=str(IPV6_METADATA), zone=link.name)))
    return tuple(out)


def run_probes(
    endpoint: Endpoint,
    links: Sequence[Link] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ipv6: bool = True,
    connect: Connector = open_connection,
) -> tuple[ProbeResult, ...]:
    """All probes, in order; HTTP probes are skipped when the TCP connect failed."""
    results = [probe_connect(endpoint, timeout, connect)]
    if results[0].outcome == "ok":
        results.append(probe_http("openstack", endpoint, "GET", "/openstack", timeout, connect=connect))
        results.append(probe_http("ec2", endpoint, "GET", "/latest/meta-data/", timeout, connect=connect))
        results.append(
            probe_http("imdsv2", endpoint, "PUT", TOKEN_PATH, timeout, headers={TTL_HEADER: "60"}, connect=connect)
        )
    if ipv6:
        for name, v6 in ipv6_endpoints(links):
            results.append(probe_http("ipv6", v6, "GET", "/openstack", timeout, connect=connect, interface=name))
    return tuple(results)
