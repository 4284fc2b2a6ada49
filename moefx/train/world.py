"""What a training step needs from the parallel world: one process, or this rank of a moefx job.

`Single()`: no process group; gradients are already the model's, the global norm is
`torch.nn.utils.clip_grad_norm_`'s. `Ranks(local)`: a `moefx.distribute`d rank graph; gradients
are reduced from its placement records (`moefx.dist.grads`), in buckets during the step's last
backward (`before_backward`, then `reduce_gradients` waits), the norm counts every shard once,
and a value is averaged over the data-parallel replicas (every rank of a replica holds the same
loss). Both answer the same questions, so the trainer has one code path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..dist.grads import GradBuckets, clip_grad_norm, grad_norm, reduce_gradients
from ..facts import facts

__all__ = ["Single", "Ranks"]


class Single:
    """One process: replica 0 of 1."""

    replicas, replica, rank, world = 1, 0, 0, 1

    def before_backward(self, model: nn.Module, last: bool) -> None:
        """Nothing to prepare in one process."""

    def reduce_gradients(self, model: nn.Module) -> None:
        # a parameter no token reached gets a zero gradient, as on ranks (AdamW then decays it alike)
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def clip(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def agree(self, error: str | None) -> str | None:
        """The error of any rank (here: this one), so every rank stops together."""
        return error


class Ranks:
    """This rank of a distributed job (the default process group is initialised)."""

    bucket_mb = 25.0          # gradient bucket size (DDP's default)

    def __init__(self, local: nn.Module):
        resolved = facts(local).parallel
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.replicas, self.replica = resolved.dp, resolved.dp_rank(self.rank)
        self._buckets: dict[int, GradBuckets] = {}

    def before_backward(self, model: nn.Module, last: bool) -> None:
        """Before the step's last backward, let its gradients leave in buckets as they are ready
        (`moefx.dist.grads.GradBuckets`); earlier micro-batches only accumulate."""
        if last:
            if id(model) not in self._buckets:
                self._buckets[id(model)] = GradBuckets(model, self.bucket_mb)
            self._buckets[id(model)].arm()

    def reduce_gradients(self, model: nn.Module) -> None:
        buckets = self._buckets.get(id(model))
        if buckets is not None and buckets.armed:
            buckets.finish()
        else:
            reduce_gradients(model)

    def clip(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        return grad_norm(model) if max_norm is None else clip_grad_norm(model, max_norm)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the world of a float tensor = the mean over replicas (TP peers agree)."""
        out = values.detach().double().clone()
        dist.all_reduce(out)
        return out / self.world

    def agree(self, error: str | None) -> str | None:
        """The first rank's error ("rank r: ..."), None when no rank has one; every rank calls it."""
        box = [None] * self.world
        dist.all_gather_object(box, error)
        return next((f"rank {r}: {e}" for r, e in enumerate(box) if e), None)
