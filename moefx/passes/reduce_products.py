"""Lower a compiled decode step's few-row matrix products to reductions (CPU decoding).

Not a pipeline pass: `Generator.compile` runs it on the decode graph it hands to torch.compile,
never on the graphs moefx runs eagerly (run eagerly the rewritten products materialise
[rows, out, in]; see `moefx.nn.products`).

    reduce_products(gm, max_rows) -> GraphModule

Input: a captured graph with static shapes. Output: a new GraphModule over a copy of the graph
that shares every parameter and module of gm, except that
- every `aten.linear(x, W[, b])` whose weight W is a 2-D parameter (get_attr) and whose x has at
  most max_rows rows (the product of its leading sizes) calls `moefx.nn.products.linear_by_reduction`;
- every gather-path `StackedExperts` call (meta PATH "gather") with at most max_rows routed rows
  (tokens x k) runs a copy of its module with `products = "reduce"` (`StackedExperts.with_products`:
  the same parameters), installed in a shallow copy of its MoE layer (`MoELayer.replaced`).
What changed is recorded in `facts(out).reduced_products` ({"linears": n, "experts": [layer, ...]}).
The products sum in a different order than MKL's (a few ulps). `REDUCE_MAX_ROWS` is where the
reduction stops beating MKL on this project's CPU (`benchmarks/results/gemv_layout_cpu.md`).
"""
from __future__ import annotations

import torch
from torch import fx

from .. import meta as M
from ..analysis.linear import attr_value
from ..facts import record_facts
from ..nn.experts import StackedExperts
from ..nn.moe import MoELayer
from ..nn.products import linear_by_reduction
from .base import verify
from .graph import copy_graph_module

REDUCE_MAX_ROWS = 2
_SAME_NUMEL = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.flatten.using_ints,
               torch.ops.aten.contiguous.default, torch.ops.aten.clone.default}


def _numel(node) -> int | None:
    """Static element count of node's value, through the reshapes a pass inserted without metadata."""
    while isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            n = val.numel()
            return n if isinstance(n, int) else None
        if node.op != "call_function" or node.target not in _SAME_NUMEL or not node.args:
            return None
        node = node.args[0]
    return None


def _weight_param(gm: fx.GraphModule, node) -> torch.nn.Parameter | None:
    """The 2-D parameter a get_attr node reads, else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    t = attr_value(gm, node.target)
    return t if isinstance(t, torch.nn.Parameter) and t.dim() == 2 else None


def reduce_products(gm: fx.GraphModule, max_rows: int = REDUCE_MAX_ROWS, experts: bool = True) -> fx.GraphModule:
    """See the module docstring: gm (unchanged) -> a new GraphModule with its small products as
    reductions (experts=False: the linears only)."""
    new = copy_graph_module(gm)
    linears = 0
    for node in list(new.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            w, numel = _weight_param(new, node.args[1]), _numel(node.args[0])
            if w is not None and numel is not None and numel // w.shape[1] <= max_rows:   # rows of x [..., in]
                node.target = linear_by_reduction
                linears += 1
    experts_layers = []
    for node in new.graph.nodes if experts else ():
        if node.op != "call_module" or node.meta.get(M.PATH) != "gather":
            continue
        mod = new.get_submodule(node.target)
        parent, _, child = node.target.rpartition(".")
        layer = new.get_submodule(parent) if parent else None
        if not isinstance(mod, StackedExperts) or not isinstance(layer, MoELayer):   # kept whole by the copy
            continue
        numel = _numel(node.args[0])
        if numel is None or numel // mod.d * layer.gate.top_k > max_rows:   # routed rows: tokens x k
            continue
        new.add_submodule(parent, layer.replaced(**{child: mod.with_products("reduce")}))
        experts_layers.append(node.meta.get(M.LAYER))
    record_facts(new, reduced_products={"linears": linears, "experts": experts_layers})
    new.recompile()
    verify(new)
    return new
