"""Gradient reduction for a partitioned model (what DDP + expert-data-parallel do, explicitly).

Global loss = mean over data-parallel replicas. Dense (replicated or TP-sharded) parameters:
all-reduce SUM over the rank's `dp` group (same TP rank), divide by dp. Expert parameters of MoE
layer l: their local gradient already sums every token of the EP group that was routed to them
(the backward all-to-all brings it home), so all-reduce SUM over the layer's expert-data-parallel
group and divide by the world size (TP ranks send the same tokens, so the world is the count).
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..nn.moe import moe_layers


def reduce_gradients(local: nn.Module, groups) -> None:
    """All-reduce the .grad of every parameter of `local` (this rank's GraphModule) in place."""
    resolved = groups.resolved
    expert_params: dict[int, int] = {}
    for index, (_, mod) in enumerate(moe_layers(local)):
        for p in mod.experts.parameters():
            expert_params[id(p)] = index
    for p in local.parameters():
        if p.grad is None:
            continue
        if id(p) in expert_params:
            group = groups.layer(expert_params[id(p)]).edp
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
            p.grad.div_(resolved.world)
        else:
            if resolved.dp > 1:
                dist.all_reduce(p.grad, group=groups.dp)
            p.grad.div_(resolved.dp)
