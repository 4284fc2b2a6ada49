"""Parallel degrees, resolved once against a world and a model: pure data, no torch.distributed.

`validate_parallel(plan.parallel, world_size, expert_counts)` checks every degree of a
`ParallelPlan` against the world and the model's MoE layers and returns a frozen
`ResolvedParallel`, so a plan is checked before any process starts. `rank_layout(resolved)` lists,
for every group name, the partition of the world into rank tuples; the runtime builds exactly
those groups (`moefx.dist.mesh.build_mesh`) and the passes name them in the graph.

Rank layout (row-major, global rank r = node * devices_per_node + local). Example: 2 nodes x 4
devices, tp = 2, one MoE layer with ep = 4 and one with ep = 8::

                 local 0  local 1  local 2  local 3
      node 0  [   r0       r1       r2       r3   ]   intra_node {0,1,2,3}
      node 1  [   r4       r5       r6       r7   ]   intra_node {4,5,6,7}
                  inter_node {0,4} {1,5} {2,6} {3,7}

      tp  = 2   tp  {0,1} {2,3} {4,5} {6,7}        consecutive ranks
                dp  {0,2,4,6} {1,3,5,7}            same tp rank (stride tp)
      ep  = 4   ep4 {0,1,2,3} {4,5,6,7}            contiguous blocks of ep ranks
                edp4 {0,4} {1,5} {2,6} {3,7}       same position in the block (stride ep)
      ep  = 8   ep8 {0,...,7}   edp8 {0} ... {7}
                hierarchical a2a: intra_node, then ep8_inter = {0,4} {1,5} {2,6} {3,7}

- TP groups are consecutive ranks, so they stay inside a node when tp divides devices_per_node.
- The EP group of a layer is a contiguous block of ep ranks: block r // ep, EP rank r % ep. With
  E experts and ep <= E, EP rank i holds experts [i * E/ep, (i + 1) * E/ep). With ep > E (expert
  slicing, tensor parallelism inside experts) s = ep / E consecutive ranks share one expert: EP
  rank i holds slice i % s of expert i // s, and group `slice{s}` = those s ranks.
- The EDP group (expert data parallel, gradients of expert weights are all-reduced over it) is
  the ranks at the same position of every EP block: world / ep ranks, stride ep.
- Hierarchical all-to-all needs EP blocks made of whole nodes (ep a multiple of devices_per_node,
  at least two nodes): its intra step uses `intra_node`, its inter step `ep{ep}_inter` (ranks
  with the same local index on the nodes of one EP block; equal to `inter_node` when ep = world).
- With tp > 1 and `coordinated_a2a`, TP rank t of a TP group dispatches only chunk t of the
  tokens its group shares; the expert outputs are all-gathered over `tp` before the combine.

Group names (recorded in `node.meta["moefx_group"]` and in the collective nodes' arguments):
"world", "intra_node", "inter_node", "tp", "dp", "ep{n}", "edp{n}", "slice{s}", "ep{n}_inter".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import PlanError
from .plan import ParallelPlan

__all__ = ["LayerParallel", "ResolvedParallel", "validate_parallel", "rank_layout", "group_of", "WORLD", "INTRA_NODE",
           "INTER_NODE", "TP", "DP", "ep_group", "edp_group", "slice_group", "ep_inter_group"]

# The process-group names rank graphs, placement records, meshes and checkpoints use: spelled here only.
WORLD = "world"
INTRA_NODE = "intra_node"
INTER_NODE = "inter_node"
TP = "tp"
DP = "dp"


def ep_group(ep: int) -> str:
    """The expert-parallel group of degree `ep` (one copy of a layer's experts spread over it)."""
    return f"ep{ep}"


def edp_group(ep: int) -> str:
    """The expert-data-parallel group of EP degree `ep` (the copies of each expert piece)."""
    return f"edp{ep}"


def slice_group(slices: int) -> str:
    """The ranks that share one expert, each holding one of `slices` slices of its inner dimension."""
    return f"slice{slices}"


def ep_inter_group(ep: int) -> str:
    """The inter-node step of the hierarchical all-to-all of EP degree `ep`."""
    return f"ep{ep}_inter"


@dataclass(frozen=True)
class LayerParallel:
    """Resolved degrees of one MoE layer.

    ep: expert-parallel degree (ranks one copy of the layer's experts is spread over).
    edp: expert-data-parallel degree, world / ep (copies of each expert).
    experts_per_rank: E / ep when ep <= E, else 1 (each rank holds a slice of one expert).
    expert_slicing: ranks that share one expert, ep / E when ep > E, else 1.
    hierarchical: True / False / "auto" (decided by the hierarchical_a2a pass with the cost
        model); always False when the EP group is not made of at least two whole nodes.
    hier_shape: (nodes, devices_per_node) of the EP group when hierarchical a2a is possible.
    """

    layer: int
    experts: int
    ep: int
    edp: int
    experts_per_rank: int
    expert_slicing: int
    hierarchical: Any
    hier_shape: tuple[int, int] | None

    def ep_rank(self, rank: int) -> int:
        """Position of global `rank` inside its EP group."""
        return rank % self.ep

    def experts_of(self, rank: int) -> range:
        """Global expert ids whose weights (or a slice of them) live on `rank`."""
        i = self.ep_rank(rank)
        if self.expert_slicing > 1:
            e = i // self.expert_slicing
            return range(e, e + 1)
        return range(i * self.experts_per_rank, (i + 1) * self.experts_per_rank)

    def slice_of(self, rank: int) -> int:
        """Which slice (0 .. expert_slicing - 1) of its expert `rank` holds."""
        return self.ep_rank(rank) % self.expert_slicing

    @property
    def group_names(self) -> dict[str, str]:
        """Names of this layer's groups by role: "ep", "edp", and when they exist "expert_slice",
        "intra" / "inter" (the two steps of the hierarchical all-to-all)."""
        names = {"ep": ep_group(self.ep), "edp": edp_group(self.ep)}
        if self.expert_slicing > 1:
            names["expert_slice"] = slice_group(self.expert_slicing)
        if self.hier_shape is not None:
            names["intra"], names["inter"] = INTRA_NODE, ep_inter_group(self.ep)
        return names


@dataclass(frozen=True)
class ResolvedParallel:
    """Every degree of a `ParallelPlan`, checked against a world and a model.

    world = nodes * devices_per_node = tp * dp; per MoE layer ep * edp = world. coordinated: TP
    ranks split the tokens they share before the expert all-to-all (tp > 1 and the plan asks).
    """

    world: int
    nodes: int
    devices_per_node: int
    tp: int
    dp: int
    layers: tuple[LayerParallel, ...] = ()
    coordinated: bool = False

    @property
    def ep_sizes(self) -> tuple[int, ...]:
        """Distinct EP degrees, ascending (one EP/EDP group family each)."""
        return tuple(sorted({lp.ep for lp in self.layers}))

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.devices_per_node

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    @property
    def dense_grad_divisor(self) -> int:
        """What a dense (non-expert) parameter's summed gradient is divided by: the data-parallel
        replicas (the TP peers of a replica hold equal gradients and are not summed)."""
        return self.dp

    def expert_grad_divisor(self) -> int:
        """How many times the tokens of one data-parallel replica reach the experts: dp when TP
        ranks split the tokens they share (coordinated), world when every TP rank sends them all."""
        return self.dp if self.coordinated else self.world

    def describe(self) -> str:
        """A small table of the degrees, for dumps and error reports."""
        head = (f"world {self.world} = nodes {self.nodes} x devices_per_node {self.devices_per_node}"
                f" = tp {self.tp} x dp {self.dp}" + (" (coordinated a2a)" if self.coordinated else ""))
        rows = [f"  layer {lp.layer}: experts {lp.experts:>4}  ep {lp.ep:>4}  edp {lp.edp:>4}  "
                f"experts/rank {lp.experts_per_rank:>3}  slicing {lp.expert_slicing}  "
                f"hierarchical {lp.hierarchical}" for lp in self.layers]
        return "\n".join([head] + rows)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate_parallel(pp: ParallelPlan, world_size: int, expert_counts: Sequence[int]) -> ResolvedParallel:
    """Check every parallel degree of `pp` for `world_size` ranks and MoE layers with
    `expert_counts[l]` experts; return the resolved degrees or raise one PlanError listing every
    problem, each naming the product that does not hold.

    Rules: dp = world / tp. Per MoE layer l with E experts: ep "auto" -> gcd(world, E), the largest
    degree that divides both (no expert slicing). An explicit ep must divide world and either
    divide E (E / ep experts per rank) or be a multiple of E (expert slicing over ep / E ranks).
    edp = world / ep.

    >>> r = validate_parallel(ParallelPlan(nodes=2, devices_per_node=4, ep=(4, 8)), 8, [32, 64])
    >>> [(lp.ep, lp.edp, lp.experts_per_rank) for lp in r.layers]
    [(4, 2, 8), (8, 1, 8)]
    """
    if not isinstance(pp, ParallelPlan):
        raise PlanError(f"validate_parallel needs a ParallelPlan, got {type(pp).__name__}")
    if not _is_pos_int(world_size):
        raise PlanError(f"parallel: world_size must be an int >= 1, got {world_size!r}")
    counts = list(expert_counts)
    for i, c in enumerate(counts):
        if not _is_pos_int(c):
            raise PlanError(f"parallel: MoE layer {i} has an invalid expert count {c!r} (need an int >= 1)")

    n, g, world, tp = pp.nodes, pp.devices_per_node, world_size, pp.tp
    if n * g != world:
        raise PlanError(f"parallel: nodes * devices_per_node != world_size: {n} * {g} != {world}")
    errors: list[str] = []
    ep = pp.ep
    if isinstance(ep, tuple):
        if len(ep) != len(counts):
            errors.append(f"parallel: ep lists {len(ep)} degrees but the model has {len(counts)} MoE layers "
                          f"(expert counts {counts}): give one ep per MoE layer")
            ep_list = [None] * len(counts)
        else:
            ep_list = list(ep)
    else:
        ep_list = [ep] * len(counts)

    layers: list[LayerParallel] = []
    for l, (E, e) in enumerate(zip(counts, ep_list)):
        if e is None:
            continue
        if e == "auto":
            e = math.gcd(world, E)
        if e <= E and E % e:
            errors.append(f"parallel: MoE layer {l} has {E} experts, not divisible by its ep = {e}")
            continue
        if e > E and e % E:
            errors.append(f"parallel: MoE layer {l} has {E} experts and ep = {e} > {E}: expert slicing needs "
                          f"ep to be a multiple of the expert count ({e} % {E} != 0)")
            continue
        whole_nodes = g > 1 and e % g == 0 and e // g >= 2
        layers.append(LayerParallel(
            layer=l, experts=E, ep=e, edp=world // e,
            experts_per_rank=E // e if e <= E else 1,
            expert_slicing=e // E if e > E else 1,
            hierarchical=pp.hierarchical_a2a if whole_nodes else False,
            hier_shape=(e // g, g) if whole_nodes else None,
        ))
    if errors:
        raise PlanError("\n".join(errors) if len(errors) == 1 else
                        f"{len(errors)} problems with the parallel plan:\n  " + "\n  ".join(errors))
    return ResolvedParallel(world=world, nodes=n, devices_per_node=g, tp=tp, dp=world // tp, layers=tuple(layers),
                            coordinated=tp > 1 and pp.coordinated_a2a)


def _blocks(world: int, size: int) -> list[tuple[int, ...]]:
    """Contiguous blocks of `size` ranks."""
    return [tuple(range(b, b + size)) for b in range(0, world, size)]


def _strided(world: int, stride: int) -> list[tuple[int, ...]]:
    """Ranks with the same r % stride."""
    return [tuple(range(i, world, stride)) for i in range(stride)]


def rank_layout(resolved: ResolvedParallel) -> dict[str, list[tuple[int, ...]]]:
    """For each group name, the partition of the world into rank tuples (see module docstring).

    Insertion order is the creation order the runtime uses on every rank.
    """
    w, g = resolved.world, resolved.devices_per_node
    out: dict[str, list[tuple[int, ...]]] = {
        WORLD: [tuple(range(w))],
        INTRA_NODE: _blocks(w, g),
        INTER_NODE: _strided(w, g),
        TP: _blocks(w, resolved.tp),
        DP: _strided(w, resolved.tp),
    }
    for e in resolved.ep_sizes:
        out[ep_group(e)] = _blocks(w, e)
        out[edp_group(e)] = _strided(w, e)
    for s in sorted({lp.expert_slicing for lp in resolved.layers if lp.expert_slicing > 1}):
        out[slice_group(s)] = _blocks(w, s)
    for e in sorted({lp.ep for lp in resolved.layers if lp.hier_shape is not None}):
        k = e // g
        out[ep_inter_group(e)] = [tuple(b + m * g + i for m in range(k)) for b in range(0, w, e) for i in range(g)]
    return out


def group_of(layout: dict[str, list[tuple[int, ...]]], name: str, rank: int) -> tuple[int, ...]:
    """The ranks of `rank`'s group called `name`."""
    for t in layout[name]:
        if rank in t:
            return t
    raise AssertionError(f"rank {rank} is in no group {name!r} of {layout[name]}")
