"""The EC2 tree: version listings, meta-data by version, user-data, dynamic/."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from meta169.model import Instance, MetadataOptions, Network, Port, SSHKey, Subnet
from meta169.render import Document, RenderOptions, Site, build_site
from meta169.render.ec2 import PRODUCERS
from meta169.render.versions import EC2_META_DATA_SINCE, EC2_VERSIONS

UUID = "6f1d0f5e-0d7e-4b55-8a0a-5d0c1c0d0001"
MAC0 = "fa:16:3e:00:00:05"
MAC1 = "fa:16:3e:00:00:06"
NET_A = Network(
    id="net-a",
    subnets=(
        Subnet(cidr=ip_network("10.0.0.0/24"), gateway=ip_address("10.0.0.1")),
        Subnet(cidr=ip_network("2001:db8::/64"), ipv6_mode="slaac"),
    ),
)
NET_B = Network(id="net-b", subnets=(Subnet(cidr=ip_network("10.1.0.0/16")),))
PORT0 = Port(network_id="net-a", mac=MAC0, ips=(ip_address("10.0.0.5"),), id="port-0")
PORT1 = Port(
    network_id="net-b",
    mac=MAC1,
    ips=(ip_address("10.1.0.7"), ip_address("10.1.0.8")),
    id="port-1",
    device_number=1,
)


def instance(**overrides: Any) -> Instance:
    fields: dict[str, Any] = {
        "uuid": UUID,
        "name": "web-1",
        "image_id": "ami-0000abcd",
        "instance_type": "m1.large",
        "availability_zone": "az1",
        "region": "r1",
        "security_groups": ("default", "web"),
        "ports": (PORT1, PORT0),
    }
    fields.update(overrides)
    return Instance(**fields)


def site(inst: Instance | None = None, **opts: Any) -> Site:
    return build_site(inst or instance(), {"net-a": NET_A, "net-b": NET_B}, RenderOptions(**opts))


def text(s: Site, path: str) -> str:
    d = s.lookup(path)
    assert d is not None, path
    return d.payload().decode()


def lines(s: Site, path: str) -> list[str]:
    d = s.lookup(path)
    assert d is not None, path
    assert d.content_type == "text/plain"
    return d.body.decode().split("\n") if d.body else []


def test_ec2_producers_cover_exactly_the_since_table() -> None:
    assert set(PRODUCERS) == set(EC2_META_DATA_SINCE)


def test_ec2_root_lists_versions_then_latest_without_openstack() -> None:
    assert lines(site(), "/") == [*EC2_VERSIONS, "latest"]
    assert lines(site(), "") == lines(site(), "/")


@pytest.mark.parametrize(
    ("version", "user_data", "expected"),
    [
        ("1.0", None, ["meta-data/"]),
        ("1.0", b"x", ["meta-data/", "user-data"]),
        ("2008-09-01", b"x", ["meta-data/", "user-data"]),
        ("2009-04-04", None, ["dynamic/", "meta-data/"]),
        ("2009-04-04", b"x", ["dynamic/", "meta-data/", "user-data"]),
        ("latest", b"x", ["dynamic/", "meta-data/", "user-data"]),
    ],
)
def test_ec2_version_listing(version: str, user_data: bytes | None, expected: list[str]) -> None:
    s = site(instance(user_data=user_data))
    assert lines(s, f"/{version}") == expected
    assert lines(s, f"/{version}/") == expected


NOVA_1_0 = ["ami-id", "ami-launch-index", "ami-manifest-path", "hostname", "instance-id",
            "local-ipv4", "public-keys/", "reservation-id", "security-groups"]  # fmt: skip
NOVA_2009 = sorted(
    [*NOVA_1_0, "local-hostname", "instance-type", "block-device-mapping/", "placement/", "instance-action"]
)
AWS_2016 = sorted([*NOVA_2009, "mac", "network/"])
AWS_2021 = sorted([*AWS_2016, "tags/"])
META_LISTING = {
    "1.0": NOVA_1_0,
    "2007-01-19": sorted([*NOVA_1_0, "local-hostname"]),
    "2007-03-01": sorted([*NOVA_1_0, "local-hostname"]),
    "2007-08-29": sorted([*NOVA_1_0, "local-hostname", "instance-type"]),
    "2007-10-10": sorted([*NOVA_1_0, "local-hostname", "instance-type"]),
    "2007-12-15": sorted([*NOVA_1_0, "local-hostname", "instance-type", "block-device-mapping/"]),
    "2008-02-01": sorted([*NOVA_1_0, "local-hostname", "instance-type", "block-device-mapping/", "placement/"]),
    "2008-09-01": NOVA_2009,
    "2009-04-04": NOVA_2009,
    "2016-09-02": AWS_2016,
    "2018-09-24": AWS_2016,
    "2021-03-23": AWS_2021,
    "latest": AWS_2021,
}


@pytest.mark.parametrize("version", list(META_LISTING))
def test_ec2_meta_data_listing_by_version(version: str) -> None:
    inst = instance(
        keys=(SSHKey("k", "ssh-ed25519 AAAA k"),),
        tags={"Name": "web"},
        metadata_options=MetadataOptions(instance_metadata_tags="enabled"),
    )
    assert lines(site(inst), f"/{version}/meta-data/") == META_LISTING[version]


def test_ec2_leaf_values() -> None:
    s = site()
    expected = {
        "ami-id": "ami-0000abcd",
        "ami-launch-index": "0",
        "ami-manifest-path": "FIXME",
        "hostname": "web-1",
        "local-hostname": "web-1",
        "instance-id": UUID,
        "instance-type": "m1.large",
        "instance-action": "none",
        "local-ipv4": "10.0.0.5",  # device 0, though listed second
        "mac": MAC0,
        "reservation-id": "r-6f1d0f5e",
        "security-groups": "default\nweb",
        "placement/availability-zone": "az1",
        "placement/region": "r1",
        "block-device-mapping/ami": "vda",
        "block-device-mapping/root": "/dev/vda",
    }
    got = {key: text(s, f"/latest/meta-data/{key}") for key in expected}
    assert got == expected


def test_ec2_placement_region_only_from_2020_08_24() -> None:
    s = site()
    assert lines(s, "/2018-09-24/meta-data/placement/") == ["availability-zone"]
    assert lines(s, "/2021-03-23/meta-data/placement/") == ["availability-zone", "region"]
    assert s.lookup("/2018-09-24/meta-data/placement/region") is None


def test_ec2_public_address_entries_are_not_served() -> None:
    s = site()
    assert s.lookup("/latest/meta-data/public-ipv4") is None
    assert s.lookup("/latest/meta-data/public-hostname") is None


def test_ec2_public_keys_list_ssh_keys_as_index_equals_name() -> None:
    keys = (
        SSHKey("first", "ssh-ed25519 AAAA first\n"),
        SSHKey("cert", "-----BEGIN CERTIFICATE-----", type="x509"),
        SSHKey("second", "ssh-rsa BBBB second"),
    )
    s = site(instance(keys=keys))
    assert lines(s, "/latest/meta-data/public-keys/") == ["0=first", "1=second"]
    assert lines(s, "/latest/meta-data/public-keys/0") == ["openssh-key"]
    assert lines(s, "/latest/meta-data/public-keys/0/") == ["openssh-key"]
    # No trailing newline: cloud-init would split such a leaf into a list.
    assert text(s, "/latest/meta-data/public-keys/0/openssh-key") == "ssh-ed25519 AAAA first"
    assert text(s, "/1.0/meta-data/public-keys/1/openssh-key") == "ssh-rsa BBBB second"
    assert s.lookup("/latest/meta-data/public-keys/2") is None


def test_ec2_public_keys_absent_without_ssh_keys() -> None:
    s = site(instance(keys=(SSHKey("cert", "-----BEGIN", type="x509"),)))
    assert "public-keys/" not in lines(s, "/latest/meta-data/")
    assert s.lookup("/latest/meta-data/public-keys") is None


def test_ec2_network_interfaces_per_port() -> None:
    port0 = Port(network_id="net-a", mac=MAC0, ips=(ip_address("10.0.0.5"), ip_address("2001:db8::5")), id="port-0")
    s = site(instance(ports=(port0, PORT1)))
    macs = "/latest/meta-data/network/interfaces/macs"
    assert lines(s, "/latest/meta-data/network") == ["interfaces/"]
    assert lines(s, macs) == [f"{MAC0}/", f"{MAC1}/"]
    assert lines(s, f"{macs}/{MAC0}/") == [
        "device-number",
        "interface-id",
        "ipv6s",
        "local-hostname",
        "local-ipv4s",
        "mac",
        "security-groups",
        "subnet-ipv4-cidr-block",
        "subnet-ipv6-cidr-blocks",
    ]
    assert text(s, f"{macs}/{MAC0}/ipv6s") == "2001:db8::5"
    assert text(s, f"{macs}/{MAC0}/subnet-ipv6-cidr-blocks") == "2001:db8::/64"
    assert text(s, f"{macs}/{MAC1}/device-number") == "1"
    assert text(s, f"{macs}/{MAC1}/interface-id") == "port-1"
    assert text(s, f"{macs}/{MAC1}/local-ipv4s") == "10.1.0.7\n10.1.0.8"
    assert text(s, f"{macs}/{MAC1}/subnet-ipv4-cidr-block") == "10.1.0.0/16"
    assert s.lookup(f"{macs}/{MAC1}/ipv6s") is None


def test_ec2_network_absent_before_2011_and_without_ports() -> None:
    assert site().lookup("/2009-04-04/meta-data/network/") is None
    bare = site(instance(ports=()))
    listing = lines(bare, "/latest/meta-data/")
    assert "network/" not in listing and "mac" not in listing and "local-ipv4" not in listing


def test_ec2_ipv6_only_instance_has_no_local_ipv4() -> None:
    port = Port(network_id="net-a", mac=MAC0, ips=(ip_address("2001:db8::9"),), id="p")
    s = site(instance(ports=(port,)))
    assert "local-ipv4" not in lines(s, "/latest/meta-data/")
    assert lines(s, f"/latest/meta-data/network/interfaces/macs/{MAC0}")[:3] == [
        "device-number",
        "interface-id",
        "ipv6s",
    ]
    assert json.loads(text(s, "/latest/dynamic/instance-identity/document"))["privateIp"] is None


@pytest.mark.parametrize(
    ("tags_option", "tags", "expected"),
    [
        ("enabled", {"Name": "web", "env": "prod"}, ["Name", "env"]),
        ("enabled", {"bad key": "x", "a/b": "x", "..": "x", "_index": "x", "ok:1@x": "v"}, ["ok:1@x"]),
        ("enabled", {}, None),
        ("disabled", {"Name": "web"}, None),
        (None, {"Name": "web"}, None),
    ],
)
def test_ec2_tags_instance(tags_option: Any, tags: dict[str, str], expected: list[str] | None) -> None:
    options = None if tags_option is None else MetadataOptions(instance_metadata_tags=tags_option)
    s = site(instance(tags=tags, metadata_options=options))
    if expected is None:
        assert "tags/" not in lines(s, "/latest/meta-data/")
        assert s.lookup("/latest/meta-data/tags/instance") is None
        return
    assert lines(s, "/latest/meta-data/tags") == ["instance/"]
    assert lines(s, "/latest/meta-data/tags/instance/") == expected
    for key in expected:
        assert text(s, f"/latest/meta-data/tags/instance/{key}") == tags[key]
    assert s.lookup("/2018-09-24/meta-data/tags/instance") is None


def test_ec2_user_data_is_raw_bytes() -> None:
    raw = b"\x00\x01#!/bin/sh\n"
    d = site(instance(user_data=raw)).lookup("/2009-04-04/user-data")
    assert d is not None and (d.content_type, d.body) == ("application/octet-stream", raw)


def test_ec2_user_data_absent_is_404() -> None:
    s = site()
    assert s.lookup("/latest/user-data") is None
    assert s.lookup("/2009-04-04/user-data") is None


def test_ec2_unknown_version_is_404() -> None:
    s = site()
    assert s.lookup("/2012-01-12/meta-data/instance-id") is None
    assert s.lookup("/openstack/meta-data") is None


def test_ec2_identity_document() -> None:
    created = datetime(2024, 5, 6, 9, 8, 7, tzinfo=timezone(timedelta(hours=2)))
    s = site(instance(created_at=created, architecture="arm64"), account_id="123456789012")
    d = s.lookup("/latest/dynamic/instance-identity/document")
    assert d is not None and d.content_type == "application/json"
    assert json.loads(d.body) == {
        "accountId": "123456789012",
        "architecture": "arm64",
        "availabilityZone": "az1",
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": "ami-0000abcd",
        "instanceId": UUID,
        "instanceType": "m1.large",
        "kernelId": None,
        "pendingTime": "2024-05-06T07:08:07Z",
        "privateIp": "10.0.0.5",
        "ramdiskId": None,
        "region": "r1",
        "version": "2017-09-30",
    }
    # AWS lays it out with two-space indent and " : ".
    assert d.body.startswith(b'{\n  "accountId" : "123456789012",\n')


def test_ec2_identity_document_pending_time_for_naive_created_at() -> None:
    s = site(instance(created_at=datetime(2020, 1, 2, 3, 4, 5)))
    # The model reads a naive created_at as UTC.
    assert json.loads(text(s, "/latest/dynamic/instance-identity/document"))["pendingTime"] == "2020-01-02T03:04:05Z"


def test_ec2_dynamic_without_signer_lists_document_only() -> None:
    s = site()
    assert lines(s, "/latest/dynamic") == ["instance-identity/"]
    assert lines(s, "/latest/dynamic/instance-identity/") == ["document"]
    for leaf in ("signature", "pkcs7", "rsa2048"):
        assert s.lookup(f"/latest/dynamic/instance-identity/{leaf}") is None


def test_ec2_dynamic_absent_before_2009_04_04() -> None:
    s = site()
    assert s.lookup("/2008-09-01/dynamic/") is None
    assert s.lookup("/2008-09-01/dynamic/instance-identity/document") is None
    assert s.lookup("/2009-04-04/dynamic/instance-identity/document") is not None


class RecordingSigner:
    """A deterministic signer that remembers what it signed."""

    def __init__(self) -> None:
        self.signed: list[bytes] = []

    def __call__(self, document: bytes, /) -> tuple[str, str, str]:
        self.signed.append(document)
        return (f"sig-{len(document)}", "pkcs7-blob", "rsa2048-blob")


def test_ec2_dynamic_with_signer_serves_signatures_of_the_served_document() -> None:
    signer = RecordingSigner()
    s = site(identity_signer=signer)
    document = s.lookup("/latest/dynamic/instance-identity/document")
    assert document is not None
    assert signer.signed == [document.body]
    assert lines(s, "/latest/dynamic/instance-identity") == ["document", "pkcs7", "rsa2048", "signature"]
    assert text(s, "/2009-04-04/dynamic/instance-identity/signature") == f"sig-{len(document.body)}"
    assert text(s, "/latest/dynamic/instance-identity/pkcs7") == "pkcs7-blob"
    assert text(s, "/latest/dynamic/instance-identity/rsa2048") == "rsa2048-blob"


def test_ec2_documents_are_shared_across_versions() -> None:
    s = site()
    same: Document | None = s.lookup("/2016-09-02/meta-data/instance-id")
    assert same is s.lookup("/1.0/meta-data/instance-id")
    assert s.lookup("/2016-09-02/meta-data") is s.lookup("/2018-09-24/meta-data")
