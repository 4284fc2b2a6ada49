"""Gradient reduction and the global gradient norm of a partitioned model, from placement records.

Global loss = mean over data-parallel replicas of each replica's loss. Every parameter's record
(`moefx.placement.Placement`) says over which group its identical copies live and how many times
one replica's tokens reached it: its gradient is all-reduced (SUM) over `replicated_over` and
divided by `grad_divisor`. Dense parameters (replicated or TP-sharded): the "dp" group (the TP
peers already hold equal gradients), divided by dp. Expert parameters of MoE layer l: their local
gradient sums every token of the EP group routed to them, so they are summed over the layer's
expert-data-parallel group and divided by dp (coordinated TP: each token reached them once) or
by the world (every TP rank sent it). Every rank joins every all-reduce, in the same order,
whatever its gradients (a missing gradient counts as zeros).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..nn.collectives import group
from ..parallel import WORLD
from ..placement import Placement
from ..facts import placements

__all__ = ["reduce_gradients", "grad_norm", "clip_grad_norm", "GradBuckets"]


def _records(local: nn.Module) -> list[tuple[str, nn.Parameter, Placement]]:
    recs = placements(local)
    out = []
    for name, p in local.named_parameters():
        if not p.requires_grad:
            continue
        if name not in recs:
            raise KeyError(f"parameter {name} has no placement record: was this module made by moefx.distribute?")
        out.append((name, p, recs[name]))
    return out


def _group(local: nn.Module, name: str):
    """The process group `name` of the rank graph's own mesh (`moefx.distribute` records it), else the
    one bound to that name in this process."""
    mesh = getattr(local, "moefx_mesh", None)
    return mesh.group(name) if mesh is not None else group(name)


def reduce_gradients(local: nn.Module) -> None:
    """All-reduce the .grad of every parameter of `local` (this rank's GraphModule) in place.

    Gradients are bucketed by (group, divisor) and reduced flat, one all-reduce per bucket and dtype,
    the bucket divided once before it is copied back."""
    buckets: dict[tuple[str, int], list[nn.Parameter]] = {}
    for _, p, rec in _records(local):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((rec.replicated_over, rec.grad_divisor), []).append(p)
    for (name, divisor), params in sorted(buckets.items()):
        pg = _group(local, name)
        grads = [p.grad for p in params]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for dtype, gs in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            _finish_reduce(*_start_reduce(gs, pg), gs, divisor)


def _start_reduce(grads: list[torch.Tensor], pg) -> tuple:
    """Issue the SUM all-reduce of `grads` (one dtype) over `pg` as one flat tensor: (work, flat),
    work None for a group of one (nothing to send)."""
    if dist.get_world_size(pg) == 1:
        return None, None
    flat = _flatten_dense_tensors(grads)
    return dist.all_reduce(flat, group=pg, async_op=True), flat


def _finish_reduce(work, flat, grads: list[torch.Tensor], divisor: int) -> None:
    """Wait for `_start_reduce`'s all-reduce and leave the sums / divisor in `grads`."""
    if work is None:
        if divisor != 1:
            torch._foreach_div_(grads, divisor)
        return
    work.wait()
    if divisor != 1:
        flat.div_(divisor)
    torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


class GradBuckets:
    """`reduce_gradients` during backward, as DDP does: gradients leave in buckets as they are ready.

    Buckets hold parameters of one (group, divisor, dtype), in reverse registration order (about the
    order backward produces their gradients), each up to `bucket_mb`. After `arm()`, a hook on every
    parameter counts the gradients of the next backward; a bucket whose gradients are all there is
    flattened and all-reduced asynchronously while backward goes on. Buckets are launched strictly
    in their fixed order (a ready bucket waits for the ones before it), so every rank of a group
    issues the same collectives in the same order whatever order its hooks fire in. `finish()`
    launches what is left (a parameter backward did not reach counts as a zero gradient, as in
    `reduce_gradients`), waits, divides and copies the results back into `.grad`. The numbers equal
    `reduce_gradients`'s up to the order of the summation inside a bucket. With gradient
    accumulation, arm before the last micro-batch's backward only.
    """

    def __init__(self, local: nn.Module, bucket_mb: float = 25.0):
        cap = max(1, int(bucket_mb * 2 ** 20))
        self.buckets: list[tuple[str, int, list[nn.Parameter]]] = []
        open_: dict[tuple, list[nn.Parameter]] = {}
        sizes: dict[tuple, int] = {}
        for _, p, rec in reversed(_records(local)):
            key = (rec.replicated_over, rec.grad_divisor, p.dtype)
            if key not in open_ or sizes[key] + p.numel() * p.element_size() > cap and open_[key]:
                open_[key] = []
                sizes[key] = 0
                self.buckets.append((rec.replicated_over, rec.grad_divisor, open_[key]))
            open_[key].append(p)
            sizes[key] += p.numel() * p.element_size()
        self.local = local
        self.bucket_of = {id(p): i for i, (_, _, ps) in enumerate(self.buckets) for p in ps}
        self.armed = False
        self._handles = [p.register_post_accumulate_grad_hook(self._ready)
                         for _, _, ps in self.buckets for p in ps]
        self._reset()

    def _reset(self) -> None:
        self.pending = [len(ps) for _, _, ps in self.buckets]
        self.launched: list[tuple] = []
        self.next = 0

    def arm(self) -> None:
        """Reduce during the next backward."""
        self._reset()
        self.armed = True

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        self.pending[self.bucket_of[id(p)]] -= 1
        while self.next < len(self.buckets) and self.pending[self.next] == 0:
            self._launch(self.next)

    def _launch(self, i: int) -> None:
        name, divisor, params = self.buckets[i]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        self.launched.append((*_start_reduce(grads, _group(self.local, name)), grads, divisor))
        self.next = i + 1

    def finish(self) -> None:
        """Launch the buckets left, wait for all, and leave the reduced gradients in `.grad`."""
        if not self.armed:
            raise RuntimeError("GradBuckets.finish() without arm() before the backward")
        while self.next < len(self.buckets):
            self._launch(self.next)
        for work, flat, grads, divisor in self.launched:
            _finish_reduce(work, flat, grads, divisor)
        self.armed = False
        self._reset()

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []


def grad_norm(local: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm over the whole (unpartitioned) model: every TP shard and expert piece
    counted once, replicated parameters once. Collective over the world. Call after
    `reduce_gradients`."""
    if norm_type != 2.0:
        raise ValueError("grad_norm computes the 2-norm only")
    device = next((p.device for p in local.parameters()), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _, p, rec in _records(local):
        if p.grad is None or not rec.counts:
            continue
        total = total + p.grad.detach().double().pow(2).sum() / rec.copies
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, group=_group(local, WORLD))
    return total.sqrt()


def clip_grad_norm(local: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale every gradient so the global norm is at most `max_norm`; returns the norm before clipping."""
    norm = grad_norm(local)
    scale_gradients(local.parameters(), norm, max_norm)
    return norm


def scale_gradients(params, norm: torch.Tensor, max_norm: float) -> None:
    """Multiply the gradients of `params` by min(1, max_norm / norm) (the clipping step, given the norm)."""
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
