"""``api.metadata.PYTHON_OWNED_HEADERS`` / ``PYTHON_OWNED_PREFIXES`` cover every request
header the metadata plane reads: the compiled fast path declines exactly those, so
a header read here and missing from the lists would let the fast path repeat an
answer that depends on it."""

from __future__ import annotations

import ast
import importlib
import inspect
from types import ModuleType

import pytest

from meta169.api.metadata import NOT_ON_THE_FAST_PATH, PYTHON_OWNED_HEADERS, PYTHON_OWNED_PREFIXES
from meta169.api.tokens import TOKEN_HEADER, TTL_HEADER

# What MetadataApp runs on a request: itself, caller identity, tokens, the proxy's stamp.
READERS = ["meta169.api.metadata", "meta169.api.identity", "meta169.api.tokens", "meta169.http.stamp"]


def _is_headers(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name == "headers"


def _resolve(node: ast.expr, module: ModuleType) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), str):
        value: str = getattr(module, node.id)
        return value
    return None


def headers_read(module: ModuleType) -> set[str]:
    """Names looked up in anything called ``headers``: ``headers.get(N)``,
    ``N in headers``, ``headers[N]``, N a literal or a module-level string constant."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        keys: list[ast.expr] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if _is_headers(node.func.value) and node.args:
                keys.append(node.args[0])
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In | ast.NotIn):
            if _is_headers(node.comparators[0]):
                keys.append(node.left)
        elif isinstance(node, ast.Subscript) and _is_headers(node.value):
            keys.append(node.slice)
        for key in keys:
            name = _resolve(key, module)
            assert name is not None, f"{module.__name__}: a header read by a name this test cannot resolve"
            found.add(name)
    return found


def test_the_scan_sees_the_reads_it_must() -> None:
    read = set().union(*(headers_read(importlib.import_module(m)) for m in READERS))
    # the IMDSv2 headers, Neutron's identity, the proxy's stamp: the scan is not blind
    assert {TOKEN_HEADER, TTL_HEADER, "x-instance-id", "x-forwarded-for", "x-meta169-caller-ip"} <= read


@pytest.mark.parametrize("module", READERS)
def test_every_header_read_is_owned(module: str) -> None:
    for name in sorted(headers_read(importlib.import_module(module))):
        assert name == name.lower(), name  # headers are keyed lower case (http.protocol)
        owned = name in PYTHON_OWNED_HEADERS or name.startswith(PYTHON_OWNED_PREFIXES)
        assert owned or name in NOT_ON_THE_FAST_PATH, (module, name)


def test_headers_off_the_fast_path_are_not_owned() -> None:
    # A header in both lists would make the fast path decline what it may answer.
    assert not NOT_ON_THE_FAST_PATH & PYTHON_OWNED_HEADERS
