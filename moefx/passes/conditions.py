"""The conditions passes require and provide (see `moefx.passes.base.Condition`)."""
from __future__ import annotations

from .. import meta as M
from ..analysis.blocks import find_blocks
from ..analysis.ffn import find_ffns
from ..nn.moe import moe_layers
from .base import Condition

_GATING_ROLES = ("route", "dispatch", "combine")


def _gating_lowered(gm) -> bool:
    nodes = [n for n in gm.graph.nodes if n.meta.get(M.ROLE) in _GATING_ROLES]
    return bool(nodes) and all(M.IMPL in n.meta for n in nodes)


FFNS = Condition("ffns_found", "the graph has position-wise FFN regions (see moefx.find_ffns(gm))",
                 lambda gm: bool(find_ffns(gm)), input=True)
BLOCKS = Condition("blocks_found", "the graph has Transformer blocks on a residual stream (see moefx.find_blocks(gm))",
                   lambda gm: bool(find_blocks(gm)), input=True)
MOE_LAYERS = Condition("moe_layers", "the graph has MoE layers (moe{L} submodules, made by pr_moe)",
                       lambda gm: bool(moe_layers(gm)))
GATING_LOWERED = Condition("gating_lowered", "every route / dispatch / combine node has its implementation chosen "
                           "(by lower_gating)", _gating_lowered)
EXPERTS_PLACED = Condition("experts_placed", "the MoE layers are partitioned over their expert-parallel ranks "
                           "(by expert_parallel)", lambda gm: "moefx_expert_parallel" in getattr(gm, "meta", {}))
