"""The Site as a whole: every listed entry resolves, lookups, content types, options."""

from __future__ import annotations

import base64
import json
from collections import deque
from datetime import UTC, datetime
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from meta169.errors import ValidationError
from meta169.model import HostRoute, Instance, MetadataOptions, Network, Port, SSHKey, Subnet
from meta169.render import (
    Document,
    IdentitySigner,
    RenderOptions,
    Site,
    build_site,
    is_password_path,
    normalize_path,
)

UUID = "0b5a3a52-3c1e-4a8e-9a43-5f0f8c1d2e3f"

NETWORKS = {
    "net-a": Network(
        id="net-a",
        mtu=1450,
        subnets=(
            Subnet(
                cidr=ip_network("10.0.0.0/24"),
                gateway=ip_address("10.0.0.1"),
                dns=(ip_address("10.0.0.2"),),
                host_routes=(HostRoute(ip_network("10.8.0.0/16"), ip_address("10.0.0.254")),),
            ),
            Subnet(cidr=ip_network("2001:db8::/64"), gateway=ip_address("2001:db8::1"), ipv6_mode="slaac"),
        ),
    ),
    "net-b": Network(id="net-b", subnets=(Subnet(cidr=ip_network("192.168.0.0/24"), dhcp=False),)),
}


def _signer(document: bytes, /) -> tuple[str, str, str]:
    return ("c2ln", "cGtjczc=", "cnNh")


def full_instance() -> Instance:
    return Instance(
        uuid=UUID,
        name="Full Instance",
        project_id="proj",
        image_id="img-1",
        launch_index=3,
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        metadata={"role": "db", "tier": "2"},
        keys=(SSHKey("alice", "ssh-ed25519 AAAA alice"), SSHKey("x", "-----BEGIN", type="x509")),
        user_data=b"#cloud-config\nhostname: full\n",
        vendor_data={"cloud-init": "#cloud-config\n"},
        tags={"Name": "full", "bad key": "skipped"},
        security_groups=("default",),
        ports=(
            Port(
                network_id="net-a",
                mac="fa:16:3e:00:00:05",
                ips=(ip_address("10.0.0.5"), ip_address("2001:db8::5")),
                id="port-a",
            ),
            Port(network_id="net-b", mac="fa:16:3e:00:00:06", ips=(ip_address("192.168.0.6"),), device_number=1),
        ),
        metadata_options=MetadataOptions(instance_metadata_tags="enabled"),
    )


def minimal_instance() -> Instance:
    return Instance(uuid=UUID, name="m")


FULL_OPTIONS = RenderOptions(
    static_vendor_data={"operator": True},
    vendor_data2_dynamic={"join": {"ok": 1}},
    identity_signer=_signer,
)

CASES = [
    pytest.param(full_instance, FULL_OPTIONS, id="full"),
    pytest.param(minimal_instance, RenderOptions(), id="minimal"),
]


def walk(site: Site) -> set[str]:
    """Follow every listing from both roots, asserting each named entry answers.

    Listing rules as a client reads them (cloud-init ec2 MetadataMaterializer): a
    line ending in "/" is a directory, "N=name" under public-keys/ stands for the
    directory N/ holding openssh-key, any other line is a leaf. The version lines of
    "/" and "/openstack" are directories written without the slash.
    """
    reached: set[str] = set()
    queue: deque[tuple[str, bool]] = deque([("/", True), ("/openstack", True)])
    while queue:
        path, versions = queue.popleft()
        doc = site.lookup(path)
        assert doc is not None, f"listing {path} does not resolve"
        assert doc.content_type == "text/plain", path
        reached.add(path)
        base = path.rstrip("/")
        for entry in doc.body.decode().split("\n") if doc.body else []:
            assert entry and entry == entry.strip(), f"blank or padded entry {entry!r} in {path}"
            if versions:
                queue.append((f"{base}/{entry}/", False))
                continue
            if entry.endswith("/"):
                child = f"{base}/{entry}"
                assert site.lookup(child.rstrip("/")) is site.lookup(child), child
                queue.append((child, False))
                continue
            if "=" in entry and base.endswith("/public-keys"):
                index = entry.split("=", 1)[0]
                queue.append((f"{base}/{index}/", False))
                continue
            leaf = f"{base}/{entry}"
            if is_password_path(leaf):
                continue  # answered by the API layer from the registry
            assert site.lookup(leaf) is not None, f"{leaf} is listed in {path} but does not resolve"
            reached.add(leaf)
    return {p.rstrip("/") or "/" for p in reached}


