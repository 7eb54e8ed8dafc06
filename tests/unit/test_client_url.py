"""Metadata base URLs: IPv4, IPv6 with zones (RFC 6874), ports, base paths, refusals."""

from __future__ import annotations

import pytest

from meta169.client.url import DEFAULT_URL, Endpoint, parse_url
from meta169.errors import ConfigError

CASES = [
    # text, host, port, zone, base path, Host header, socket host
    ("http://169.254.169.254", "169.254.169.254", 80, "", "", "169.254.169.254", "169.254.169.254"),
    ("http://169.254.169.254/", "169.254.169.254", 80, "", "", "169.254.169.254", "169.254.169.254"),
    ("127.0.0.1:8775", "127.0.0.1", 8775, "", "", "127.0.0.1:8775", "127.0.0.1"),
    ("http://[fe80::a9fe:a9fe%eth0]/", "fe80::a9fe:a9fe", 80, "eth0", "", "[fe80::a9fe:a9fe]", "fe80::a9fe:a9fe%eth0"),
    ("http://[fe80::a9fe:a9fe%25ens3]:8080/md/", "fe80::a9fe:a9fe", 8080, "ens3", "/md", "[fe80::a9fe:a9fe]:8080",
     "fe80::a9fe:a9fe%ens3"),
    ("http://[::1]:9000", "::1", 9000, "", "", "[::1]:9000", "::1"),
    ("http://metadata.internal", "metadata.internal", 80, "", "", "metadata.internal", "metadata.internal"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "host", "port", "zone", "base", "header", "sock"), CASES)
def test_client_url_parses(text: str, host: str, port: int, zone: str, base: str, header: str, sock: str) -> None:
    ep = parse_url(text)
    assert (ep.host, ep.port, ep.zone, ep.base_path) == (host, port, zone, base)
    assert ep.host_header == header
    assert ep.socket_host == sock


def test_client_url_zone_never_reaches_the_host_header_but_is_printed_encoded() -> None:
    ep = parse_url("http://[fe80::a9fe:a9fe%eth0]/")
    assert "%" not in ep.host_header
    assert ep.url("/openstack") == "http://[fe80::a9fe:a9fe%25eth0]/openstack"
    assert parse_url(ep.url("/")) == ep


def test_client_url_base_path_prefixes_request_targets() -> None:
    ep = parse_url("http://127.0.0.1:8775/prefix")
    assert ep.path("/latest/meta-data/") == "/prefix/latest/meta-data/"
    assert ep.path("latest") == "/prefix/latest"


def test_client_url_default_is_the_metadata_address() -> None:
    assert parse_url(DEFAULT_URL) == Endpoint(host="169.254.169.254")


@pytest.mark.parametrize(
    "text",
    ["https://169.254.169.254", "ftp://x/", "http://user:pw@169.254.169.254/", "http://169.254.169.254/?q=1",
     "http://127.0.0.1:99999/", "http://[fe80::zz]/", "http://10.0.0.1%eth0/"],
)  # fmt: skip
def test_client_url_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(text)
