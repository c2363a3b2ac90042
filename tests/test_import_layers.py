"""Imports flow one way: every package imports only packages of lower layers, and no two modules
import each other (directly or around a loop), counting imports inside functions too.

The layers (lowest first) are the ones docs/architecture.md draws; a package may use any package
below it and none above or beside it. The check reads the source with `ast` (nothing is
imported), so it also sees lazy imports, which break loops at run time but not in the design.
It fails naming each offending edge (`file: package -> package`) or cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("megatron_navil", "checkpoint_tools", "data_tools")

LAYERS = [
    {"errors"},
    {"backbones"},
    {"config"},
    {"utils"},
    {"geometry"},
    {"pack_meta"},
    {"batch"},
    {"data", "checkpoint"},
    {"models", "reference"},
    {"conversion", "inference"},
    {"training"},
    {"scaling"},
    {"cli"},
    {"checkpoint_tools", "data_tools"},
]
"""Package layers, lowest first: `megatron_navil.<name>` or a top-level tool directory."""

RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in TOP:
        for f in (ROOT / top).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `module` imports anywhere in its body (`from pkg import mod` counts mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known and n != module and not module.startswith(n + ".")}
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "megatron_navil":
        return parts[1] if len(parts) > 1 else "megatron_navil"
    return parts[0]


def _graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = _modules()
    return mods, {m: _imported(m, p, set(mods)) for m, p in mods.items()}


def test_every_package_has_a_layer():
    mods, _ = _graph()
    unplaced = sorted({_package(m) for m in mods} - set(RANK) - {"megatron_navil"})
    assert not unplaced, (
        f"packages without a layer (add them to LAYERS and the diagram): {unplaced}"
    )


def test_packages_import_only_lower_layers():
    mods, graph = _graph()
    bad = []
    for m, deps in graph.items():
        src = _package(m)
        for d in deps:
            dst = _package(d)
            if src == dst or "megatron_navil" in (src, dst):
                continue  # within a package (cycles checked below); the root __init__ is empty
            if RANK[dst] >= RANK[src]:
                bad.append(f"{mods[m].relative_to(ROOT)}: {src} -> {dst}")
    assert not bad, "imports against the layer order:\n  " + "\n  ".join(sorted(bad))


def test_no_import_cycles_between_modules():
    mods, graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other: " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The checker itself: an import inside a function body is an edge like any other."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from megatron_navil.training import trainer\n")
    known = {"megatron_navil.training", "megatron_navil.training.trainer"}
    assert _imported("megatron_navil.config.m", f, known) == known
