"""The package layering of src/meta169, enforced on every import statement.

Every ``import`` and ``from ... import`` in the source counts, at module level or
inside a function (a lazy import is still a dependency). ``from pkg import name``
is an edge to the submodule ``pkg.name`` when there is one, else to ``pkg`` itself.
The layers are the ones docs/architecture.md describes: a component may import its
own modules and those of strictly lower layers, never a peer or a higher one. Each
package's ``cli`` module belongs to the command line, whatever package holds it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "meta169"

# Lowest first. A component is a top-level module or package of meta169.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors"}),
    frozenset({"model", "secretfile", "exits", "sdnotify", "health", "logs"}),
    frozenset({"http", "render", "registry", "identity", "client", "plumbing"}),
    frozenset({"metrics"}),
    frozenset({"inventory", "api"}),
    frozenset({"proxy", "admin", "sources"}),
    frozenset({"doctor", "lab", "config"}),
    frozenset({"cli"}),
    frozenset({"__main__"}),
)


def _modules(src: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the meta169 modules it imports."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == ROOT)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] != ROOT:
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                deps.update(subs)
                if len(subs) < len(node.names):
                    deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _component(module: str) -> str:
    parts = module.split(".")
    # Each package's ``cli`` module is a part of the command line, the top layer.
    if parts[-1] == "cli":
        return "cli"
    return parts[1] if len(parts) > 1 else ""


def layer_of(component: str) -> int:
    for n, layer in enumerate(LAYERS):
        if component in layer:
            return n
    raise KeyError(component)


def layering_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        mine = _component(module)
        for dep in sorted(deps):
            theirs = _component(dep)
            if theirs == mine or theirs == "":
                continue
            if layer_of(theirs) >= layer_of(mine):
                out.append(f"{module} imports {dep} ({mine} is layer {layer_of(mine)}, {theirs} {layer_of(theirs)})")
    return out


def test_architecture_imports_have_no_cycle() -> None:
    assert find_cycles(import_graph()) == []


def test_architecture_imports_follow_the_layers() -> None:
    assert layering_violations(import_graph()) == []


def test_architecture_every_component_has_a_layer() -> None:
    components = {_component(m) for m in import_graph()} - {""}
    missing = sorted(c for c in components if not any(c in layer for layer in LAYERS))
    assert missing == []


def test_architecture_checker_finds_a_reintroduced_cycle() -> None:
    # The checker itself: a cycle through a function-level import, as config.py and
    # api/tokens.py once had, must be reported.
    graph = import_graph()
    graph["meta169.http.message"] = {*graph["meta169.http.message"], "meta169.http.protocol"}
    assert ["meta169.http.message", "meta169.http.protocol"] in find_cycles(graph)
    graph["meta169.http.stamp"] = {"meta169.api.identity"}
    assert any("meta169.http.stamp imports meta169.api.identity" in v for v in layering_violations(graph))


def test_architecture_graph_sees_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / ROOT
    (pkg / "http").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "http" / "__init__.py").write_text("")
    (pkg / "http" / "wire.py").write_text("def f():\n    from meta169.api import server\n")
    (pkg / "api").mkdir()
    (pkg / "api" / "__init__.py").write_text("")
    (pkg / "api" / "server.py").write_text("from meta169.http import wire\n")
    graph = import_graph(tmp_path)
    assert graph["meta169.http.wire"] == {"meta169.api.server"}
    assert find_cycles(graph) == [["meta169.api.server", "meta169.http.wire"]]


@pytest.mark.parametrize("module", ["meta169.identity", "meta169.registry", "meta169.render", "meta169.model"])
def test_architecture_light_packages_do_not_load_the_server(module: str) -> None:
    # The signer, the registry and the renderers are used by tools that never serve
    # HTTP; importing them must not pull in httptools or uvloop.
    code = f"import sys, {module}; print(sorted(m for m in ('httptools', 'uvloop') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
