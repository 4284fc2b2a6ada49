"""Pass contract and pipeline runner.

A pass is a callable `(gm, plan) -> GraphModule` with a `name`. It never mutates its input: it
builds a new GraphModule (sharing unchanged parameters) and returns it, or returns the input
object itself when it changes nothing. The runner checks every result (`graph.lint()` plus
moefx's invariants), records provenance in `gm.meta["moefx_passes"]` and, when asked, writes a
numbered dump of the code after each pass (`NNN_name.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from torch import fx

from .. import meta as M
from ..capture import mark_captured
from ..errors import PassError
from ..fileio import write_atomic


class Pass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule, plan) -> fx.GraphModule: ...


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph (same node names, parameters shared)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen  # in/out pytree specs: read-only, safe to share
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name, child in gm.named_children():
        if getattr(child, "_moefx_keep", False):  # keep moefx containers whole, not rebuilt as plain Modules
            new.add_submodule(name, child)
    new.meta = dict(getattr(gm, "meta", {}))
    for name, value in vars(gm).items():
        if name.startswith("_moefx"):
            setattr(new, name, value)
    return mark_captured(new)


class NodeBuilder:
    """Inserts nodes one after another (starting after `after`), tagging each with provenance."""

    def __init__(self, graph: fx.Graph, after: fx.Node, pass_name: str, layer: int | None = None,
                 block: int | None = None):
        self.graph, self.cursor, self.pass_name, self.layer, self.block = graph, after, pass_name, layer, block
        self.created: list[fx.Node] = []

    def __call__(self, op: str, target, args, kwargs=None, role: str | None = None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.create_node(op, target, tuple(args), kwargs or {})
        self.cursor = node
        self.created.append(node)
        return M.tag(node, self.pass_name, role, self.layer, self.block)


def verify(gm: fx.GraphModule) -> None:
    """graph.lint() plus moefx invariants; raises AssertionError / RuntimeError on violation."""
    gm.graph.lint()
    dispatches = [n for n in gm.graph.nodes if n.meta.get(M.ROLE) == "dispatch"]
    combines = [n for n in gm.graph.nodes if n.meta.get(M.ROLE) == "combine"]
    layers_d = sorted(n.meta.get(M.LAYER) for n in dispatches)
    layers_c = sorted(n.meta.get(M.LAYER) for n in combines)
    if layers_d != layers_c:
        raise AssertionError(f"every dispatch needs its combine: dispatch layers {layers_d}, combine layers {layers_c}")
    a2a: dict = {}
    for n in gm.graph.nodes:
        step = n.meta.get("moefx_a2a") or n.meta.get("moefx_a2a_step")
        if step in ("dispatch", "combine"):
            a2a.setdefault((n.meta.get(M.LAYER), n.meta.get(M.GROUP)), []).append(step)
    for key, steps in a2a.items():
        if steps.count("dispatch") != steps.count("combine"):
            raise AssertionError(f"all-to-all of layer {key[0]} on group {key[1]}: {steps.count('dispatch')} "
                                 f"dispatch vs {steps.count('combine')} combine steps")
    for n in gm.graph.nodes:
        if n.meta.get(M.ROLE) in M.CREATED_ROLES and M.PASS not in n.meta:
            raise AssertionError(f"node {n.name} has role {n.meta[M.ROLE]!r} but no {M.PASS!r} provenance")
    for n in gm.graph.nodes:
        if n.op == "call_module":
            gm.get_submodule(n.target)


def run_pipeline(gm: fx.GraphModule, plan, passes: list[Pass], *, dump_dir: str | Path | None = None,
                 check: Callable[[fx.GraphModule], None] = verify) -> fx.GraphModule:
    """Run `passes` in order, skipping names in plan.disable; verify after each one."""
    ran: list[str] = []
    disabled = set(getattr(plan, "disable", ()) or ())
    if dump_dir is not None:
        _dump(dump_dir, 0, "captured", gm)
    for i, p in enumerate(passes, start=1):
        if p.name in disabled:
            continue
        try:
            out = p(gm, plan)
            out.recompile()
            check(out)
        except PassError:
            raise
        except Exception as e:
            raise PassError(f"pass {p.name!r} failed (passes run before it: {ran or 'none'}): "
                            f"{type(e).__name__}: {e}") from e
        if out is not gm:
            out.meta = dict(getattr(out, "meta", {}))
            out.meta["moefx_passes"] = [*gm.meta.get("moefx_passes", []), p.name]
        gm = out
        ran.append(p.name)
        if dump_dir is not None:
            _dump(dump_dir, i, p.name, gm)
    return gm


def _dump(dump_dir, index: int, name: str, gm: fx.GraphModule) -> None:
    path = Path(dump_dir)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / f"{index:03d}_{name}.py", gm.code)
