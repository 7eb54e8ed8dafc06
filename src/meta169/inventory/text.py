"""Inventory documents as YAML or JSON text, both ways.

Reading is strict: a duplicate key is an error in either format (PyYAML and the
json module would silently keep the last one). Writing produces text that reads
back to the same document: every string comes back as written.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml

from meta169.errors import InventoryError

Format = Literal["yaml", "json"]

try:  # libyaml is about ten times faster than the pure-Python parser and emitter
    from yaml import CSafeDumper as _SafeDumper
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeDumper as _SafeDumper  # type: ignore[assignment]
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


def sniff_format(text: str) -> Format:
    return "json" if text.lstrip().startswith(("{", "[")) else "yaml"


def load_text(text: str, *, source: str, fmt: Format | None = None) -> Any:
    """The document in ``text`` (sniffed when ``fmt`` is None); InventoryError naming the line."""
    if (fmt or sniff_format(text)) == "json":
        return _load_json(text, source)
    return _load_yaml(text, source)


def dump_text(document: Any, fmt: Format = "yaml") -> str:
    """``document`` (JSON types only) as text ending in a newline."""
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    text: str = yaml.dump(
        document,
        Dumper=_Dumper,
        allow_unicode=True,
        sort_keys=False,
        default_flow_style=None,
        width=_WIDTH,
    )
    return text


# -- JSON ---------------------------------------------------------------------------------


def _load_json(text: str, source: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise InventoryError(f"duplicate key {key!r}", source=source)
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}", source=source) from exc


# -- YAML ---------------------------------------------------------------------------------


class _StrictLoader(_SafeLoader):
    """A safe loader that refuses duplicate mapping keys (PyYAML keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a safe loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise InventoryError(f"{where}invalid YAML: {exc.problem or exc}", source=source) from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"invalid YAML: {exc}", source=source) from exc


# Lines are never folded: an SSH key or a long metadata value stays on one line.
_WIDTH = 1 << 16
# Characters a YAML reader turns into "\n" or drops outside double quotes (PyYAML's
# pure-Python emitter writes NEL unescaped in single quotes, and reads it back as a
# space); double quotes escape them.
_NEEDS_ESCAPES = re.compile("[\x85\u2028\u2029\ufeff\r]")


class _Dumper(_SafeDumper):
    """Safe YAML with multi-line strings as literal blocks (user data reads as written)."""


def _represent_str(dumper: _Dumper, value: str) -> yaml.ScalarNode:
    style: str | None = None
    if _NEEDS_ESCAPES.search(value):
        style = '"'
    elif "\n" in value:
        # The emitter falls back to quotes when a block cannot hold the value exactly.
        style = "|"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)
