"""Request path rules shared by the site and the API: normalization, password path."""

from __future__ import annotations

from typing import Final

from meta169.render.versions import GRIZZLY, openstack_at_least, resolve_openstack

_BAD_SEGMENTS: Final = frozenset(("", ".", ".."))


def normalize_path(path: str) -> str | None:
    """The canonical form of a (query-less, percent-decoded) request path, or None.

    ``""`` and ``"/"`` are the root ``"/"``. One trailing slash is dropped, so a
    listing answers with and without it (no redirects). A missing leading slash is
    tolerated as Nova does. Empty, ``.`` and ``..`` segments make the path invalid
    (None, i.e. 404) rather than being resolved.
    """
    if path in ("", "/"):
        return "/"
    body = path[1:] if path[0] == "/" else path
    if body[-1:] == "/":
        body = body[:-1]
    for segment in body.split("/"):
        if segment in _BAD_SEGMENTS:
            return None
    return "/" + body


def is_password_path(path: str) -> bool:
    """True for ``/openstack/<version>/password`` where the version has a password.

    The password leaf is read and written through the registry by the API layer, so
    it has no pre-rendered document; it is listed from 2013-04-04 on [nova base.py
    _password].
    """
    canonical = normalize_path(path)
    if canonical is None:
        return False
    parts = canonical.split("/")
    if len(parts) != 4 or parts[1] != "openstack" or parts[3] != "password":
        return False
    version = resolve_openstack(parts[2])
    return version is not None and openstack_at_least(version, GRIZZLY)
