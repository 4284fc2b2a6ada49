"""The collective modules a partitioned graph calls, one graph node each.

Process groups cannot be code constants, so every collective is a small module holding its group
and the group's name (shown by `moefx dump --stage partitioned`). Splits travel through the
graph as plain values: `CountExchange` turns per-destination row counts into per-source counts (ints),
`AllToAll` moves rows, `HierarchicalSplits` / `LayoutTransform` are the extra steps of the
hierarchical all-to-all. `CopyToTP` / `ReduceFromTP` are Megatron's f and g operators for tensor
parallelism (identity forward / all-reduce backward, and the reverse).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .all_to_all import exchange_counts, flat_all_to_all, hierarchical_splits, permute_chunks, unpermute_chunks


class _Collective(nn.Module):
    def __init__(self, group, group_name: str):
        super().__init__()
        self.group = group
        self.group_name = group_name

    def extra_repr(self) -> str:
        return f"group={self.group_name}"


class CountExchange(_Collective):
    """Rows for each group rank -> rows from each group rank, as Python ints: the one host sync of
    the exchange; the layout steps and all-to-alls that follow read the list. `like` is a tensor on
    the device the backend communicates on (NCCL needs CUDA tensors)."""

    def forward(self, send_counts: list[int], like: Tensor) -> list[int]:
        counts = torch.tensor(send_counts, dtype=torch.long, device=like.device)
        return exchange_counts(counts, self.group).tolist()


class AllToAll(_Collective):
    """Rows of x go to group ranks by `send` counts; returns rows from each rank by `recv` counts."""

    def forward(self, x: Tensor, send, recv) -> Tensor:
        return flat_all_to_all(x, _ints(send), _ints(recv), self.group)


class HierarchicalSplits(_Collective):
    """(send, recv) flat splits -> moefx.runtime.all_to_all.HierarchicalSplits (intra-node counts)."""

    def __init__(self, group, group_name: str, nodes: int, devices_per_node: int):
        super().__init__(group, group_name)
        self.nodes, self.devices_per_node = nodes, devices_per_node

    def forward(self, send, recv):
        return hierarchical_splits(_ints(send), _ints(recv), self.group, self.nodes, self.devices_per_node)


def layout_transform(x: Tensor, splits, stage: str, inverse: bool = False) -> Tensor:
    """The hierarchical all-to-all's local reorderings: stage "by_local" ((n', g') -> (g', n')) or
    "by_node" ((g, n') -> (n', g)); `inverse` undoes it (combine direction)."""
    sizes, order = splits.by_local_then_node() if stage == "by_local" else splits.mid_sizes_order()
    return unpermute_chunks(x, sizes, order) if inverse else permute_chunks(x, sizes, order)


def hier_step_splits(splits, step: str):
    """(send, recv) of one step of a hierarchical all-to-all: "intra" or "inter"."""
    return (splits.intra_send(), splits.intra_recv()) if step == "intra" else (splits.inter_send(),
                                                                              splits.inter_recv())


def _ints(splits) -> list[int]:
    if isinstance(splits, Tensor):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class CopyToTP(_Collective):
    """Megatron's f: identity forward, all-reduce of the gradient backward (before column-parallel)."""

    def forward(self, x: Tensor) -> Tensor:
        return _CopyToTP.apply(x, self.group)


class ReduceFromTP(_Collective):
    """Megatron's g: all-reduce forward (after row-parallel), identity backward."""

    def forward(self, x: Tensor) -> Tensor:
        return _ReduceFromTP.apply(x, self.group)
