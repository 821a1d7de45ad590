"""The package has no import cycles: none between modules at import time, and none between its subpackages
and top-level modules even counting imports inside functions (the root `sparsellm/__init__.py`, which only
re-exports, is left out). Modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparsellm"


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _imports(mods: dict[str, Path], top_level_only: bool) -> dict[str, set[str]]:
    """module -> the sparsellm modules it imports (a `from X import name` counts X, and X.name if a module)."""
    graph = {}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        tree = ast.parse(p.read_text())
        targets = set()
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join(base + ([node.module] if node.module else []))
                if node.module:  # `from . import x` needs only x: its package is already being imported
                    targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[m] = {t for t in targets if t in mods and t != m}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules_at_import_time():
    assert _cycles(_imports(_modules(), top_level_only=True)) == []


def test_no_import_cycle_between_subpackages():
    unit = lambda m: ".".join(m.split(".")[:2])  # noqa: E731  sparsellm.allocate.owl -> sparsellm.allocate
    graph: dict[str, set[str]] = {}
    for m, targets in _imports(_modules(), top_level_only=False).items():
        if m == "sparsellm":
            continue
        graph.setdefault(unit(m), set()).update(unit(t) for t in targets if t != "sparsellm" and unit(t) != unit(m))
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")))
def test_no_module_over_about_400_lines(path):
    assert len((ROOT / path).read_text().splitlines()) <= 420, path
