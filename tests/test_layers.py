"""The import graph of polca: no cycle, and no module imports a higher layer (ARCHITECTURE).

Every import counts, also those inside functions (a lazy import hides a cycle, it does not
remove it). Layers, lowest first:

kernels < sources < contract < parallel < stages < face
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {
    "kernels": ["functional", "directional", "curvature", "bases", "decompose", "cluster",
                "evaluate", "label", "measures", "findings", "precision", "signal"],
    "sources": ["config", "tasks", "models", "byo", "corpus", "probes", "sources"],
    # progress: how work on the run directory is told (bars, resume lines), no polca import
    "contract": ["atomic", "store", "checkpoints", "progress"],
    "parallel": ["parallel", "ray_executor"],
    "stages": ["stages", "train"],
    "face": ["api", "cli", "report", "__init__"],
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "polca").rglob("*.py"))}


def layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else "__init__"
    for name, members in LAYERS.items():
        if top in members:
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def imports(source: str, own: str, known: set[str]) -> set[str]:
    """The polca modules the code ``source`` of module ``own`` imports (``from polca.x import
    y`` counts ``polca.x.y`` when that is a module, else ``polca.x``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                     else node.module for alias in node.names]
        else:
            continue
        found |= {n for n in names if n == "polca" or n.startswith("polca.")}
    return found - {own}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path.read_text(), name, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer():
    assert all(layer(name) in LAYERS for name in modules())  # layer() names a stray module


def test_no_module_imports_a_higher_layer():
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})"
             for a, targets in graph().items() for b in sorted(targets)
             if RANK[layer(b)] > RANK[layer(a)]]
    assert not wrong, "\n".join(wrong)


def test_the_report_reads_only_through_the_contract():
    wrong = [f"{a} imports {b}" for a, targets in graph().items() if a.startswith("polca.report")
             for b in targets if layer(b) in ("stages", "parallel")]
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walker_sees_lazy_imports_and_submodules():
    known = {"polca.store", "polca.report", "polca.report.html"}
    source = "import polca.store\ndef f():\n    from polca.report import html, Page\n"
    assert imports(source, "polca.cli", known) == {"polca.store", "polca.report.html",
                                                    "polca.report"}
    assert RANK[layer("polca.report.html")] > RANK[layer("polca.store")]
