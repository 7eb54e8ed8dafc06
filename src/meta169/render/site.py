"""The Site: every document one instance can be served, in one flat mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meta169.model import Instance, Network
from meta169.render.document import Document
from meta169.render.ec2 import render_ec2
from meta169.render.openstack import render_openstack
from meta169.render.options import RenderOptions
from meta169.render.paths import normalize_path


@dataclass(frozen=True, slots=True, eq=False)
class Site:
    """One instance's OpenStack and EC2 trees, keyed by normalized path.

    Built once per instance revision by :func:`build_site`; serving a request is a
    dict lookup. The password leaf is not in ``documents`` (see is_password_path).
    """

    instance: Instance
    documents: Mapping[str, Document]

    def lookup(self, path: str) -> Document | None:
        """The document for a query-less, percent-decoded request path, or None (404)."""
        documents = self.documents
        doc = documents.get(path)
        if doc is not None:
            return doc
        # Fast path for a listing asked with its trailing slash: keys are canonical,
        # so "<key>/" is valid whenever "<key>" is a key other than the root.
        if path[-1:] == "/" and path[-2:-1] not in ("/", ""):
            doc = documents.get(path[:-1])
            if doc is not None:
                return doc
        canonical = normalize_path(path)
        return None if canonical is None else documents.get(canonical)


def build_site(instance: Instance, networks: Mapping[str, Network], options: RenderOptions) -> Site:
    """Render both trees for ``instance``.

    ``networks`` maps network id to Network and should hold the networks of the
    instance's ports; a port on a network missing from it gets no network_data.json
    link and no EC2 subnet CIDR. Pure apart from drawing the random seeds.
    """
    documents = render_ec2(instance, networks, options)
    documents.update(render_openstack(instance, networks, options))
    return Site(instance, documents)
