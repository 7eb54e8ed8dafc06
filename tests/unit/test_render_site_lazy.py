"""A site rendered a section at a time answers every path as the site rendered whole.

The first request of a caller serve has never seen renders only the version it asks
(docs/benchmarks.md, "first-request"): these tests hold that site to the whole one,
path by path, and check what it renders when.
"""

from __future__ import annotations

from typing import Any

import pytest

from meta169.render import Document, RenderOptions, Site, build_site
from meta169.render.document import SeededJSON
from meta169.render.site import SECTIONS, section_of
from meta169.render.versions import EC2_VERSIONS, LATEST, OPENSTACK_VERSIONS
from tests.unit.test_render_site import CASES, NETWORKS, full_instance


def _same(a: Document | None, b: Document | None) -> bool:
    """Equal documents: the same bytes, or for meta_data.json the same around the seed."""
    if a is None or b is None:
        return a is b
    if a.content_type != b.content_type or len(a.body) != len(b.body):
        return False
    if isinstance(a.fresh, SeededJSON) and isinstance(b.fresh, SeededJSON):
        return (a.fresh.head, a.fresh.tail) == (b.fresh.head, b.fresh.tail)
    return a.fresh is None and b.fresh is None and a.body == b.body


def _asked(whole: Site) -> list[str]:
    """Every key, with and without a trailing slash, in forms normalize_path mends,
    and paths no site has."""
    paths: list[str] = []
    for key in whole.documents:
        paths += [key, key + "/", key[1:], "/" + key[1:].replace("/", "//", 1)]
    return [*paths, "", "//", "/openstack/", "/nope", "/latest/nope", "/openstack/9999-01-01", "/1.0/user-data/x"]


@pytest.mark.parametrize(("make", "options"), CASES)
def test_site_lazily_answers_every_path_as_the_whole_site(make: Any, options: RenderOptions) -> None:
    whole = build_site(make(), NETWORKS, options)
    for path in _asked(whole):
        # A fresh site per path: each path is the first one asked.
        lazy = Site.lazily(make(), NETWORKS, options)
        assert _same(lazy.lookup(path), whole.lookup(path)), path
        assert _same(Site.lazily(make(), NETWORKS, options).get(path), whole.get(path)), path


@pytest.mark.parametrize(("make", "options"), CASES)
def test_site_lazily_completed_is_the_whole_site_in_its_order(make: Any, options: RenderOptions) -> None:
    whole = build_site(make(), NETWORKS, options)
    lazy = Site.lazily(make(), NETWORKS, options).complete()
    assert list(lazy.documents) == list(whole.documents)
    assert all(_same(lazy.documents[p], whole.documents[p]) for p in whole.documents)


def test_site_lazily_renders_only_the_version_asked() -> None:
    whole = build_site(full_instance(), NETWORKS, RenderOptions())
    lazy = Site.lazily(full_instance(), NETWORKS, RenderOptions())
    assert lazy.rendered == 0
    assert lazy.get("/openstack/latest/meta_data.json") is not None
    assert lazy.rendered == len([p for p in whole.documents if p.startswith("/openstack/latest")])
    assert lazy.lookup("/latest/meta-data/instance-id/") is not None
    assert lazy.rendered < len(whole.documents) // 5
    assert not lazy.is_complete
    assert len(lazy.documents) == len(whole.documents)  # asking for all of them renders the rest
    assert lazy.is_complete


def test_site_lazily_renders_nothing_for_paths_no_section_holds() -> None:
    lazy = Site.lazily(full_instance(), NETWORKS, RenderOptions())
    for path in ("/nope", "/openstack/2001-01-01/meta_data.json", "latest/meta-data", "/2099-01-01/"):
        assert lazy.get(path) is None
    assert lazy.rendered == 0


def test_site_lazily_shares_documents_across_versions_as_build_site_does() -> None:
    lazy = Site.lazily(full_instance(), NETWORKS, RenderOptions())
    tree = lazy.lookup("/2016-09-02/meta-data")
    assert tree is not None and lazy.lookup("/2018-09-24/meta-data") is tree
    assert lazy.lookup("/1.0/meta-data/instance-id") is lazy.lookup("/latest/meta-data/instance-id")
    meta = lazy.lookup("/openstack/2020-10-14/meta_data.json")
    assert meta is not None and lazy.lookup("/openstack/latest/meta_data.json") is meta


def test_site_lazily_signs_the_identity_document_when_it_is_first_asked() -> None:
    signed: list[bytes] = []

    def signer(document: bytes, /) -> tuple[str, str, str]:
        signed.append(document)
        return ("c2ln", "cGtjczc=", "cnNh")

    lazy = Site.lazily(full_instance(), NETWORKS, RenderOptions(identity_signer=signer))
    assert lazy.lookup("/openstack/latest/meta_data.json") is not None
    assert lazy.lookup("/1.0/meta-data/instance-id") is not None  # 1.0 has no dynamic/
    assert signed == []
    assert lazy.lookup("/latest/dynamic/instance-identity/signature") is not None
    assert lazy.lookup("/2009-04-04/dynamic/instance-identity/pkcs7") is not None
    assert len(signed) == 1


def test_site_lazily_offers_every_document_made_to_share() -> None:
    offered: list[Document] = []

    def share(doc: Document) -> Document:
        offered.append(doc)
        return doc

    site = Site.lazily(full_instance(), NETWORKS, RenderOptions(), share=share).complete()
    kept = {id(doc) for doc in site.documents.values()}
    assert kept <= {id(doc) for doc in offered}


def test_site_sections_cover_every_version_once() -> None:
    assert len(SECTIONS) == len(set(SECTIONS)) == len(EC2_VERSIONS) + len(OPENSTACK_VERSIONS) + 4
    whole = build_site(full_instance(), NETWORKS, RenderOptions())
    assert {section_of(p) for p in whole.documents} == set(SECTIONS)
    assert section_of("/openstack") == ("openstack", "")
    assert section_of(f"/openstack/{LATEST}/user_data") == ("openstack", LATEST)
    assert section_of("/") == ("ec2", "")
    assert section_of("/2009-04-04/dynamic") == ("ec2", "2009-04-04")
    assert section_of("/openstack/1.0") is None and section_of("/2013-04-04") is None


@pytest.mark.parametrize(("make", "options"), CASES)
def test_site_section_keys_are_the_keys_of_one_section(make: Any, options: RenderOptions) -> None:
    """What the fast path is given after a caller's first document of a version: the
    keys of exactly that section, of a site rendered whole or a section at a time."""
    whole = build_site(make(), NETWORKS, options)
    by_section: dict[object, set[str]] = {}
    for key in whole.documents:
        by_section.setdefault(section_of(key), set()).add(key)
    assert None not in by_section
    for key in whole.documents:
        assert set(whole.section_keys(key)) == by_section[section_of(key)], key
        lazy = Site.lazily(make(), NETWORKS, options)
        assert lazy.get(key) is not None
        assert set(lazy.section_keys(key)) == by_section[section_of(key)], key
    assert whole.section_keys("/nope") == () and whole.section_keys("/openstack/2001-01-01/x") == ()
