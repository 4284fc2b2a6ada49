"""The package's import graph: no cycles between modules nor between packages (imports inside
functions count too), function-local imports only for optional dependencies, and `import moefx`
loads no launch or runtime code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moefx"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        is_pkg = path.name == "__init__.py"
        out[name[: -len(".__init__")] if is_pkg else name] = (path, is_pkg)
    return out


def _edges(mods) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (its own package's __init__ excluded)."""
    graph = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        base = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    root = ".".join(parts + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                targets = [root] + [f"{root}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    assert len(mods) > 40
    graph = _edges(mods)
    assert "moefx.nn.table" in graph["moefx.kernels.gating"] or "moefx.nn.table" in graph["moefx.nn.gating_ops"]
    assert _cycles(graph) == []


def _unit(module: str) -> str:
    """The package-level unit of a module: its subpackage (moefx.runtime for moefx.runtime.jobs.train)
    or, for a top-level module, itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _package_graph(graph) -> dict[str, set[str]]:
    """unit -> units it imports (the facade moefx/__init__.py left out: it re-exports everything)."""
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        if m == "moefx":
            continue
        u = _unit(m)
        out.setdefault(u, set())
        for t in targets:
            if t != "moefx" and _unit(t) != u:
                out[u].add(_unit(t))
    for targets in list(out.values()):
        for t in targets:
            out.setdefault(t, set())
    return out


def test_the_package_graph_has_no_cycle():
    pkgs = _package_graph(_edges(_modules()))
    assert {"moefx.runtime", "moefx.train", "moefx.dist", "moefx.distribute"} <= set(pkgs)
    assert "moefx.dist" in pkgs["moefx.runtime"] and "moefx.dist" in pkgs["moefx.train"]
    assert _cycles(pkgs) == []


def test_the_distributed_layer_sits_below_training_jobs_and_distribute():
    pkgs = _package_graph(_edges(_modules()))
    for above in ("moefx.runtime", "moefx.train", "moefx.distribute"):
        assert above not in pkgs["moefx.dist"], above


def test_a_package_cycle_would_be_found():
    graph = {"moefx.a.x": {"moefx.b.y"}, "moefx.b.y": set(), "moefx.b.z": {"moefx.a"}, "moefx.a": set()}
    assert _cycles(_package_graph(graph)) == [["moefx.a", "moefx.b"]]


# Imports inside functions only for dependencies a user may not have (or that are slow to load and
# needed on one path only): module -> the imported modules allowed there.
OPTIONAL_LOCAL = ("transformers", "triton", "tqdm", "numpy", "sympy", "ctypes", "importlib", "torch._inductor",
                  "torch._dynamo", "torch.distributed._functional_collectives", "moefx.kernels")


def _local_imports() -> list[tuple[str, int, str]]:
    out = []
    for m, (path, is_pkg) in _modules().items():
        base = m if is_pkg else m.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        parts = base.split(".")
                        names = [".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))]
                    else:
                        names = [node.module or ""]
                else:
                    continue
                out += [(m, node.lineno, n) for n in names]
    return out


def test_function_local_imports_are_only_for_optional_dependencies():
    local = _local_imports()
    assert any(n == "moefx.kernels" for _, _, n in local)       # the lazy Triton kernels are seen
    bad = [(m, line, n) for m, line, n in local if not n.startswith(OPTIONAL_LOCAL)]
    assert bad == [], bad


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_leaf_modules_import_no_runtime():
    graph = _edges(_modules())
    for leaf in ("moefx.nn.table", "moefx.nn.collectives", "moefx.nn.ep_layout", "moefx.placement", "moefx.plan",
                 "moefx.parallel"):
        assert not any(t.startswith("moefx.runtime") or t.startswith("moefx.passes") for t in graph[leaf]), leaf
    for name, targets in graph.items():
        if name.startswith("moefx.passes"):
            assert not any(t.startswith("moefx.runtime") for t in targets), (name, targets)


def test_import_moefx_loads_no_launch_code():
    code = ("import sys, moefx; print(sorted(m for m in sys.modules if m.startswith(('moefx.runtime', "
            "'torch.distributed.run', 'torch.distributed.elastic'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
