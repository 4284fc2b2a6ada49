"""Hierarchical all-to-all: lower each expert-parallel all-to-all to intra-node + inter-node steps.

Runs after partition. For every MoE layer whose EP group spans at least two whole nodes and whose
`parallel.hierarchical_a2a` is true (or "auto" and the cost model `moefx.runtime.cost` prefers
it for the estimated message size), the dispatch all-to-all becomes

    hs = moe{L}.a2a_hier_splits(send, recv)           intra-node count exchange
    t  = layout_transform(rows, hs, "by_local")       (n', g') -> (g', n')
    t  = moe{L}.a2a_intra(t, *intra splits)           all-to-all inside the node
    t  = layout_transform(t, hs, "by_node")           (g, n') -> (n', g)
    x  = moe{L}.a2a_inter(t, *inter splits)           all-to-all across nodes (same local rank)

and the combine all-to-all the same steps in reverse. The tokens each expert sees are
bit-identical to the flat all-to-all's (`moefx.runtime.all_to_all`). Layers with a flat
decision, or EP groups inside one node, are left alone.
"""
from __future__ import annotations

import operator

from torch import fx

from .. import meta as M
from ..nn.moe import MoELayer, moe_layers
from ..runtime.collectives import AllToAll, HierarchicalSplits, hier_step_splits, layout_transform
from .infra import NodeBuilder, copy_graph_module

NAME = "hierarchical_a2a"


class HierarchicalA2A:
    """`HierarchicalA2A(resolved, groups, tokens_per_rank)(gm, plan)`; see the module docstring."""

    name = NAME

    def __init__(self, resolved, groups=None, tokens_per_rank: int = 4096):
        self.resolved, self.groups, self.tokens_per_rank = resolved, groups, tokens_per_rank

    def decide(self, index: int, mod: MoELayer) -> bool:
        """Whether MoE layer `index` uses the hierarchical all-to-all."""
        lp = self.resolved.layers[index]
        if lp.ep == 1 or lp.hier_shape is None or lp.hierarchical is False:
            return False
        g = mod.gate
        bytes_per_rank = self.tokens_per_rank * g.top_k * g.capacity_factor * mod.experts.d * 4
        return lp.use_hierarchical(bytes_per_rank)

    def __call__(self, gm: fx.GraphModule, plan) -> fx.GraphModule:
        chosen = [(layer, index, mod) for index, (layer, mod) in enumerate(moe_layers(gm)) if self.decide(index, mod)]
        if not chosen:
            return gm
        new = copy_graph_module(gm)
        counts = dict(new.meta.get("moefx_collectives", {}))
        for layer, index, mod in chosen:
            self._lower(new, layer, index, mod, counts)
        new.meta["moefx_collectives"] = counts
        new.meta["moefx_hierarchical_layers"] = [layer for layer, _, _ in chosen]
        new.graph.eliminate_dead_code()
        new.recompile()
        return new

    def _lower(self, gm: fx.GraphModule, layer: int, index: int, mod: MoELayer, counts: dict) -> None:
        lp = self.resolved.layers[index]
        nodes, per_node = lp.hier_shape
        intra_name, inter_name = lp.group_names["intra"], lp.group_names["inter"]
        lg = self.groups.layer(index) if self.groups is not None else None
        intra, inter = (lg.intra, lg.inter) if lg is not None else (None, None)
        gm.add_submodule(f"moe{layer}", mod.replaced(
            a2a_hier_splits=HierarchicalSplits(intra, intra_name, nodes, per_node),
            a2a_intra=AllToAll(intra, intra_name), a2a_inter=AllToAll(inter, inter_name)))
        p = f"moe{layer}"
        find = lambda d: next(n for n in gm.graph.nodes  # noqa: E731
                              if n.meta.get(M.LAYER) == layer and n.meta.get("moefx_a2a") == d)
        disp, comb = find("dispatch"), find("combine")
        rows, send, recv = disp.args
        block = disp.meta.get(M.BLOCK)

        b = NodeBuilder(gm.graph, disp.prev, NAME, layer, block)
        hs = b("call_module", f"{p}.a2a_hier_splits", (send, recv), role="collective")
        t = b("call_function", layout_transform, (rows, hs, "by_local"), role="layout")
        sp = b("call_function", hier_step_splits, (hs, "intra"), role="layout")
        t = b("call_module", f"{p}.a2a_intra", (t, b("call_function", operator.getitem, (sp, 0)),
                                                b("call_function", operator.getitem, (sp, 1))), role="collective")
        intra_d = t
        t = b("call_function", layout_transform, (t, hs, "by_node"), role="layout")
        sp2 = b("call_function", hier_step_splits, (hs, "inter"), role="layout")
        s0 = b("call_function", operator.getitem, (sp2, 0))
        s1 = b("call_function", operator.getitem, (sp2, 1))
        x = b("call_module", f"{p}.a2a_inter", (t, s0, s1), role="collective")
        inter_d = x
        disp.replace_all_uses_with(x)
        gm.graph.erase_node(disp)

        y_rows = comb.args[0]
        b = NodeBuilder(gm.graph, comb.prev, NAME, layer, block)
        z = b("call_module", f"{p}.a2a_inter", (y_rows, s1, s0), role="collective")
        inter_c = z
        z = b("call_function", layout_transform, (z, hs, "by_node", True), role="layout")
        i0 = b("call_function", operator.getitem, (sp, 0))
        i1 = b("call_function", operator.getitem, (sp, 1))
        z = b("call_module", f"{p}.a2a_intra", (z, i1, i0), role="collective")
        intra_c = z
        z = b("call_function", layout_transform, (z, hs, "by_local", True), role="layout")
        comb.replace_all_uses_with(z)
        gm.graph.erase_node(comb)

        ep_name = f"ep{lp.ep}"
        counts[ep_name] = counts.get(ep_name, 0) - 2
        for n, name, direction in ((hs, intra_name, "counts"), (intra_d, intra_name, "dispatch"),
                                   (inter_d, inter_name, "dispatch"), (inter_c, inter_name, "combine"),
                                   (intra_c, intra_name, "combine")):
            n.meta[M.GROUP] = name
            n.meta["moefx_a2a_step"] = direction
            counts[name] = counts.get(name, 0) + 1
