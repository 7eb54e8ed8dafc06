"""Probe results: how connect failures are classified, their evidence, and their JSON form."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest

from meta169.client.transport import classify_connect_error
from meta169.client.url import parse_url
from meta169.doctor.links import Link
from meta169.doctor.probes import ProbeResult, ipv6_endpoints, probe_connect
from meta169.errors import ClientError, ValidationError


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused"),
        (TimeoutError("timed out"), "timeout"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "unreachable"),
        (OSError(errno.EACCES, "Permission denied"), "connect"),
    ],
)
def test_doctor_probes_connect_errors_are_classified(exc: OSError, reason: str) -> None:
    assert classify_connect_error(exc) == reason


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [("refused", "refused"), ("timeout", "timeout"), ("unreachable", "unreachable"), ("connect", "error")],
)
def test_doctor_probes_tcp_probe_outcomes(reason: str, outcome: str) -> None:
    def connect(endpoint: object, timeout: float) -> socket.socket:
        raise ClientError("No route to host", reason=reason, url="http://169.254.169.254")

    result = probe_connect(parse_url("http://169.254.169.254"), 1.0, connect)
    assert (result.name, result.target, result.outcome) == ("tcp", "169.254.169.254:80", outcome)
    assert result.detail == "No route to host"


def test_doctor_probes_json_roundtrip_and_evidence() -> None:
    result = ProbeResult("openstack", "GET http://169.254.169.254/openstack", "http", 404, "404 Not Found", 0.012)
    assert ProbeResult.from_json(result.to_json()) == result
    assert result.evidence == "probe openstack GET http://169.254.169.254/openstack: HTTP 404 (404 Not Found) in 0.01s"
    timeout = ProbeResult("tcp", "169.254.169.254:80", "timeout", None, "connect timed out (after 3s)", 3.0)
    assert timeout.evidence == "probe tcp 169.254.169.254:80: timeout (connect timed out (after 3s)) after 3.00s"
    with pytest.raises(ValidationError):
        ProbeResult.from_json({"name": "tcp", "outcome": "exploded"})


def test_doctor_probes_ipv6_targets_every_up_link_with_a_link_local_address() -> None:
    links = (
        Link("lo", 1, True, "", (ipaddress.ip_interface("::1/128"),)),
        Link("eth0", 2, True, "", (ipaddress.ip_interface("fe80::1/64"),)),
        Link("eth1", 3, False, "", (ipaddress.ip_interface("fe80::2/64"),)),
        Link("eth2", 4, True, "", (ipaddress.ip_interface("10.0.0.5/24"),)),
    )
    assert [(name, ep.url("/")) for name, ep in ipv6_endpoints(links)] == [("eth0", "http://[fe80::a9fe:a9fe%25eth0]/")]
