"""The package's structure: no import loops, imports only downwards through the layers of
docs/architecture.md, no oversized class or module, no ``sys.path`` edits in tools/.

Imports anywhere in a file count, including those inside functions (a lazy import still ties two
modules together). The root ``promptmatch/__init__.py`` re-exports the public API and is exempt.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "promptmatch"

#: Layers, bottom (0) to top, as in docs/architecture.md. A module's layer is that of the longest
#: prefix listed here; every module of the package must have one.
LAYERS: Dict[str, int] = {
    # 0 base: no promptmatch imports but each other
    "promptmatch.version": 0, "promptmatch.constants": 0, "promptmatch._locking": 0,
    "promptmatch._wheels": 0, "promptmatch.records": 0, "promptmatch.measure": 0,
    "promptmatch.stack": 0, "promptmatch.divergence": 0, "promptmatch.visualize": 0,
    "promptmatch.weights": 0, "promptmatch._atomic": 0, "promptmatch._config": 0,
    # 1 model plumbing
    "promptmatch.staging": 1, "promptmatch.backbones": 1, "promptmatch.inference": 1,
    # 2 plug-ins
    "promptmatch.methods": 2, "promptmatch.decoders": 2,
    # 3 models and their files
    "promptmatch.core": 3, "promptmatch.segmentor": 3, "promptmatch.checkpoint": 3,
    "promptmatch.params": 3, "promptmatch.merged": 3, "promptmatch.bank": 3, "promptmatch.predict": 3,
    "promptmatch.training": 3, "promptmatch.export": 3, "promptmatch.onnx_check": 3,
    # 4 data, 5 the mmseg integration, 6 the benchmark
    "promptmatch.datasets": 4,
    "promptmatch.mmseg": 5, "promptmatch.registry": 5,
    # 5 the folder engine (mmengine's Runner without mmcv/mmseg): beside the mmseg integration
    "promptmatch.engine": 5,
    "promptmatch.benchmark": 6,
    # 7 entry points
    "promptmatch.demo": 7, "promptmatch.predict_cli": 7, "promptmatch.export_cli": 7,
    "promptmatch.tools": 7, "promptmatch.train": 7, "promptmatch.test": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str) -> str:
    if level == 0:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _import_graph() -> Dict[str, Set[str]]:
    mods = _modules()
    graph: Dict[str, Set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        targets: Set[str] = set()
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module or "")
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "promptmatch":
                    targets.add(name)
        graph[mod] = targets
    return graph


def _layer(module: str) -> int:
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_structure.py "
                             "and to docs/architecture.md")
    return best[1]


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_loops():
    assert _cycles(_import_graph()) == []


def test_cycle_finder_finds_a_loop():
    """The check above can fail: a made-up loop is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_go_only_downwards():
    graph = _import_graph()
    upward = [f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
              for mod, deps in sorted(graph.items()) if mod != "promptmatch"
              for dep in sorted(deps) if _layer(dep) > _layer(mod)]
    assert upward == []


def test_every_module_has_a_layer():
    for mod in _modules():
        if mod != "promptmatch":
            _layer(mod)


@pytest.mark.parametrize("limit_class, limit_module", [(250, 500)])
def test_no_oversized_class_or_module(limit_class, limit_module):
    too_big = []
    for mod, path in _modules().items():
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n") + 1
        if lines > limit_module:
            too_big.append(f"module {mod}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit_class:
                too_big.append(f"class {mod}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []


def test_tools_do_not_edit_sys_path():
    edits = [p.name for p in sorted((ROOT / "tools").glob("*.py")) if "sys.path" in p.read_text(encoding="utf-8")]
    assert edits == []
