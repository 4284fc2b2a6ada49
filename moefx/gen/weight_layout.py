"""Weight layout for decoding on the CPU: the longer of a matrix's two dimensions contiguous.

A decode step at a small batch multiplies a few rows by every weight matrix once, so it runs at
the rate the CPU streams a matrix through a matrix-vector product. That rate depends on the
layout, not on the op: with one thread, a [2048, 512] matrix whose rows are 512 floats streams at
about half the rate of the same matrix stored with rows of 2048 floats, whether it is read as
`F.linear(x, W)` or `x @ W` (`benchmarks/bench_gemv_layout_cpu.py`). nn.Linear stores [out, in],
so every up projection (and a tied embedding / LM head, [vocab, d]) has the slow layout.

The gain is a matrix-vector product's: with 4 or more rows per product MKL runs a small matrix
product whose speed the layout hardly changes (0.9-1.1x either way), so "auto" re-strides only
for decode steps of at most `LONG_ROWS_MAX_TOKENS` tokens.

`long_rows(module)` re-strides such parameters in place: same Parameter objects (graphs, tied
uses and optimizers keep pointing at them), same shapes and values, only the memory order of the
last two dimensions swapped so the longer one is contiguous. Every op reads strided weights (the
BLAS calls take a transposed operand at no cost; an embedding lookup gathers a strided column),
so graphs run unchanged. Matrix products may sum in a different order (differences of a few
ulps). Saving makes tensors contiguous again (`moefx.save`).
"""
from __future__ import annotations

import torch
from torch import nn

LAYOUTS = ("auto", "long_rows", "keep")
LONG_ROWS_MAX_TOKENS = 2   # rows per decode step up to which "auto" picks long rows (see above)


def short_rows(t: torch.Tensor) -> bool:
    """Whether t is a contiguous floating matrix (or stack of them) whose rows are its shorter
    dimension: the layout `long_rows` changes."""
    return (t.dim() >= 2 and t.is_floating_point() and t.is_contiguous() and t.shape[-1] < t.shape[-2]
            and t.shape[-1] > 1)


def long_rows(module: nn.Module) -> int:
    """Re-stride, in place, every parameter of `module` that has `short_rows` so that its longer
    dimension is contiguous (see the module docstring). Returns how many it changed."""
    changed = 0
    with torch.no_grad():
        for p in module.parameters():   # each tensor once (tied parameters are yielded once)
            if short_rows(p):
                p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
                changed += 1
    return changed


def resolve(layout: str, device: torch.device, tokens: int = 1) -> str:
    """The layout to use for decode steps of `tokens` rows on `device`: "auto" is "long_rows" on the
    CPU for at most LONG_ROWS_MAX_TOKENS rows, else "keep" (GPU matrix products are not bound by
    this, and some kernels want row-major weights)."""
    if layout not in LAYOUTS:
        raise ValueError(f"weight_layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == "auto":
        return "long_rows" if device.type == "cpu" and tokens <= LONG_ROWS_MAX_TOKENS else "keep"
    return layout
