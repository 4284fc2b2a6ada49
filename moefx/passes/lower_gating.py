"""Lower gating: choose the implementation of every route / dispatch / combine node, and how every
MoE layer runs its experts.

Runs after pr_moe (and shrink), stage "convert". Requires: MoE layers. Provides: gating lowered.

Implementations (`plan.lowering.gating`): "auto" picks Triton when the graph's target (the pass
context's `target`, else the device of the MoE layer's weights) is CUDA and triton is importable,
else the PyTorch path; "triton" or "torch" force one. A graph built on meta for a job is lowered
for the job's device: that is what runs.
Forcing Triton where it cannot run raises BackendError here, before any forward (set
TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter). The choice is recorded in
node.meta["moefx_impl"] (shown by `moefx dump`), in the dispatch / combine nodes' `impl`
argument and on the gate module.

Experts path (`plan.lowering.experts`), per layer: "buffer" keeps dispatch -> experts([E, C, d])
-> combine; "gather" rewrites it to

    y   = moe{L}.experts(tokens, routing.expert)    [S, k, d]: each token's k experts, by index
    out = moefx.gather_combine(y, routing.weight)   [S, d]

(static shapes, no capacity buffer, no host synchronisation: a decode step), and the layer's gate
skips the slot table when no choice can be dropped (`Gate.table`). "auto" picks gather
when the layer's token count S is static, S <= `gather_max_tokens` and the layer will not be
expert-parallel (its ep under plan.parallel is 1), else buffer (the gather path reads each used
expert once, in place: faster than the buffer path at decode batch 1, 8 and 32 with 8 experts,
benchmarks/results/generate_cpu.md). Recorded in the experts node's meta["moefx_experts_path"]
(shown by `moefx dump`).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from .. import meta as M
from ..errors import PlanError
from ..facts import facts, record_facts
from ..nn.moe import moe_layers
from ..nn.routing import gather_combine, resolve_impl
from ..parallel import validate_parallel
from .base import Pass, PassContext
from .conditions import GATING_LOWERED, MOE_LAYERS
from .graph import NodeBuilder, copy_graph_module

NAME = "lower_gating"
_ROLES = ("route", "dispatch", "combine")


class LowerGating(Pass):
    """Set impl="torch"/"triton" on each gating node and pick each layer's experts path."""

    name = NAME
    stage = "convert"
    requires = (MOE_LAYERS,)
    provides = (GATING_LOWERED,)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        wanted = ctx.plan.lowering.gating
        new = copy_graph_module(gm)
        lowered = 0
        for node in new.graph.nodes:
            role = node.meta.get(M.ROLE)
            if role not in _ROLES:
                continue
            layer_mod = new.get_submodule(f"moe{node.meta[M.LAYER]}")
            impl = resolve_impl(wanted, torch.device(ctx.target) if ctx.target else layer_mod.router.weight.device)
            if role == "route":
                gate = layer_mod.gate.with_options(impl=impl)
                new.add_submodule(f"moe{node.meta[M.LAYER]}", layer_mod.replaced(gate=gate))
            else:
                node.kwargs = {**node.kwargs, "impl": impl}
            node.meta[M.IMPL] = impl
            lowered += 1
        eps = _layer_eps(new, ctx)
        gathered = [layer for index, (layer, _) in enumerate(moe_layers(new))
                    if _path(new, layer, ctx, eps[index]) == "gather"]
        for layer in gathered:
            _to_gather(new, layer)
        record_facts(new, counters={**facts(new).counters, NAME: lowered})
        return new


LOWER_GATING = LowerGating()


def _layer_eps(gm: fx.GraphModule, ctx: PassContext) -> list[int]:
    """Each MoE layer's expert-parallel degree under the plan (1 without a [parallel] section)."""
    layers = moe_layers(gm)
    pp = ctx.plan.parallel
    if pp is None:
        return [1] * len(layers)
    resolved = validate_parallel(pp, pp.world_size, [m.num_experts for _, m in layers])
    return [lp.ep for lp in resolved.layers]


def _node(gm: fx.GraphModule, layer: int, role: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.meta.get(M.ROLE) == role and n.meta.get(M.LAYER) == layer)


def _path(gm: fx.GraphModule, layer: int, ctx: PassContext, ep: int) -> str:
    wanted = ctx.plan.lowering.experts
    tokens = _node(gm, layer, "dispatch").args[0]          # reshape(X, [-1, d]) of the FFN input X
    val = tokens.args[0].meta.get("val") if tokens.args and isinstance(tokens.args[0], fx.Node) else None
    lead = list(val.shape[:-1]) if val is not None else [None]
    static = all(isinstance(s, int) for s in lead)
    count = math.prod(lead) if static else None
    if wanted == "gather" and ep > 1:
        raise PlanError(f"lowering.experts = 'gather' but MoE layer {layer} is expert-parallel (ep = {ep}): the "
                        "gather path reads every expert's weights locally; use 'buffer' or 'auto' with ep > 1")
    if wanted in ("buffer", "gather"):
        return wanted
    few = static and count <= ctx.plan.lowering.gather_max_tokens
    return "gather" if few and ep == 1 else "buffer"


def _to_gather(gm: fx.GraphModule, layer: int) -> None:
    """dispatch -> experts(buf) -> combine  becomes  experts(tokens, expert) -> gather_combine."""
    disp, experts, comb = (_node(gm, layer, r) for r in ("dispatch", "experts", "combine"))
    tokens, routing = disp.args[0], disp.args[1]
    b = NodeBuilder(gm.graph, disp, NAME, layer, disp.meta.get(M.BLOCK))
    expert = b.fn(operator.getitem, routing, 0, role="layout")
    weight = b.fn(operator.getitem, routing, 2, role="layout")
    experts.args = (tokens, expert)
    mod = gm.get_submodule(f"moe{layer}")
    gm.add_submodule(f"moe{layer}", mod.replaced(gate=mod.gate.with_options(table=False)))
    experts.meta[M.PATH] = "gather"
    b.cursor = experts
    out = b.fn(gather_combine, experts, weight, role="combine")
    out.meta[M.PATH] = "gather"
    out.meta[M.IMPL] = comb.meta.get(M.IMPL, "torch")
    comb.replace_all_uses_with(out)
    gm.graph.erase_node(comb)
    gm.graph.erase_node(disp)
