"""Grouped matrix multiply: rows sorted by expert, each group times its own expert's weight, read in place.

The gather path of `StackedExperts` runs each token through its chosen experts. Reading the chosen
weights with `index_select` copies them ([S k, d, f] floats: write + read again on top of the one
read a decode step needs); this op reads each used expert's weight once, where it lives:

    grouped_mm(x [N, d], w [G, d, f], offs [G] int32) -> [N, f]
        rows offs[g-1] .. offs[g] (offs[-1] = 0) of x times w[g]; rows past offs[G-1] are zero.

Implementations: `torch.nn.functional.grouped_mm` (one grouped GEMM, no host synchronisation) for
bf16 on CUDA and for fp32 / bf16 on the CPU, where it gives the per-group products bit for bit in
one call; everywhere else (other dtypes, unaligned views) one `torch.mm` per non-empty group,
concatenated, after reading the G offsets on the host (free on the CPU; on CUDA it synchronises,
so `StackedExperts` keeps its copy-free path to the CPU and bf16 CUDA: `copy_free`). The op has a
fake implementation (torch's own meta function accepts only bf16, so fp32 graphs could not be
traced through `F.grouped_mm`) and an autograd formula written with the same op and its weight
gradient, so graphs with it export, compile and train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .gating_ops import plain_eager

__all__ = ["grouped_mm", "copy_free"]


def _aligned(*tensors: Tensor) -> bool:
    """torch's grouped GEMM wants 16-byte aligned strides and data."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s, n in zip(t.stride(), t.shape) if n > 1 and s != 1):
            return False
    return True


def copy_free(x: Tensor) -> bool:
    """Whether `grouped_mm` runs on x's device and dtype without a host synchronisation."""
    return x.device.type == "cpu" or (x.is_cuda and x.dtype == torch.bfloat16)


def _groups(offs: Tensor):
    """(group, first row, end row) of every non-empty group, from the offsets read on the host."""
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            yield g, start, end
        start = max(start, end)


_NATIVE = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16)}   # dtypes F.grouped_mm takes


def _grouped_mm_impl(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    if x.dtype in _NATIVE.get(x.device.type, ()) and w.dtype == x.dtype and _aligned(x, w):
        N = int(x.shape[0])
        out = F.grouped_mm(x, w, offs=offs)[:N]
        # F.grouped_mm leaves the rows past the last group unwritten; the contract says zero
        if x.device.type == "cpu":
            end = int(offs[-1])                   # free on the CPU
            return out if end >= N else torch.cat([out[:end], out.new_zeros(N - end, out.shape[1])])
        return torch.where((torch.arange(N, device=x.device) < offs[-1])[:, None], out, 0)   # no host sync
    # one mm per used expert, concatenated (mm into views of a zeroed output is ~10% slower at batch 1)
    parts, covered = [], 0
    for g, start, end in _groups(offs):
        parts.append(torch.mm(x[start:end], w[g]))
        covered = end
    if covered < x.shape[0] or not parts:
        parts.append(x.new_zeros(x.shape[0] - covered, w.shape[2]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.library.custom_op("moefx::grouped_mm", mutates_args=())
def _grouped_mm_op(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return _grouped_mm_impl(x, w, offs)


_grouped_mm_op.register_fake(lambda x, w, offs: x.new_empty(x.shape[0], w.shape[2]))


@torch.library.custom_op("moefx::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x: Tensor, grad: Tensor, offs: Tensor, groups: int) -> Tensor:
    """[G, d, f]: for each group g, x[rows of g].T @ grad[rows of g] (zero for empty groups)."""
    out = x.new_zeros(groups, x.shape[1], grad.shape[1])
    for g, start, end in _groups(offs):
        torch.mm(x[start:end].t(), grad[start:end], out=out[g])
    return out


_weight_grad_op.register_fake(lambda x, grad, offs, groups: x.new_empty(groups, x.shape[1], grad.shape[1]))


def _setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    gx = _grouped_mm_op(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gw = _weight_grad_op(x, grad, offs, w.shape[0]) if ctx.needs_input_grad[1] else None
    return gx, gw, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x [N, d] with rows sorted by group, w [G, d, f], offs [G] int32 (cumulative group ends) -> [N, f].

    Calls the implementation directly in plain eager inference (a custom op's Python dispatch costs
    about as much as a small matmul), the custom op otherwise (autograd, tracing, compile)."""
    if plain_eager(x, w):
        return _grouped_mm_impl(x, w, offs)
    return _grouped_mm_op(x, w, offs)
