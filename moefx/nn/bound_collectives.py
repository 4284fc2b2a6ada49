"""Collectives over a *bound* process group: Megatron's tensor-parallel f / g, the split / gather pair,
and the expert all-to-all as an issue / wait pair whose backward overlaps too.

What `moefx.passes.bind_collectives` puts in a rank graph in place of the TP ops of
`moefx.nn.collectives`: each takes the c10d name of a live process group (`pg.group_name`) and
this rank's index in it, so nothing is looked up at run time. Forward and backward call torch's
functional collectives (`_c10d_functional.*`) and then `wait_tensor`, so a traced graph
(torch.compile, AOT autograd) holds the collective and its wait as separate nodes.

The all-to-all pair: `all_to_all_start` issues the transfer and `all_to_all_wait` waits for it, as
torch's `all_to_all_single` + `wait_tensor` do, but the backward is split the same way the other
way round in eager: the wait's backward *issues* the reverse all-to-all of the gradient and the
start's backward waits for it (the two share it through a small record, since the gradient has the
input's shape, not the output's), so whatever ran between the two in the forward (the residual MLP
that `overlap_a2a` put there) has its backward run while the gradient is in flight: autograd runs
ready nodes latest-created first. torch's formula for all_to_all_single issues and waits inside
one backward node; torch.compile traces torch's ops, and its compiler schedules the waits.

The TP ops are autograd Functions rather than torch's functional ops with their own autograd formulas
because Megatron's conventions differ from those formulas: g (tp_reduce) all-reduces forward
and passes the gradient through unchanged, f (tp_copy) is the identity forward and all-reduces the
gradient, and a gather's gradient is this rank's chunk (what follows is replicated, so every rank
holds the same gradient), where torch's all_gather backward would sum it over the group.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_to_all_start", "all_to_all_wait", "tp_copy", "tp_reduce", "tp_split", "tp_gather"]

_C10D = torch.ops._c10d_functional


def _all_reduce(x: Tensor, pg: str) -> Tensor:
    return _C10D.wait_tensor(_C10D.all_reduce(x.contiguous(), "sum", pg))


def _gather(x: Tensor, dim: int, pg: str, size: int, full: int) -> Tensor:
    out = _C10D.wait_tensor(_C10D.all_gather_into_tensor(x.contiguous(), size, pg))   # chunks on dim 0
    if dim != 0:
        out = torch.cat(out.chunk(size, dim=0), dim=dim)
    return out.narrow(dim, 0, full)


def _chunk(x: Tensor, dim: int, size: int, rank: int) -> Tensor:
    part = (x.shape[dim] + size - 1) // size
    extra = part * size - x.shape[dim]
    if extra > 0:
        shape = list(x.shape)
        shape[dim] = extra
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x.narrow(dim, rank * part, part).clone()


class _Pending:
    """What an issued all-to-all's two backward halves share: the gradient's reverse trip in flight."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


_LINK = "_moefx_pending"     # attribute of an issued result carrying its _Pending to the wait's forward


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, pg):
        ctx.args = (list(out_splits), list(in_splits), pg)
        ctx.pending = _Pending()
        t = _C10D.all_to_all_single(x.contiguous(), list(out_splits), list(in_splits), pg)
        setattr(t, _LINK, ctx.pending)
        return t

    @staticmethod
    def backward(ctx, g):
        grad, ctx.pending.grad = ctx.pending.grad, None
        if grad is None:                     # the wait's backward did not run: the reverse trip, here
            out_splits, in_splits, pg = ctx.args
            grad = _C10D.all_to_all_single(g.contiguous(), in_splits, out_splits, pg)
        return _C10D.wait_tensor(grad), None, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, out_splits, in_splits, pg):
        ctx.args = (list(out_splits), list(in_splits), pg)
        ctx.pending = t.__dict__.pop(_LINK, None)
        ctx.shape = t.shape
        return _C10D.wait_tensor(t).view_as(t)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, pg = ctx.args
        trip = _C10D.all_to_all_single(g.contiguous(), in_splits, out_splits, pg)   # issued, not waited
        if ctx.pending is None:
            return _C10D.wait_tensor(trip), None, None, None
        ctx.pending.grad = trip
        # the start's backward takes the gradient from `pending`; autograd only needs a tensor of t's shape
        return g.new_zeros(()).expand(ctx.shape), None, None, None


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.pg), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        return _all_reduce(x, pg)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, size, rank):
        ctx.args = (dim, pg, size, x.shape[dim])
        return _chunk(x, dim, size, rank)

    @staticmethod
    def backward(ctx, g):
        dim, pg, size, full = ctx.args
        return _gather(g, dim, pg, size, full), None, None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, size, full, rank):
        ctx.args = (dim, size, rank)
        return _gather(x, dim, pg, size, full)

    @staticmethod
    def backward(ctx, g):
        dim, size, rank = ctx.args
        return _chunk(g, dim, size, rank), None, None, None, None, None


def all_to_all_start(x: Tensor, out_splits: list[int], in_splits: list[int], pg: str) -> Tensor:
    """Issue the all-to-all of x's rows over `pg` (in_splits rows to each rank, out_splits rows from
    each); the result may be read only through `all_to_all_wait`. Traced by torch.compile: torch's
    all_to_all_single with its own autograd formula (the compiler schedules the waits)."""
    if torch.compiler.is_compiling():
        return _C10D.all_to_all_single(x.contiguous(), list(out_splits), list(in_splits), pg)
    return _Start.apply(x, out_splits, in_splits, pg)


def all_to_all_wait(t: Tensor, out_splits: list[int], in_splits: list[int], pg: str) -> Tensor:
    """Wait for the all-to-all `all_to_all_start` issued (the same splits and group); in eager the
    gradient's reverse trip is issued here and waited for in the start's backward."""
    if torch.compiler.is_compiling():
        return _C10D.wait_tensor(t)
    return _Wait.apply(t, out_splits, in_splits, pg)


def tp_copy(x: Tensor, pg: str) -> Tensor:
    """Identity forward (a copy); the gradient is all-reduced (sum) over `pg` (Megatron's f)."""
    return _Copy.apply(x, pg)


def tp_reduce(x: Tensor, pg: str) -> Tensor:
    """All-reduce (sum) over `pg`; the gradient passes unchanged (Megatron's g)."""
    return _Reduce.apply(x, pg)


def tp_split(x: Tensor, dim: int, pg: str, size: int, rank: int) -> Tensor:
    """Chunk `rank` of `dim` (ceil(n / size) entries, the last zero-padded); the gradient is gathered."""
    return _Split.apply(x, dim, pg, size, rank)


def tp_gather(x: Tensor, dim: int, pg: str, size: int, full: int, rank: int) -> Tensor:
    """All-gather the chunks along `dim`, keep the first `full`; the gradient is this rank's chunk."""
    return _Gather.apply(x, dim, pg, size, full, rank)
