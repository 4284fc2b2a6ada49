"""Matrix products of a few rows written as reductions, for compiled decode steps on the CPU.

A decode step at batch 1 multiplies one row by every weight matrix: a matrix-vector product, bound
by how fast the weights stream from memory. With one thread MKL streams a [2048, 512] matrix at
about 18 GB/s in its best layout, while the loop torch.compile (inductor) generates for
`(x[:, None, :] * W).sum(-1)`, a reduction over W's contiguous input dimension, streams it at
22-25 GB/s (1.23x at one row); at 2 rows the reduction is 0.93-1.31x MKL's time ratio by matrix,
and from 4 rows on MKL's matrix product wins (`benchmarks/results/gemv_layout_cpu.md`). Inside a
compiled decode step the reductions also fuse with their neighbours (bias, activation, residual)
and drop the experts' sort / offsets / custom op: the compiled batch-1 step runs 1.4-1.7x faster
than with MKL's products (`benchmarks/results/generate_cpu.md`). `moefx.passes.reduce_products` rewrites a compiled decode
graph's small linears to `linear_by_reduction` and switches its gather-path experts to
`rows_by_reduction`; `moefx.gen.weight_layout.input_contiguous` stores each of those weights
with the summed dimension contiguous.

Run eagerly these functions are correct but materialise the [rows, out, in] product: they are
for graphs that inductor compiles (CI runs them under aot_eager on tiny models). Run eagerly (or
under aot_eager) a bf16 reduction also rounds each product to bf16 before summing, which
inductor and MKL do not.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["realized", "linear_by_reduction", "rows_by_reduction"]


def realized(x: Tensor) -> Tensor:
    """x, materialised in memory before the reduction that reads it.

    Without this inductor inlines x's producer (a layer norm, an activation) into the reduction's
    loop, recomputing it for every output element: a gelu on x [in] then runs out * in times
    instead of in times.
    `prims.inductor_force_stride_order` is inductor's own realisation point (a no-op copy elsewhere).
    """
    from torch._inductor import inductor_prims  # noqa: F401  (registers the prim; already imported when compiling)

    return torch.ops.prims.inductor_force_stride_order.default(x, list(x.stride()))


def linear_by_reduction(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) (x [..., in], weight [out, in]) as a sum over `in` of x * weight."""
    out = (realized(x).unsqueeze(-2) * weight).sum(-1)
    return out if bias is None else out + bias


def rows_by_reduction(x: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    """x [N, d], w [G, d, f], idx [N] -> [N, f]: row n times w[idx[n]], as a sum over d (the index
    is fused into the reduction's loads: no weight is copied; each row reads its own matrix)."""
    return (realized(x).unsqueeze(-1) * w[idx]).sum(1)
