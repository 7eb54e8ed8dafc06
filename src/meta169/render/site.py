"""The Site: every document one instance can be served, in one flat mapping.

A site is rendered a section at a time, when a path in the section is first asked
(:meth:`Site.lazily`), or whole (:func:`build_site`); either way a path answers the
same document. The sections are the two roots' version listings and each version of
each tree: a guest's first request renders the few dozen documents of the version
it asks, not the three hundred and sixty of every version (docs/benchmarks.md,
"first-request").
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from meta169.model import Instance, Network
from meta169.render.document import Document, Share, same
from meta169.render.ec2 import Ec2Tree
from meta169.render.openstack import OpenStackTree
from meta169.render.options import RenderOptions
from meta169.render.paths import normalize_path
from meta169.render.versions import EC2_VERSIONS, LATEST, OPENSTACK_VERSIONS

# A section: (tree, version), the version "" for the tree's root listing. In the
# order build_site has always rendered them: EC2 first, each root before its versions.
Section = tuple[str, str]
_EC2: Final = "ec2"
_OPENSTACK: Final = "openstack"
SECTIONS: Final[tuple[Section, ...]] = (
    (_EC2, ""),
    *((_EC2, v) for v in (*EC2_VERSIONS, LATEST)),
    (_OPENSTACK, ""),
    *((_OPENSTACK, v) for v in (*OPENSTACK_VERSIONS, LATEST)),
)
_EC2_NAMES: Final = frozenset((*EC2_VERSIONS, LATEST))
_OPENSTACK_NAMES: Final = frozenset((*OPENSTACK_VERSIONS, LATEST))


def section_of(path: str) -> Section | None:
    """The section that holds ``path`` if it is a key of a site, or None (no section
    can hold it). Paths that are not normalized may name a section that does not
    hold them."""
    if path == "/":
        return (_EC2, "")
    first, _, rest = path[1:].partition("/")
    if first == _OPENSTACK:
        version = rest.partition("/")[0]
        if not version:
            return (_OPENSTACK, "")
        return (_OPENSTACK, version) if version in _OPENSTACK_NAMES else None
    return (_EC2, first) if first in _EC2_NAMES else None


class _Renderer:
    """What a site not yet rendered whole needs to render its other sections."""

    __slots__ = ("ec2", "left", "openstack")

    def __init__(
        self, instance: Instance, networks: Mapping[str, Network], options: RenderOptions, share: Share
    ) -> None:
        self.ec2 = Ec2Tree(instance, networks, options, share)
        self.openstack = OpenStackTree(instance, networks, options, share)
        self.left = set(SECTIONS)

    def render(self, section: Section) -> dict[str, Document]:
        tree, version = section
        if tree == _EC2:
            return self.ec2.version(version) if version else self.ec2.root()
        return self.openstack.version(version) if version else self.openstack.root()


@dataclass(slots=True, eq=False)
class Site:
    """One instance's OpenStack and EC2 trees, keyed by normalized path.

    Serving a request is a dict lookup once the path's section is rendered. The
    password leaf is not a document (see is_password_path). ``Site(instance,
    documents)`` is the site of those documents, every one it has. Sites are used
    from one thread (the event loop's): rendering a section changes the site.
    """

    instance: Instance
    _documents: dict[str, Document] = field(repr=False)
    _renderer: _Renderer | None = field(default=None, repr=False)

    @classmethod
    def lazily(
        cls,
        instance: Instance,
        networks: Mapping[str, Network],
        options: RenderOptions,
        *,
        share: Share = same,
    ) -> Site:
        """The site of ``instance``, each section rendered when a path in it is first
        asked (see :func:`build_site` for ``networks``). ``share`` sees every document
        made and returns the one to keep. Its path keys are interned."""
        return cls(instance, {}, _Renderer(instance, networks, options, share))

    @property
    def documents(self) -> Mapping[str, Document]:
        """Every document, by normalized path (what is not rendered yet is rendered now)."""
        return self.complete()._documents

    @property
    def rendered(self) -> int:
        """How many documents are rendered so far."""
        return len(self._documents)

    @property
    def is_complete(self) -> bool:
        """Whether every section is rendered."""
        return self._renderer is None

    def complete(self) -> Site:
        """Render every section not rendered yet; the site itself."""
        renderer = self._renderer
        if renderer is not None:
            for section in SECTIONS:
                if section in renderer.left:
                    self._render(renderer, section)
        return self

    def get(self, path: str) -> Document | None:
        """The document whose key is exactly ``path``, or None; the hot path."""
        doc = self._documents.get(path)
        if doc is None and self._renderer is not None:
            section = section_of(path)
            if section is not None and section in self._renderer.left:
                self._render(self._renderer, section)
                doc = self._documents.get(path)
        return doc

    def lookup(self, path: str) -> Document | None:
        """The document for a query-less, percent-decoded request path, or None (404)."""
        doc = self.get(path)
        if doc is not None:
            return doc
        # Fast path for a listing asked with its trailing slash: keys are canonical,
        # so "<key>/" is valid whenever "<key>" is a key other than the root.
        if path[-1:] == "/" and path[-2:-1] not in ("/", ""):
            doc = self.get(path[:-1])
            if doc is not None:
                return doc
        canonical = normalize_path(path)
        return None if canonical is None else self.get(canonical)

    def section_keys(self, key: str) -> tuple[str, ...]:
        """The keys rendered so far of the section that would hold ``key`` (a guest
        that asks one document of a version asks its others next). Found by prefix
        each time rather than indexed: an index would cost every site rendered ahead
        (thousands, most never asked) about 5 KB."""
        section = section_of(key)
        if section is None:
            return ()
        tree, version = section
        documents = self._documents
        if not version:
            root = "/" if tree == _EC2 else "/openstack"
            return (root,) if root in documents else ()
        top = f"/{version}" if tree == _EC2 else f"/openstack/{version}"
        under = top + "/"
        return tuple(k for k in documents if k.startswith(under) or k == top)

    def _render(self, renderer: _Renderer, section: Section) -> None:
        documents = self._documents
        for path, doc in renderer.render(section).items():
            documents[sys.intern(path)] = doc
        renderer.left.discard(section)
        if not renderer.left:
            self._renderer = None  # its memos go with it


def build_site(instance: Instance, networks: Mapping[str, Network], options: RenderOptions) -> Site:
    """Render both trees for ``instance``, whole.

    ``networks`` maps network id to Network and should hold the networks of the
    instance's ports; a port on a network missing from it gets no network_data.json
    link and no EC2 subnet CIDR. Pure apart from drawing the random seeds.
    """
    return Site.lazily(instance, networks, options).complete()
