"""Rendering: the OpenStack and EC2 metadata trees of one instance, as documents.

Owns the version tables (``versions``), the document formats (``openstack``,
``ec2``), request path normalization (``paths``) and the :class:`Site` that maps
every servable path of one instance to a pre-rendered :class:`Document`.

Pure: no sockets, files, registry or HTTP here. The API layer resolves the caller,
asks the Site, and handles the password leaf itself.
"""

from meta169.render.document import Document
from meta169.render.options import IdentitySigner, RenderOptions
from meta169.render.paths import is_password_path, normalize_path
from meta169.render.site import Site, build_site

__all__ = [
    "Document",
    "IdentitySigner",
    "RenderOptions",
    "Site",
    "build_site",
    "is_password_path",
    "normalize_path",
]
