"""The conditions passes require and provide (see `moefx.passes.base.Condition`)."""
from __future__ import annotations

from .. import meta as M
from ..analysis.blocks import find_blocks
from ..analysis.ffn import find_ffns
from ..facts import facts
from ..nn.moe import moe_layers
from .base import Condition

_GATING_ROLES = ("route", "dispatch", "combine")


def _gating_lowered(gm) -> bool:
    nodes = [n for n in gm.graph.nodes if n.meta.get(M.ROLE) in _GATING_ROLES]
    return bool(nodes) and all(M.IMPL in n.meta for n in nodes)


def _experts_placed(gm) -> bool:
    """Read off the graph against the resolved degrees: every MoE layer holds experts_per_rank experts,
    and a layer with ep > 1 has an all-to-all dispatch step."""
    resolved = facts(gm).parallel
    layers = moe_layers(gm)
    if resolved is None or len(layers) != len(resolved.layers):
        return False
    dispatched = {n.meta.get(M.LAYER) for n in gm.graph.nodes if n.meta.get(M.A2A) == "dispatch"}
    return all(mod.experts.num_experts == lp.experts_per_rank and (lp.ep == 1 or layer in dispatched)
               for (layer, mod), lp in zip(layers, resolved.layers))


FFNS = Condition("ffns_found", "the graph has position-wise FFN regions (see moefx.find_ffns(gm))",
                 lambda gm: bool(find_ffns(gm)), input=True)
BLOCKS = Condition("blocks_found", "the graph has Transformer blocks on a residual stream (see moefx.find_blocks(gm))",
                   lambda gm: bool(find_blocks(gm)), input=True)
MOE_LAYERS = Condition("moe_layers", "the graph has MoE layers (moe{L} submodules, made by pr_moe)",
                       lambda gm: bool(moe_layers(gm)))
GATING_LOWERED = Condition("gating_lowered", "every route / dispatch / combine node has its implementation chosen "
                           "(by lower_gating)", _gating_lowered)
EXPERTS_PLACED = Condition("experts_placed", "the MoE layers are partitioned over their expert-parallel ranks "
                           "(by expert_parallel): each holds this rank's experts, and an expert-parallel layer "
                           "dispatches through an all-to-all", _experts_placed)
