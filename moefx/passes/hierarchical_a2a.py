"""Hierarchical all-to-all: lower each expert-parallel all-to-all to intra-node + inter-node steps.

Runs last in stage "distribute". Requires: experts placed (the EP all-to-all nodes). For every
MoE layer whose EP group spans at least two whole nodes and whose `parallel.hierarchical_a2a` is
true (or "auto" and the cost model, `ctx.profile` when measured, predicts it faster for the
layer's message size), the dispatch all-to-all becomes

    hs = hierarchical_splits(xc, ep_rank, N, G)      from the layer's split source (no extra sync)
    t  = hier_layout(rows, hs, "by_local")           (n', g') -> (g', n')
    t  = all_to_all(t, *hier_step(hs, "intra"))      all-to-all inside the node   [intra_node]
    t  = hier_layout(t, hs, "by_node")               (g, n') -> (n', g)
    x  = all_to_all(t, *hier_step(hs, "inter"))      all-to-all across nodes       [ep{n}_inter]

and the combine all-to-all the same steps in reverse. The rows each expert sees are
bit-identical to the flat all-to-all's. Layers with a flat decision, or EP groups inside one
node, are left alone.
"""
from __future__ import annotations

import operator

from torch import fx

from .. import meta as M
from ..cost import CostProfile
from ..facts import record_facts
from ..nn import collectives as C
from ..nn import ep_layout as L
from ..nn.moe import moe_layers
from .base import Pass, PassContext
from .conditions import EXPERTS_PLACED
from .expert_parallel import SPLITS_SOURCE
from .graph import NodeBuilder, copy_graph_module

NAME = "hierarchical_a2a"


class HierarchicalA2A(Pass):
    """Lower the chosen layers' all-to-alls to intra-node then inter-node steps."""

    name = NAME
    stage = "distribute"
    requires = (EXPERTS_PLACED,)

    def applies(self, ctx: PassContext) -> bool:
        pp = ctx.plan.parallel
        return pp is not None and pp.nodes > 1 and pp.hierarchical_a2a is not False

    def decide(self, ctx: PassContext, index: int, mod) -> bool:
        """Whether MoE layer `index` uses the hierarchical all-to-all."""
        lp = ctx.resolved.layers[index]
        if lp.ep == 1 or lp.hier_shape is None or lp.hierarchical is False:
            return False
        if lp.hierarchical is True:
            return True
        g = mod.gate
        tokens = ctx.tokens_per_rank / (ctx.resolved.tp if ctx.resolved.coordinated else 1)
        factor = g.capacity_factor if g.drop_tokens else 1.0
        elem = mod.experts.down_weight.element_size() if hasattr(mod.experts, "down_weight") else 4
        bytes_per_rank = tokens * g.top_k * factor * mod.experts.d * elem
        profile = ctx.profile or CostProfile()
        return profile.choose_hierarchical(bytes_per_rank, *lp.hier_shape)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        chosen = [(layer, index) for index, (layer, mod) in enumerate(moe_layers(gm)) if self.decide(ctx, index, mod)]
        if not chosen:
            return gm
        new = copy_graph_module(gm)
        for layer, index in chosen:
            _lower(new, ctx, layer, ctx.resolved.layers[index])
        record_facts(new, hierarchical_layers=tuple(layer for layer, _ in chosen))
        new.graph.eliminate_dead_code()
        return new


HIERARCHICAL_A2A = HierarchicalA2A()


def _lower(gm: fx.GraphModule, ctx: PassContext, layer: int, lp) -> None:
    nodes, per_node = lp.hier_shape
    intra, inter, ep_name = lp.group_names["intra"], lp.group_names["inter"], lp.group_names["ep"]
    by_name = {n.name: n for n in gm.graph.nodes}
    find = lambda d: next(n for n in gm.graph.nodes  # noqa: E731
                          if n.meta.get(M.LAYER) == layer and n.meta.get(M.A2A) == d and n.meta.get(M.GROUP) == ep_name)
    disp, comb = find("dispatch"), find("combine")
    source = by_name[disp.meta[SPLITS_SOURCE]]
    block = disp.meta.get(M.BLOCK)

    def a2a(b, x, splits, reverse: bool, group: str, step: str) -> fx.Node:
        send = b.fn(operator.getitem, splits, 0, role="layout")
        recv = b.fn(operator.getitem, splits, 1, role="layout")
        out, inp = (send, recv) if reverse else (recv, send)
        node = b.fn(C.ALL_TO_ALL, x, out, inp, group, role="collective", group=group)
        node.meta[M.A2A] = step
        return node

    b = NodeBuilder(gm.graph, disp.prev, NAME, layer, block)
    hs = b.fn(L.hierarchical_splits, source, lp.ep_rank(ctx.rank), nodes, per_node, role="layout")
    intra_splits = b.fn(L.hier_step, hs, "intra", role="layout")
    inter_splits = b.fn(L.hier_step, hs, "inter", role="layout")
    t = b.fn(L.hier_layout, disp.args[0], hs, "by_local", role="layout")
    t = a2a(b, t, intra_splits, False, intra, "dispatch")
    t = b.fn(L.hier_layout, t, hs, "by_node", role="layout")
    x = a2a(b, t, inter_splits, False, inter, "dispatch")
    disp.replace_all_uses_with(x)
    gm.graph.erase_node(disp)

    b = NodeBuilder(gm.graph, comb.prev, NAME, layer, block)
    z = a2a(b, comb.args[0], inter_splits, True, inter, "combine")
    z = b.fn(L.hier_layout, z, hs, "by_node", True, role="layout")
    z = a2a(b, z, intra_splits, True, intra, "combine")
    z = b.fn(L.hier_layout, z, hs, "by_local", True, role="layout")
    comb.replace_all_uses_with(z)
    gm.graph.erase_node(comb)
