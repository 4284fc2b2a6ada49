"""Collective ops a partitioned graph calls: custom ops that take a process-group *name*.

A rank's graph holds no ProcessGroup objects: every collective node is a call of one of these
`torch.library` custom ops with the group's moefx name as a string argument ("tp", "ep4",
"intra_node", ... see `moefx.parallel`), so the graph prints, exports, compiles with
`torch.compile(fullgraph=True)` and can be dumped and diffed without a live process group. At
run time the name is looked up in the groups bound to this process (`bind_groups`, called by the
runtime when it builds the mesh); an unbound name is a clear `GroupNotBound` error, never a
silent fall back to the world group.

Ops (each with a fake implementation for export / compile and an autograd formula):

    all_to_all(x, out_splits, in_splits, group)   rows of x to group ranks by in_splits; returns
                                                  rows from each rank by out_splits; backward:
                                                  the reverse all-to-all
    all_to_all_start(x, out_splits, in_splits, group)  the same all-to-all, issued and not waited
                                                  for: a WAIT node (torch's functional
                                                  `wait_tensor`) waits, so the work between the two
                                                  overlaps the transfer (`moefx.passes.overlap_a2a`)
    all_gather_rows(x, group, n)                  [m, ...] -> [n * m, ...], rank order
                                                  (no gradient: used for counts)
    tp_copy(x, group)           Megatron's f: identity forward, all-reduce (sum) of the gradient
    tp_reduce(x, group)         Megatron's g: all-reduce (sum) forward, identity backward
    tp_split(x, dim, group, n)  this rank's chunk of dim (ceil(len / n) entries, zero-padded);
                                backward all-gathers the gradient (the input is replicated)
    tp_gather(x, dim, group, n, full)  all-gather the chunks along dim, keep `full`; backward
                                keeps this rank's chunk (what follows is replicated)

Ops that change a shape take the group size n as an argument, so shapes are known (export,
fake tensors) without a bound group; a bound group of another size is an error.

They run on every device torch.distributed runs on (gloo on CPU, NCCL on CUDA); every tensor
handed to a collective stays on the input's device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import MoefxError

__all__ = ["GroupNotBound", "bind_groups", "bound_groups", "group", "group_size", "group_rank", "all_to_all",
           "all_to_all_start",
           "all_gather_rows", "tp_copy", "tp_reduce", "tp_split", "tp_gather", "OPS", "ALL_TO_ALL", "ALL_TO_ALL_START", "WAIT", "ALL_GATHER_ROWS",
           "TP_COPY", "TP_REDUCE", "TP_SPLIT", "TP_GATHER"]

_BOUND: dict[str, dist.ProcessGroup] = {}


class GroupNotBound(MoefxError, RuntimeError):
    """A collective names a process group this process has not bound."""


def bind_groups(groups: dict[str, "dist.ProcessGroup"]) -> None:
    """Make the names of `groups` resolve to these process groups in this process (replacing earlier
    bindings of the same names). The runtime calls it when it builds the mesh."""
    _BOUND.update(groups)


def bound_groups() -> dict[str, "dist.ProcessGroup"]:
    """The name -> ProcessGroup bindings of this process."""
    return dict(_BOUND)


def group(name: str) -> "dist.ProcessGroup":
    """The process group bound to `name`; GroupNotBound names the fix when there is none."""
    pg = _BOUND.get(name)
    if pg is None:
        raise GroupNotBound(
            f"this graph runs a collective over the process group {name!r}, but no group of that name is bound "
            "in this process: run the rank graph under torch.distributed after moefx.distribute (which builds "
            "and binds the groups), or build them with moefx.dist.mesh.build_mesh; a graph from "
            "moefx.partitioned_view is for inspection only"
            + (f" (bound: {sorted(_BOUND)})" if _BOUND else ""))
    return pg


def group_size(name: str) -> int:
    return dist.get_world_size(group(name))


def group_rank(name: str) -> int:
    return dist.get_rank(group(name))


# The ops' implementations call torch's functional collective ops directly (not the
# `_functional_collectives` wrappers, whose AsyncCollectiveTensor subclass costs a Python dispatch
# per use in eager), and wait at once: each collective's output is a fresh tensor, returned as is.
_C10D = torch.ops._c10d_functional


# ------------------------------------------------------------------------------------- all_to_all


@torch.library.custom_op("moefx::all_to_all", mutates_args=())
def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> Tensor:
    """Rows of `x` go to the ranks of `group_name` by `in_splits`; returns the rows from each rank
    (source order) by `out_splits`. Uneven splits are fine."""
    pg = group(group_name)
    if dist.get_world_size(pg) == 1:
        return x.clone()
    return _C10D.wait_tensor(_C10D.all_to_all_single(x.contiguous(), list(out_splits), list(in_splits), pg.group_name))


def _a2a_fake(x, out_splits, in_splits, group_name):
    return x.new_empty(sum(out_splits), *x.shape[1:])


all_to_all.register_fake(_a2a_fake)


def _a2a_setup(ctx, inputs, output):
    _, out_splits, in_splits, group_name = inputs
    ctx.splits = (list(out_splits), list(in_splits), group_name)


def _a2a_backward(ctx, grad):
    out_splits, in_splits, group_name = ctx.splits
    return all_to_all(grad.contiguous(), in_splits, out_splits, group_name), None, None, None


all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


@torch.library.custom_op("moefx::all_to_all_start", mutates_args=())
def all_to_all_start(x: Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> Tensor:
    """`all_to_all`, issued but not waited for: the result may be read only after `wait(result)`."""
    pg = group(group_name)
    if dist.get_world_size(pg) == 1:
        return x.clone()
    return _C10D.all_to_all_single(x.contiguous(), list(out_splits), list(in_splits), pg.group_name)


all_to_all_start.register_fake(_a2a_fake)
all_to_all_start.register_autograd(_a2a_backward, setup_context=_a2a_setup)   # the gradient's trip is waited


# ------------------------------------------------------------------------------------- gathers and splits
# `size` is the group's size, recorded in the graph so shapes are known without a bound group. Splits
# take chunks of ceil(n / size) (the last zero-padded) and gathers trim back to `full`, inside the ops,
# so a traced graph has no branch on whether n divides by size.


def _check_size(group_name: str, size: int) -> "dist.ProcessGroup":
    pg = group(group_name)
    if dist.get_world_size(pg) != size:
        raise GroupNotBound(f"the graph expects group {group_name!r} to have {size} ranks, but the bound group has "
                            f"{dist.get_world_size(pg)}: the rank graph was built for another parallel plan")
    return pg


def _chunk_len(n, size: int):
    return (n + size - 1) // size


def _pad_to(x: Tensor, dim: int, n: int) -> Tensor:
    extra = n - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _gather(x: Tensor, dim: int, group_name: str, size: int, full: int) -> Tensor:
    pg = _check_size(group_name, size)
    if size == 1:
        out = x
    else:
        out = _C10D.wait_tensor(_C10D.all_gather_into_tensor(x.contiguous(), size, pg.group_name))  # chunks on dim 0
        if dim != 0:
            out = torch.cat(out.chunk(size, dim=0), dim=dim)
    return out.narrow(dim, 0, full).clone()


def _chunk(x: Tensor, dim: int, group_name: str, size: int) -> Tensor:
    pg = _check_size(group_name, size)
    part = _chunk_len(x.shape[dim], size)
    return _pad_to(x, dim, part * size).narrow(dim, dist.get_rank(pg) * part, part).clone()


def _all_reduce(x: Tensor, group_name: str) -> Tensor:
    pg = group(group_name)
    if dist.get_world_size(pg) == 1:
        return x.clone()
    return _C10D.wait_tensor(_C10D.all_reduce(x.contiguous(), "sum", pg.group_name))


def _resized(x: Tensor, dim: int, n) -> Tensor:
    shape = list(x.shape)
    shape[dim] = n
    return x.new_empty(shape)


@torch.library.custom_op("moefx::all_gather_rows", mutates_args=())
def all_gather_rows(x: Tensor, group_name: str, size: int) -> Tensor:
    """[n, ...] from every rank of the group -> [size * n, ...] in rank order (no gradient)."""
    return _gather(x, 0, group_name, size, x.shape[0] * size)


all_gather_rows.register_fake(lambda x, group_name, size: _resized(x, 0, x.shape[0] * size))


@torch.library.custom_op("moefx::tp_gather_nograd", mutates_args=())
def tp_gather_nograd(x: Tensor, dim: int, group_name: str, size: int, full: int) -> Tensor:
    """tp_gather without an autograd formula (the backward of tp_split)."""
    return _gather(x, dim, group_name, size, full)


tp_gather_nograd.register_fake(lambda x, dim, group_name, size, full: _resized(x, dim, full))


@torch.library.custom_op("moefx::tp_split_nograd", mutates_args=())
def tp_split_nograd(x: Tensor, dim: int, group_name: str, size: int) -> Tensor:
    """tp_split without an autograd formula (the backward of tp_gather)."""
    return _chunk(x, dim, group_name, size)


tp_split_nograd.register_fake(lambda x, dim, group_name, size: _resized(x, dim, _chunk_len(x.shape[dim], size)))


@torch.library.custom_op("moefx::tp_split", mutates_args=())
def tp_split(x: Tensor, dim: int, group_name: str, size: int) -> Tensor:
    """This rank's chunk of `dim`: ceil(n / size) entries, the last rank's zero-padded. The backward
    all-gathers the gradient, since the input is replicated over the group."""
    return _chunk(x, dim, group_name, size)


tp_split.register_fake(lambda x, dim, group_name, size: _resized(x, dim, _chunk_len(x.shape[dim], size)))


@torch.library.custom_op("moefx::tp_gather", mutates_args=())
def tp_gather(x: Tensor, dim: int, group_name: str, size: int, full: int) -> Tensor:
    """All-gather the group's chunks along `dim` and keep the first `full` entries (the inverse of
    tp_split of a dim of `full`); the backward keeps this rank's chunk of the gradient, since what
    follows is replicated over the group."""
    return _gather(x, dim, group_name, size, full)


tp_gather.register_fake(lambda x, dim, group_name, size, full: _resized(x, dim, full))


def _split_setup(ctx, inputs, output):
    ctx.dim, ctx.group_name, ctx.size, ctx.full = inputs[1], inputs[2], inputs[3], inputs[0].shape[inputs[1]]


def _gather_setup(ctx, inputs, output):
    ctx.dim, ctx.group_name, ctx.size = inputs[1], inputs[2], inputs[3]


tp_split.register_autograd(
    lambda ctx, g: (tp_gather_nograd(g, ctx.dim, ctx.group_name, ctx.size, ctx.full), None, None, None),
    setup_context=_split_setup)
tp_gather.register_autograd(
    lambda ctx, g: (tp_split_nograd(g, ctx.dim, ctx.group_name, ctx.size), None, None, None, None),
    setup_context=_gather_setup)


# ------------------------------------------------------------------------------------- Megatron f / g


@torch.library.custom_op("moefx::tp_reduce", mutates_args=())
def tp_reduce(x: Tensor, group_name: str) -> Tensor:
    """All-reduce (sum) over the group forward, identity backward (Megatron's g)."""
    return _all_reduce(x, group_name)


tp_reduce.register_fake(lambda x, group_name: torch.empty_like(x))
tp_reduce.register_autograd(lambda ctx, g: (g, None), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("moefx::tp_copy", mutates_args=())
def tp_copy(x: Tensor, group_name: str) -> Tensor:
    """Identity forward (a copy); the gradient is all-reduced (sum) over the group (Megatron's f)."""
    return x.clone()


def _copy_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


tp_copy.register_fake(lambda x, group_name: torch.empty_like(x))
tp_copy.register_autograd(lambda ctx, g: (tp_reduce(g, ctx.group_name), None), setup_context=_copy_setup)

# Graph targets: the ops' overloads (what a call_function node of a rank graph calls).
ALL_TO_ALL = torch.ops.moefx.all_to_all.default
ALL_TO_ALL_START = torch.ops.moefx.all_to_all_start.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
ALL_GATHER_ROWS = torch.ops.moefx.all_gather_rows.default
TP_COPY = torch.ops.moefx.tp_copy.default
TP_REDUCE = torch.ops.moefx.tp_reduce.default
TP_SPLIT = torch.ops.moefx.tp_split.default
TP_GATHER = torch.ops.moefx.tp_gather.default

#: every collective a rank graph may call, by its graph target (WAIT, which only waits, is not one)
OPS = (ALL_TO_ALL, ALL_TO_ALL_START, ALL_GATHER_ROWS, TP_COPY, TP_REDUCE, TP_SPLIT, TP_GATHER, torch.ops.moefx.tp_gather_nograd.default,
       torch.ops.moefx.tp_split_nograd.default)
