"""Triton kernels (import the submodules explicitly: `moefx.kernels.gating` needs triton).

gating      fused gate -> routing table, dispatch, combine, as torch.library custom ops
gating_ref  their plain PyTorch references
"""
