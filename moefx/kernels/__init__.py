"""Triton kernels (import the submodules explicitly: `moefx.kernels.gating` needs triton).

gating  fused gate -> routing table, dispatch, combine, route_dot launchers; their PyTorch
        references are `moefx.nn.table`, the custom ops a graph calls `moefx.nn.gating_ops`.
"""
