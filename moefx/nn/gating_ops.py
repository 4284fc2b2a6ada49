"""The gating custom ops a rewritten graph calls: gate table, dispatch, combine, route_dot.

Ops (namespace "moefx"), each with a fake (meta) implementation and an autograd formula written
with the same ops, so graphs containing them export, trace, compile and differentiate twice:

    gate_table(logits, top_k, capacity, impl)          -> expert, slot, counts
    dispatch_tokens(tokens, expert, slot, counts, scale, num_experts, capacity, impl) -> [E, C, d]
    combine_tokens(expert_out, expert, slot, counts, weight, impl)                  -> [S, d]
    route_dot(a, b, expert, slot, counts, impl)                                     -> [S, k]

`impl` is "triton" (the kernels of `moefx.kernels.gating`, on CUDA or in Triton's interpreter) or
"torch" (the references of `moefx.nn.table`); the lowering pass writes it into each node. The
dispatch with a per-choice scale and the weighted combine are adjoint to each other:

    d dispatch(x, scale) / dx     = combine(g, scale)      d / dscale = route_dot(x, g)
    d combine(y, w) / dy          = dispatch(g, w)         d / dw     = route_dot(g, y)

The public `gate_table` / `dispatch` / `combine` call the implementations directly in plain eager
inference (no autograd, no tracing: see `plain_eager`), since a custom op's Python dispatch costs
about as much as these kernels; otherwise they go through the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import table

IMPLS = ("torch", "triton")


def _kernels():
    from ..kernels import gating

    return gating


def _gate_table_impl(logits, top_k, capacity, impl):
    if impl == "triton":
        return _kernels().gate_table_triton(logits, top_k, capacity)
    return table.gate_table(logits, top_k, capacity)


def _dispatch_impl(tokens, expert, slot, counts, scale, num_experts, capacity, impl):
    if impl == "triton":
        return _kernels().dispatch_triton(tokens, expert, slot, counts, scale, num_experts, capacity)
    return table.dispatch(tokens, expert, slot, num_experts, capacity, scale)


def _combine_impl(expert_out, expert, slot, weight, impl):
    if impl == "triton":
        return _kernels().combine_triton(expert_out, expert, slot, weight)
    return table.combine(expert_out, expert, slot, weight)


def _route_dot_impl(a, b, expert, slot, impl):
    if impl == "triton":
        return _kernels().route_dot_triton(a, b, expert, slot)
    return table.route_dot(a, b, expert, slot)


@torch.library.custom_op("moefx::gate_table", mutates_args=())
def gate_table_op(logits: Tensor, top_k: int, capacity: int, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(expert [S, k] int64, slot [S, k] int64, counts [E] int64) of logits [S, E]; capacity -1 = no limit."""
    return _gate_table_impl(logits, top_k, capacity, impl)


@gate_table_op.register_fake
def _(logits, top_k, capacity, impl):
    S, E = logits.shape
    return (logits.new_empty(S, top_k, dtype=torch.int64), logits.new_empty(S, top_k, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int64))


@torch.library.custom_op("moefx::dispatch_tokens", mutates_args=())
def dispatch_op(tokens: Tensor, expert: Tensor, slot: Tensor, counts: Tensor, scale: Optional[Tensor],
                num_experts: int, capacity: int, impl: str) -> Tensor:
    """[E, C, d] buffer: row (expert[s, j], slot[s, j]) = scale[s, j] * tokens[s] (scale None: 1), zeros elsewhere."""
    return _dispatch_impl(tokens, expert, slot, counts, scale, num_experts, capacity, impl)


@dispatch_op.register_fake
def _(tokens, expert, slot, counts, scale, num_experts, capacity, impl):
    return tokens.new_empty(num_experts, capacity, tokens.shape[-1])


def _dispatch_setup(ctx, inputs, output):
    tokens, expert, slot, counts, scale, num_experts, capacity, impl = inputs
    ctx.impl = impl
    ctx.save_for_backward(tokens if scale is not None else None, expert, slot, counts, scale)


def _dispatch_backward(ctx, grad):
    tokens, expert, slot, counts, scale = ctx.saved_tensors
    g_tokens = g_scale = None
    if ctx.needs_input_grad[0]:
        g_tokens = combine_op(grad, expert, slot, counts, scale, ctx.impl)
    if scale is not None and ctx.needs_input_grad[4]:
        g_scale = route_dot_op(tokens, grad, expert, slot, counts, ctx.impl).to(scale.dtype)
    return g_tokens, None, None, None, g_scale, None, None, None


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("moefx::combine_tokens", mutates_args=())
def combine_op(expert_out: Tensor, expert: Tensor, slot: Tensor, counts: Tensor, weight: Optional[Tensor],
               impl: str) -> Tensor:
    """[S, d]: out[s] = sum over kept j of weight[s, j] * expert_out[expert[s, j], slot[s, j]] (float32 accumulation).

    counts is only used by the backward (a dispatch)."""
    return _combine_impl(expert_out, expert, slot, weight, impl)