@pytest.mark.parametrize(("make", "options"), CASES)
def test_site_every_listed_entry_resolves_and_every_document_is_listed(make: Any, options: RenderOptions) -> None:
    site = build_site(make(), NETWORKS, options)
    reached = walk(site)
    assert reached == set(site.documents), sorted(set(site.documents) ^ reached)


@pytest.mark.parametrize(("make", "options"), CASES)
def test_site_content_types(make: Any, options: RenderOptions) -> None:
    site = build_site(make(), NETWORKS, options)
    for path, doc in site.documents.items():
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".json") or name == "document":
            assert doc.content_type == "application/json", path
            assert isinstance(json.loads(doc.payload()), dict), path
        elif name in ("user_data", "user-data"):
            assert doc.content_type == "application/octet-stream", path
        else:
            assert doc.content_type == "text/plain", path


@pytest.mark.parametrize(("make", "options"), CASES)
def test_site_keys_are_normalized(make: Any, options: RenderOptions) -> None:
    site = build_site(make(), NETWORKS, options)
    assert all(normalize_path(path) == path for path in site.documents)


def test_site_full_counts() -> None:
    site = build_site(full_instance(), NETWORKS, FULL_OPTIONS)
    ec2 = [p for p in site.documents if not p.startswith("/openstack")]
    openstack = [p for p in site.documents if p.startswith("/openstack")]
    # 13 EC2 versions and 10 OpenStack versions (with latest) each contribute.
    assert sum(p.endswith("/meta-data/instance-id") for p in ec2) == 13
    assert sum(p.endswith("/meta_data.json") for p in openstack) == 10


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data",
        "/latest/meta-data/",
        "latest/meta-data",
        "/latest/meta-data/placement/",
        "/openstack/latest/",
    ],
)
def test_site_lookup_accepts_slash_forms(path: str) -> None:
    site = build_site(full_instance(), NETWORKS, FULL_OPTIONS)
    assert site.lookup(path) is not None


@pytest.mark.parametrize(
    "path",
    [
        "//",
        "//latest/meta-data",
        "/latest//meta-data",
        "/latest/meta-data//",
        "/latest/meta-data/../meta-data",
        "/latest/./meta-data",
        "/latest/meta-data/nope",
        "/openstack/latest/password",
    ],
)
def test_site_lookup_rejects_bad_paths(path: str) -> None:
    site = build_site(full_instance(), NETWORKS, FULL_OPTIONS)
    assert site.lookup(path) is None


def test_site_lookup_collapses_a_leafs_trailing_slash_too() -> None:
    # Nova normalizes every path the same way (posixpath.normpath drops it).
    site = build_site(full_instance(), NETWORKS, FULL_OPTIONS)
    assert site.lookup("/latest/meta-data/instance-id/") is site.lookup("/latest/meta-data/instance-id")


def test_site_root_is_ec2_version_listing() -> None:
    site = build_site(minimal_instance(), {}, RenderOptions())
    root = site.lookup("/")
    assert root is not None and site.lookup("") is root
    assert root.body.endswith(b"\n2021-03-23\nlatest")


def test_site_keeps_the_instance() -> None:
    inst = minimal_instance()
    assert build_site(inst, {}, RenderOptions()).instance is inst


def test_site_function_signer_satisfies_protocol() -> None:
    assert isinstance(_signer, IdentitySigner)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"static_vendor_data": ["not", "an", "object"]},
        {"vendor_data2_dynamic": {1: "int key"}},
        {"account_id": ""},
        {"account_id": "12\n34"},
    ],
)
def test_site_render_options_validate(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RenderOptions(**kwargs)


def test_site_document_payload_uses_fresh_when_set() -> None:
    calls: list[int] = []

    def fresh() -> bytes:
        calls.append(1)
        return b"new"

    assert Document("text/plain", b"old").payload() == b"old"
    assert Document("text/plain", b"old", fresh).payload() == b"new"
    assert calls == [1]


def test_render_random_seed_never_repeats_across_pool_refills() -> None:
    from meta169.render.document import RANDOM_SEED_BYTES, seeded_json_document

    doc = seeded_json_document({"uuid": "x"}, {})
    assert doc.fresh is not None
    seeds = [json.loads(doc.fresh())["random_seed"] for _ in range(200)]
    assert len(set(seeds)) == 200
    assert all(len(base64.b64decode(s)) == RANDOM_SEED_BYTES for s in seeds)
