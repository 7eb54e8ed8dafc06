"""Walking the metadata trees: which listing entries are directories, and the result.

Pure: the fetch functions are passed in. EC2 listings mark directories with a
trailing '/' [EC2 user guide, "Instance metadata categories"], except that
``public-keys/`` lists ``N=name`` and the key lives under ``N/``. Version
listings (``/`` and ``/openstack``) list bare version names that are
directories, and AWS lists ``meta-data`` and ``dynamic`` without a slash under
a version. Those are the rules of :func:`child`; every other entry is a leaf.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, Union

from meta169.errors import ClientError

# A directory maps entry names to sub-directories or leaves; a leaf listed but
# answered 404 is None.
Node: TypeAlias = Union["Tree", bytes, None]
Tree: TypeAlias = dict[str, Node]

MAX_DEPTH = 16
MAX_NODES = 5000
_VERSION_DIRS = frozenset(("meta-data", "dynamic"))


def normalize_dir(path: str) -> str:
    """``path`` with a leading and a trailing '/'."""
    path = "/" + path.strip("/")
    return path if path == "/" else path + "/"


def child(parent: str, entry: str) -> tuple[str, str, bool]:
    """(key, path, is_directory) of listing ``entry`` under directory ``parent``."""
    if entry.endswith("/"):
        name = entry.rstrip("/")
        return name, parent + name + "/", True
    parts = [p for p in parent.split("/") if p]
    if not parts or parts == ["openstack"]:
        return entry, parent + entry + "/", True  # version listings
    if len(parts) == 1 and entry in _VERSION_DIRS:
        return entry, parent + entry + "/", True
    if parts[-1] == "public-keys" and "=" in entry:
        index, _, name = entry.partition("=")
        return name or index, parent + index + "/", True
    return entry, parent + entry, False


def listing_entries(body: bytes) -> tuple[str, ...]:
    """Lines of a listing, blank ones dropped."""
    return tuple(line.strip() for line in body.decode("utf-8", errors="replace").splitlines() if line.strip())


@dataclass(frozen=True, slots=True)
class Crawl:
    """A crawled directory: the nested ``tree`` and its ``leaves`` as (real path, value)."""

    root: str
    tree: Tree
    leaves: tuple[tuple[str, bytes | None], ...]


def crawl(
    fetch_dir: Callable[[str], bytes],
    fetch_leaf: Callable[[str], bytes | None],
    path: str,
) -> Crawl:
    """Everything below directory ``path``; ``fetch_dir`` raises for an unreadable listing."""
    leaves: list[tuple[str, bytes | None]] = []

    def walk(directory: str, depth: int) -> Tree:
        if depth > MAX_DEPTH:
            raise ClientError(f"{directory}: deeper than {MAX_DEPTH} levels", reason="protocol")
        out: Tree = {}
        for entry in listing_entries(fetch_dir(directory)):
            if len(leaves) > MAX_NODES:
                raise ClientError(f"more than {MAX_NODES} leaves under {path}", reason="protocol")
            key, sub, is_dir = child(directory, entry)
            if is_dir:
                out[key] = walk(sub, depth + 1)
            else:
                value = fetch_leaf(sub)
                leaves.append((sub, value))
                out[key] = value
        return out

    root = normalize_dir(path)
    return Crawl(root, walk(root, 0), tuple(leaves))


def leaf_to_json(name: str, value: bytes | None, *, parse_json: bool = True) -> Any:
    """A leaf for JSON output: parsed JSON for ``*.json``, text, or ``{"base64": ...}``."""
    if value is None:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}
    if parse_json and name.endswith(".json"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def tree_to_json(tree: Tree) -> dict[str, Any]:
    """The tree with leaves converted by :func:`leaf_to_json`."""
    return {
        key: tree_to_json(node) if isinstance(node, dict) else leaf_to_json(key, node) for key, node in tree.items()
    }
