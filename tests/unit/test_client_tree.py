"""Listing entries to paths, and crawls over an in-memory metadata tree."""

from __future__ import annotations

import pytest

from meta169.client.tree import child, crawl, leaf_to_json, normalize_dir, tree_to_json
from meta169.errors import ClientError


@pytest.mark.parametrize(
    ("parent", "entry", "expected"),
    [
        ("/", "latest", ("latest", "/latest/", True)),
        ("/", "2009-04-04", ("2009-04-04", "/2009-04-04/", True)),
        ("/openstack/", "2015-10-15", ("2015-10-15", "/openstack/2015-10-15/", True)),
        ("/openstack/latest/", "meta_data.json", ("meta_data.json", "/openstack/latest/meta_data.json", False)),
        ("/latest/", "meta-data", ("meta-data", "/latest/meta-data/", True)),  # AWS lists it without '/'
        ("/latest/", "user-data", ("user-data", "/latest/user-data", False)),
        ("/latest/meta-data/", "placement/", ("placement", "/latest/meta-data/placement/", True)),
        ("/latest/meta-data/", "instance-id", ("instance-id", "/latest/meta-data/instance-id", False)),
        ("/latest/meta-data/public-keys/", "0=mykey", ("mykey", "/latest/meta-data/public-keys/0/", True)),
        ("/latest/meta-data/public-keys/0/", "openssh-key",
         ("openssh-key", "/latest/meta-data/public-keys/0/openssh-key", False)),
    ],
)  # fmt: skip
def test_client_tree_child_rules(parent: str, entry: str, expected: tuple[str, str, bool]) -> None:
    assert child(parent, entry) == expected


@pytest.mark.parametrize(
    ("path", "want"), [("", "/"), ("/", "/"), ("latest", "/latest/"), ("/openstack", "/openstack/")]
)
def test_client_tree_normalize_dir(path: str, want: str) -> None:
    assert normalize_dir(path) == want


SITE = {
    "/latest/meta-data/": b"instance-id\npublic-keys/\nplacement/\nbroken\n",
    "/latest/meta-data/instance-id": b"i-1234",
    "/latest/meta-data/public-keys/": b"0=alice\n",
    "/latest/meta-data/public-keys/0/": b"openssh-key\n",
    "/latest/meta-data/public-keys/0/openssh-key": b"ssh-ed25519 AAAA alice",
    "/latest/meta-data/placement/": b"availability-zone\n",
    "/latest/meta-data/placement/availability-zone": b"nova",
}


def _dir(path: str) -> bytes:
    if path not in SITE:
        raise ClientError("HTTP 404", reason="status", status=404)
    return SITE[path]


def test_client_tree_crawl_follows_listings_and_records_real_paths() -> None:
    result = crawl(_dir, SITE.get, "/latest/meta-data")
    assert result.root == "/latest/meta-data/"
    assert result.tree == {
        "instance-id": b"i-1234",
        "public-keys": {"alice": {"openssh-key": b"ssh-ed25519 AAAA alice"}},
        "placement": {"availability-zone": b"nova"},
        "broken": None,  # listed, 404: kept as a visible hole
    }
    assert ("/latest/meta-data/public-keys/0/openssh-key", b"ssh-ed25519 AAAA alice") in result.leaves
    assert ("/latest/meta-data/broken", None) in result.leaves


def test_client_tree_crawl_raises_when_the_start_is_not_a_listing() -> None:
    with pytest.raises(ClientError):
        crawl(_dir, SITE.get, "/nope/")


def test_client_tree_crawl_stops_a_self_referencing_tree() -> None:
    with pytest.raises(ClientError, match="deeper"):
        crawl(lambda p: b"again/\n", lambda p: b"", "/x/")


def test_client_tree_json_parses_json_leaves_and_base64_binary() -> None:
    tree = {"meta_data.json": b'{"uuid": "u"}', "user_data": b"\x1f\x8b\x08\x00", "text": b"hi", "gone": None}
    assert tree_to_json(tree) == {
        "meta_data.json": {"uuid": "u"},
        "user_data": {"base64": "H4sIAA=="},
        "text": "hi",
        "gone": None,
    }
    assert leaf_to_json("bad.json", b"{not json") == "{not json"
