"""Lower gating: choose the implementation of every route / dispatch / combine node.

Runs after pr_moe (and shrink), stage "convert". Requires: MoE layers. Provides: gating lowered.
`plan.lowering.gating`: "auto" picks Triton when the MoE layer's weights live on a CUDA device
and triton is importable, else the PyTorch path; "triton" or "torch" force one. Forcing Triton
where it cannot run raises BackendError here, before any forward (set TRITON_INTERPRET=1 to run
the Triton kernels on the CPU interpreter). Records the choice in node.meta["moefx_impl"] (shown
by `moefx dump`), in the dispatch / combine nodes' `impl` argument and on the gate module.
"""
from __future__ import annotations

from torch import fx

from .. import meta as M
from ..nn.routing import resolve_impl
from .base import Pass, PassContext
from .conditions import GATING_LOWERED, MOE_LAYERS
from .graph import copy_graph_module

NAME = "lower_gating"
_ROLES = ("route", "dispatch", "combine")


class LowerGating(Pass):
    """Set impl="torch"/"triton" on each gating node (see the module docstring)."""

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
            impl = resolve_impl(wanted, layer_mod.router.weight.device)
            if role == "route":
                gate = layer_mod.gate.with_options(impl=impl)
                new.add_submodule(f"moe{node.meta[M.LAYER]}", layer_mod.replaced(gate=gate))
            else:
                node.kwargs = {**node.kwargs, "impl": impl}
            node.meta[M.IMPL] = impl
            lowered += 1
        new.meta["moefx_counters"] = {**new.meta.get("moefx_counters", {}), NAME: lowered}
        return new


LOWER_GATING = LowerGating()