@combine_op.register_fake
def _(expert_out, expert, slot, counts, weight, impl):
    return expert_out.new_empty(slot.shape[0], expert_out.shape[-1])


def _combine_setup(ctx, inputs, output):
    expert_out, expert, slot, counts, weight, impl = inputs
    ctx.num_experts, ctx.capacity, ctx.impl = expert_out.shape[0], expert_out.shape[1], impl
    ctx.save_for_backward(expert_out if weight is not None else None, expert, slot, counts, weight)


def _combine_backward(ctx, grad):
    expert_out, expert, slot, counts, weight = ctx.saved_tensors
    g_out = g_weight = None
    if ctx.needs_input_grad[0]:
        g_out = dispatch_op(grad, expert, slot, counts, weight, ctx.num_experts, ctx.capacity, ctx.impl)
    if weight is not None and ctx.needs_input_grad[4]:
        g_weight = route_dot_op(grad, expert_out, expert, slot, counts, ctx.impl).to(weight.dtype)
    return g_out, None, None, None, g_weight, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("moefx::route_dot", mutates_args=())
def route_dot_op(a: Tensor, b: Tensor, expert: Tensor, slot: Tensor, counts: Tensor, impl: str) -> Tensor:
    """[S, k]: out[s, j] = <a[s], b[expert[s, j], slot[s, j]]>, 0 when dropped (float32 or wider).

    counts is only used by the backward (a dispatch)."""
    return _route_dot_impl(a, b, expert, slot, impl)


@route_dot_op.register_fake
def _(a, b, expert, slot, counts, impl):
    return a.new_empty(slot.shape, dtype=table.acc_dtype(a.dtype, b.dtype))


def _route_dot_setup(ctx, inputs, output):
    a, b, expert, slot, counts, impl = inputs
    ctx.num_experts, ctx.capacity, ctx.impl = b.shape[0], b.shape[1], impl
    ctx.save_for_backward(a, b, expert, slot, counts)


def _route_dot_backward(ctx, grad):
    a, b, expert, slot, counts = ctx.saved_tensors
    g_a = g_b = None
    if ctx.needs_input_grad[0]:
        g_a = combine_op(b, expert, slot, counts, grad, ctx.impl).to(a.dtype)
    if ctx.needs_input_grad[1]:
        g_b = dispatch_op(a, expert, slot, counts, grad, ctx.num_experts, ctx.capacity, ctx.impl).to(b.dtype)
    return g_a, g_b, None, None, None, None


route_dot_op.register_autograd(_route_dot_backward, setup_context=_route_dot_setup)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """True when the ops may be bypassed: plain tensors, no autograd, no tracing or dispatch mode.

    The custom ops exist for graph capture (fake tensors, export, compile) and autograd; in plain
    eager inference their Python dispatch costs tens of microseconds per call, comparable to the
    kernels themselves, so the public functions call the implementations directly then.
    """
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


def gate_table(logits: Tensor, top_k: int, capacity: int, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(expert [S, k], slot [S, k], counts [E]) for `capacity` (-1: no limit), by `impl`."""
    fn = _gate_table_impl if plain_eager(logits) else gate_table_op
    return fn(logits, top_k, capacity, impl)


def dispatch(tokens: Tensor, expert: Tensor, slot: Tensor, counts: Tensor, num_experts: int, capacity: int,
             impl: str, scale: Tensor | None = None) -> Tensor:
    """tokens [S, d] -> [E, C, d] by the table (zeros in empty slots)."""
    args = (tokens, expert, slot, counts, scale, num_experts, capacity, impl)
    return _dispatch_impl(*args) if plain_eager(tokens, scale) else dispatch_op(*args)


def combine(expert_out: Tensor, expert: Tensor, slot: Tensor, counts: Tensor, weight: Tensor | None,
            impl: str) -> Tensor:
    """expert_out [E, C, d] -> [S, d], weighted by `weight` (None: 1) with float32 accumulation."""
    if plain_eager(expert_out, weight):
        return _combine_impl(expert_out, expert, slot, weight, impl)
    return combine_op(expert_out, expert, slot, counts, weight, impl)
