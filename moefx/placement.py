"""One placement record per tensor of a rank's graph: where it sits in its global tensor.

The partition passes write them (`moefx.facts.placements(gm)`: local state_dict name -> Placement); gradient reduction, gradient-norm clipping, checkpoints, materialisation and dumps
read them. Nobody re-derives placement from names. A tensor without a record is whole and
replicated over the data-parallel group (or there is no partition at all).

    Placement("moe1.experts.down_weight", (8, 128, 32), offsets=(4, 0, 0), shards=(Shard("ep2", 0),),
              replicated_over="edp2", grad_divisor=4)

`shards` lists every mesh dimension that splits the tensor, as (group, tensor dim): an expert
slice is split over its EP group along the expert dim and over its slice group along the inner
dim; a tensor-parallel shard that data parallelism shards again would list "tp" and the sharded
data-parallel group on the same dim. `offsets` is where the local piece starts in the global tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

from .parallel import DP

__all__ = ["Shard", "Placement", "whole", "complete"]


@dataclass(frozen=True)
class Shard:
    """One mesh dimension that splits a tensor: its pieces along tensor dim `dim` are spread over
    the ranks of `group`."""

    group: str
    dim: int


@dataclass(frozen=True)
class Placement:
    """Where one local tensor sits in its global tensor, and how its gradient is reduced.

    global_name: the tensor's state_dict key in the unpartitioned converted model;
    global_shape: its full shape; offsets: the global index of the local tensor's first element
    (it covers offsets + local shape); shards: the mesh dimensions that split it (() = whole);
    replicated_over: the group of ranks holding identical copies of this piece (gradients are
    all-reduced over it); grad_divisor: what the all-reduced gradient is divided by (the number of
    times one replica's tokens reached it); copies: how many ranks hold this very piece (a norm
    over the whole model counts each piece once); counts: False for a copy that contributes
    nothing (the down bias of expert slices > 0), left out of norms.
    """

    global_name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shards: tuple[Shard, ...] = ()
    replicated_over: str = DP
    grad_divisor: int = 1
    copies: int = 1
    counts: bool = True

    @property
    def shard_dims(self) -> tuple[int, ...]:
        """The tensor dims that are split, ascending (() = whole)."""
        return tuple(sorted({s.dim for s in self.shards}))

    @property
    def sharded_over(self) -> tuple[str, ...]:
        """The groups the pieces are spread over, in mesh-dimension order (() = whole)."""
        return tuple(dict.fromkeys(s.group for s in self.shards))

    @property
    def whole(self) -> bool:
        return not self.shards


def whole(name: str, shape: tuple[int, ...], grad_divisor: int = 1, copies: int = 1) -> Placement:
    """The record of a tensor every rank holds whole (gradients reduced over the data-parallel group)."""
    return Placement(name, tuple(shape), (0,) * len(shape), (), DP, grad_divisor, copies)


def complete(gm, records: dict[str, Placement], resolved) -> dict[str, Placement]:
    """The records of `gm`'s tensors: those of `records` that still exist, plus a whole record
    (replicated on every rank, reduced over the data-parallel group) for every tensor that has none."""
    state = gm.state_dict(keep_vars=True)
    out = {k: v for k, v in records.items() if k in state}
    for name, t in state.items():
        if name not in out:
            out[name] = whole(name, tuple(t.shape), grad_divisor=resolved.dense_grad_divisor, copies=resolved.world)
    return out
