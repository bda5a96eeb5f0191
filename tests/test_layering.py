"""The import graph of elastic/ has no upward arrows and no cycles.

Layers, lowest first. A module may import its own layer and the ones below; within a layer, different
packages may import each other only where no cycle forms. Lazy (function-level) imports count too: they
are the same dependency, only later.
"""
from __future__ import annotations

import ast
from pathlib import Path

import elastic

ROOT = Path(elastic.__file__).parent
KERNELS_ROOT = ROOT.parent / "kernels"  # installed as elastic.kernels

LAYERS: list[tuple[str, ...]] = [
    # plain data and settings every process shares
    ("config", "protocol", "logger", "parent_watch", "sampling_params", "outputs", "tokenizer", "transport"),
    ("validation", "request", "metrics", "forward_context"),
    ("kernels",),
    ("layers",),
    ("distributed",),
    ("models",),
    ("eplb",),
    ("executor",),
    ("engine",),  # the engine-core process
    ("cluster",),  # launcher and DP coordinator (start engine processes)
    ("frontend",),  # the API-server process's engine client
    ("elastic_ep",),  # scaling orchestration
    ("fault",),  # fault recovery: detection and policy, driving elastic_ep's orchestrator
    ("autoscale",),  # the scaling policy: an HTTP client of the server (see FORBIDDEN)
    ("entrypoints", "demo", "__main__", "__init__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# Sibling processes that must not know each other's code, whatever their ranks.
FORBIDDEN = {("frontend", "engine"), ("cluster", "frontend"), ("engine", "cluster")}
# The autoscaler talks HTTP to a server it may not run beside: none of the server's code.
FORBIDDEN |= {("autoscale", unit) for unit in ("engine", "cluster", "frontend", "elastic_ep", "fault", "executor", "models",
                                              "layers", "distributed", "eplb", "kernels", "metrics")}


def _unit(module: str) -> str:
    """'elastic.engine.core' -> 'engine'; 'elastic' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, base: Path, prefix: str) -> str:
    rel = path.relative_to(base).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([prefix, *parts])


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                package = module.split(".")[:-node.level + (1 if path.name == "__init__.py" else 0) or None]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "elastic" or m.startswith("elastic.")}


def _graph() -> dict[str, set[str]]:
    modules = {}
    for base, prefix in ((ROOT, "elastic"), (KERNELS_ROOT, "elastic.kernels")):
        for path in base.rglob("*.py"):
            modules[_module_name(path, base, prefix)] = path
    graph = {}
    for name, path in modules.items():
        # `from elastic.x import y` names module elastic.x.y only when that module exists.
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def test_every_package_has_a_layer() -> None:
    units = {_unit(m) for m in _graph()}
    assert units <= set(RANK), f"packages without a layer: {sorted(units - set(RANK))}"


def test_no_upward_imports() -> None:
    bad = []
    for module, deps in _graph().items():
        for dep in deps:
            src, dst = _unit(module), _unit(dep)
            if dst == "__init__" or src == dst:
                continue
            if RANK[dst] > RANK[src] or (src, dst) in FORBIDDEN:
                bad.append(f"{module} -> {dep}")
    assert not bad, "upward or cross-process imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        for dep in deps:
            if _unit(dep) != _unit(module) and _unit(dep) != "__init__":
                edges.setdefault(_unit(module), set()).add(_unit(dep))
    cycles = [(a, b) for a, targets in edges.items() for b in targets if a in _reachable(edges, b)]
    assert not cycles, f"package import cycles: {cycles}"


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    cycles = [(a, b) for a, deps in graph.items() for b in deps if a in _reachable(graph, b)]
    assert not cycles, f"module import cycles: {sorted(cycles)[:10]}"


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_package_is_installed() -> None:
    """pyproject lists packages explicitly (kernels/ installs as elastic.kernels): a new folder must be added."""
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(["elastic", *p.parent.relative_to(ROOT).parts]) for p in ROOT.rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject's packages: {sorted(on_disk - listed)}"
