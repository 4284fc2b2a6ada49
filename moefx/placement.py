"""One placement record per tensor of a rank's graph: where it sits in its global tensor.

The partition passes write them (`gm.meta["moefx_placements"]`: local state_dict name ->
Placement); gradient reduction, gradient-norm clipping, checkpoints, materialisation and dumps
read them. Nobody re-derives placement from names. A tensor without a record is whole and
replicated over the data-parallel group (or there is no partition at all).

    Placement("moe1.experts.down_weight", (8, 128, 32), offsets=(4, 0, 0), shard_dims=(0,),
              sharded_over="ep2", replicated_over="edp2", grad_divisor=4)
"""
from __future__ import annotations

from dataclasses import dataclass

KEY = "moefx_placements"


@dataclass(frozen=True)
class Placement:
    """Where one local tensor sits in its global tensor, and how its gradient is reduced.

    global_name: the tensor's state_dict key in the unpartitioned converted model;
    global_shape: its full shape; offsets: the global index of the local tensor's first element
    (it covers offsets + local shape); shard_dims: the dims that are split (() = whole);
    sharded_over: the group the pieces are spread over (None when whole);
    replicated_over: the group of ranks holding identical copies of this piece (gradients are
    all-reduced over it); grad_divisor: what the all-reduced gradient is divided by (the number of
    times one replica's tokens reached it); copies: how many ranks hold this very piece (a norm
    over the whole model counts each piece once); counts: False for a copy that contributes
    nothing (the down bias of expert slices > 0), left out of norms.
    """

    global_name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shard_dims: tuple[int, ...] = ()
    sharded_over: str | None = None
    replicated_over: str = "dp"
    grad_divisor: int = 1
    copies: int = 1
    counts: bool = True

    @property
    def whole(self) -> bool:
        return not self.shard_dims


def placements(gm) -> dict[str, Placement]:
    """The placement records of a rank's GraphModule ({} when it was not partitioned)."""
    return dict((getattr(gm, "meta", None) or {}).get(KEY, {}))


def whole(name: str, shape: tuple[int, ...], grad_divisor: int = 1, copies: int = 1) -> Placement:
    """The record of a tensor every rank holds whole (gradients reduced over "dp")."""
    return Placement(name, tuple(shape), (0,) * len(shape), (), None, "dp", grad_divisor, copies)


def complete(gm, records: dict[str, Placement], resolved) -> dict[str, Placement]:
    """The records of `gm`'s tensors: those of `records` that still exist, plus a whole record
    (replicated on every rank, reduced over "dp") for every tensor that has none."""
    state = gm.state_dict(keep_vars=True)
    out = {k: v for k, v in records.items() if k in state}
    for name, t in state.items():
        if name not in out:
            out[name] = whole(name, tuple(t.shape), grad_divisor=resolved.dp, copies=resolved.world)
    return out
