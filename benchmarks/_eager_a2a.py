"""Eager flat and hierarchical all-to-all on ProcessGroups, for the all-to-all micro-benchmark
(`bench_distributed_cpu.py`): the baseline a rank graph's all-to-all nodes are compared with.

Autograd-capable all-to-all with uneven splits: flat and hierarchical (DeepSpeed-MoE).

Every function moves rows (dim 0) of a tensor between the ranks of a group and is built on
`torch.distributed._functional_collectives.all_to_all_single_autograd`, whose backward is the
reverse all-to-all (splits swapped). Row order convention, shared by all of them: the input holds
the rows for destination 0, then destination 1, ... (`send_splits[d]` rows each); the output
holds the rows from source 0, then source 1, ... (`recv_splits[s]` rows each). Splits are plain
int lists (use `exchange_counts` to learn `recv_splits` from `send_splits`).

Hierarchical all-to-all over nodes x devices_per_node ranks (rank = node * G + local, G devices
per node, N nodes); a chunk goes from (n, g) to (n', g') via (n, g')::

    1. layout transform  chunks ordered by destination (n', g') -> by (g', n')
    2. intra-node a2a    to local rank g' of the same node           (G - 1 hops)
    3. layout transform  received (g, n') -> by (n', g)
    4. inter-node a2a    to node n', same local rank g'               (N - 1 hops)

The result is bit-identical to `flat_all_to_all`: rank (n', g') ends with the chunks from sources
(n, g) in order n-major, i.e. global source order. Step 3 needs the chunk sizes of the node's
other ranks, so one small intra-node all-to-all of counts comes first (`hierarchical_splits`;
compute it once and pass it to both directions), or `HierarchicalSplits.from_matrix` builds the
same from a full count matrix without communication. These are the eager forms of what a rank
graph does with `moefx.nn.collectives.all_to_all` nodes (the layout steps are shared:
`moefx.nn.ep_layout`); they take ProcessGroup objects, for scripts and benchmarks. The combine direction is
`hierarchical_all_to_all_inverse` (reverse route, no count exchange); calling
`hierarchical_all_to_all` with the splits swapped also works (forward route) and is equally exact.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from moefx.nn.ep_layout import HierarchicalSplits, permute_chunks, unpermute_chunks

__all__ = ["exchange_counts", "flat_all_to_all", "HierarchicalSplits", "hierarchical_splits",
           "hierarchical_all_to_all", "hierarchical_all_to_all_inverse", "permute_chunks", "unpermute_chunks"]


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _wait(t: torch.Tensor) -> torch.Tensor:
    # Without autograd, functional collectives return an AsyncCollectiveTensor; make it plain.
    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


def _as_list(splits, name: str) -> list[int]:
    if isinstance(splits, torch.Tensor):
        splits = splits.tolist()
    out = [int(s) for s in splits]
    if any(s < 0 for s in out):
        raise ValueError(f"{name} has a negative split: {out}")
    return out


def exchange_counts(local_counts: torch.Tensor, group=None) -> torch.Tensor:
    """Counts per destination -> counts from each source (an even all-to-all of a small tensor).

    local_counts: int tensor of shape [P] or [P, k] (P = group size; e.g. k experts per rank);
    row d is what this rank sends to group rank d. Returns the same shape, row s = what group rank
    s sends to this rank. No gradient.
    """
    group = group if group is not None else dist.group.WORLD
    p = _group_size(group)
    if local_counts.shape[0] != p:
        raise ValueError(f"exchange_counts: local_counts has {local_counts.shape[0]} rows for a group of {p} ranks")
    if p == 1:
        return local_counts.clone()
    c = local_counts.detach().contiguous()
    return _wait(fc.all_to_all_single(c, None, None, group))


def flat_all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                    group=None) -> torch.Tensor:
    """Send rows `x[sum(send[:d]) : sum(send[:d+1])]` to group rank d; return rows from each source,
    in source order. Differentiable (backward = the all-to-all with splits swapped)."""
    group = group if group is not None else dist.group.WORLD
    send, recv = _as_list(send_splits, "send_splits"), _as_list(recv_splits, "recv_splits")
    p = _group_size(group)
    if len(send) != p or len(recv) != p:
        raise ValueError(f"flat_all_to_all: {len(send)} send / {len(recv)} recv splits for a group of {p} ranks")
    if sum(send) != x.shape[0]:
        raise ValueError(f"flat_all_to_all: send_splits sum to {sum(send)} but x has {x.shape[0]} rows")
    if p == 1:
        return x
    return _wait(fc.all_to_all_single_autograd(x.contiguous(), recv, send, group))


def _check_shape(send, recv, nodes, devices_per_node, intra_group, inter_group):
    p = nodes * devices_per_node
    if len(send) != p or len(recv) != p:
        raise ValueError(f"hierarchical_all_to_all: {len(send)} send / {len(recv)} recv splits, expected "
                         f"nodes * devices_per_node = {nodes} * {devices_per_node} = {p}")
    gi = _group_size(intra_group) if devices_per_node > 1 else 1
    ge = _group_size(inter_group) if nodes > 1 else 1
    if gi != devices_per_node or ge != nodes:
        raise ValueError(f"hierarchical_all_to_all: intra group has {gi} ranks (expected devices_per_node "
                         f"{devices_per_node}), inter group has {ge} (expected nodes {nodes})")


def hierarchical_splits(send_splits: Sequence[int], recv_splits: Sequence[int], intra_group, nodes: int,
                        devices_per_node: int, device=None) -> HierarchicalSplits:
    """Exchange, inside the node, the counts a hierarchical all-to-all routes through each rank.

    Collective over `intra_group` (one even all-to-all of N * G ints, on `device`: the tokens'
    device, since NCCL communicates CUDA tensors only)."""
    N, G = nodes, devices_per_node
    send, recv = _as_list(send_splits, "send_splits"), _as_list(recv_splits, "recv_splits")
    # Row g' of what I send: my counts to (n', g') for every n'.
    mine = torch.tensor([[send[n * G + g] for n in range(N)] for g in range(G)], dtype=torch.long, device=device)
    got = exchange_counts(mine, intra_group) if G > 1 else mine
    return HierarchicalSplits(N, G, tuple(send), tuple(recv), tuple(tuple(r) for r in got.tolist()))



def hierarchical_all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], intra_group,
                            inter_group, nodes: int, devices_per_node: int,
                            splits: HierarchicalSplits | None = None) -> torch.Tensor:
    """Same result as `flat_all_to_all(x, send_splits, recv_splits, <EP group>)`, bit for bit, routed
    intra-node then inter-node (see the module docstring). Differentiable.

    intra_group: the devices_per_node ranks of this node (ascending); inter_group: the `nodes`
    ranks with this rank's local index (ascending). splits: from `hierarchical_splits`, computed
    here when not given.
    """
    send, recv = _as_list(send_splits, "send_splits"), _as_list(recv_splits, "recv_splits")
    _check_shape(send, recv, nodes, devices_per_node, intra_group, inter_group)
    if sum(send) != x.shape[0]:
        raise ValueError(f"hierarchical_all_to_all: send_splits sum to {sum(send)} but x has {x.shape[0]} rows")
    if splits is None:
        splits = hierarchical_splits(send, recv, intra_group, nodes, devices_per_node, device=x.device)
    elif list(splits.send) != send or list(splits.recv) != recv:
        raise ValueError("hierarchical_all_to_all: `splits` was computed for other send/recv splits")
    h = splits
    sizes, order = h.by_local_then_node()
    y = permute_chunks(x, sizes, order)                                               # 1
    y = flat_all_to_all(y, h.intra_send(), h.intra_recv(), intra_group) if h.devices_per_node > 1 else y  # 2
    sizes, order = h.mid_sizes_order()
    y = permute_chunks(y, sizes, order)                                               # 3
    return flat_all_to_all(y, h.inter_send(), h.inter_recv(), inter_group) if h.nodes > 1 else y  # 4


def hierarchical_all_to_all_inverse(y: torch.Tensor, splits: HierarchicalSplits, intra_group,
                                    inter_group) -> torch.Tensor:
    """Undo `hierarchical_all_to_all` (the combine direction): `y` holds `splits.recv` rows per source
    in source order (e.g. expert outputs); returns `splits.send` rows per destination in the
    original order. Reverse route (inter-node first), no count exchange. Equals
    `flat_all_to_all(y, splits.recv, splits.send, <EP group>)` bit for bit. Differentiable."""
    h = splits
    if sum(h.recv) != y.shape[0]:
        raise ValueError(f"hierarchical_all_to_all_inverse: splits.recv sum to {sum(h.recv)} but y has "
                         f"{y.shape[0]} rows")
    z = flat_all_to_all(y, h.inter_recv(), h.inter_send(), inter_group) if h.nodes > 1 else y  # undo 4
    sizes, order = h.mid_sizes_order()
    z = unpermute_chunks(z, sizes, order)                                             # undo 3
    z = flat_all_to_all(z, h.intra_recv(), h.intra_send(), intra_group) if h.devices_per_node > 1 else z  # undo 2
    sizes, order = h.by_local_then_node()
    return unpermute_chunks(z, sizes, order)                                          # undo 1
