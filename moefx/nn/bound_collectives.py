"""Megatron's tensor-parallel f / g and the split / gather pair, over a *bound* process group.

What `moefx.passes.bind_collectives` puts in a rank graph in place of the TP ops of
`moefx.nn.collectives`: each takes the c10d name of a live process group (`pg.group_name`) and
this rank's index in it, so nothing is looked up at run time. Forward and backward call torch's
functional collectives (`_c10d_functional.*`) and then `wait_tensor`, so a traced graph
(torch.compile, AOT autograd) holds the collective and its wait as separate nodes.

They are autograd Functions rather than torch's functional ops with their own autograd formulas
because Megatron's conventions differ from those formulas: g (tp_reduce) all-reduces forward
and passes the gradient through unchanged, f (tp_copy) is the identity forward and all-reduces the
gradient, and a gather's gradient is this rank's chunk (what follows is replicated, so every rank
holds the same gradient), where torch's all_gather backward would sum it over the group.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tp_copy", "tp_reduce", "tp_split", "tp_gather"]

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
