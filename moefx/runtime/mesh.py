"""Parallel degrees (validated once) and the process groups that realise them.

`validate_parallel(plan.parallel, world_size, expert_counts)` checks every degree of a
`ParallelPlan` against the world and the model's MoE layers and returns a frozen
`ResolvedParallel`; it is pure (no torch.distributed) so a plan can be checked before launch.
`rank_layout(resolved)` lists, for every group kind, the partition of the world into rank tuples;
`build_groups(resolved)` creates those groups on an initialised default process group.

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

Group names (`ProcessGroups.group(name)`, recorded in `node.meta["moefx_group"]` by partition):
"world", "intra_node", "inter_node", "tp", "dp", "ep{n}", "edp{n}", "slice{s}", "ep{n}_inter".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import PlanError
from ..plan import ParallelPlan

__all__ = ["LayerParallel", "ResolvedParallel", "validate_parallel", "rank_layout", "LayerGroups",
           "ProcessGroups", "build_groups"]


@dataclass(frozen=True)
class LayerParallel:
    """Resolved degrees of one MoE layer.

    ep: expert-parallel degree (ranks one copy of the layer's experts is spread over).
    edp: expert-data-parallel degree, world / ep (copies of each expert).
    experts_per_rank: E / ep when ep <= E, else 1 (each rank holds a slice of one expert).
    expert_slicing: ranks that share one expert, ep / E when ep > E, else 1.
    hierarchical: True / False / "auto" (decide with `use_hierarchical(bytes_per_rank)`);
        always False when the EP group is not made of at least two whole nodes.
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
        names = {"ep": f"ep{self.ep}", "edp": f"edp{self.ep}"}
        if self.expert_slicing > 1:
            names["expert_slice"] = f"slice{self.expert_slicing}"
        if self.hier_shape is not None:
            names["intra"], names["inter"] = "intra_node", f"ep{self.ep}_inter"
        return names

    def use_hierarchical(self, bytes_per_rank: float, **cost_kwargs) -> bool:
        """Resolve "auto" with the cost model (`moefx.runtime.cost.choose_hierarchical`)."""
        if self.hierarchical != "auto":
            return bool(self.hierarchical)
        from .cost import choose_hierarchical
        return choose_hierarchical(bytes_per_rank, *self.hier_shape, **cost_kwargs)


@dataclass(frozen=True)
class ResolvedParallel:
    """Every degree of a `ParallelPlan`, checked against a world and a model.

    world = nodes * devices_per_node = tp * dp; per MoE layer ep * edp = world.
    """

    world: int
    nodes: int
    devices_per_node: int
    tp: int
    dp: int
    layers: tuple[LayerParallel, ...] = ()

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

    def describe(self) -> str:
        """A small table of the degrees, for dumps and error reports."""
        head = (f"world {self.world} = nodes {self.nodes} x devices_per_node {self.devices_per_node}"
                f" = tp {self.tp} x dp {self.dp}")
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
    errors: list[str] = []
    if not _is_pos_int(world_size):
        raise PlanError(f"parallel: world_size must be an int >= 1, got {world_size!r}")
    counts = list(expert_counts)
    for i, c in enumerate(counts):
        if not _is_pos_int(c):
            raise PlanError(f"parallel: MoE layer {i} has an invalid expert count {c!r} (need an int >= 1)")

    n, g, world = pp.nodes, pp.devices_per_node, world_size
    if n * g != world:
        errors.append(f"parallel: nodes * devices_per_node != world_size: {n} * {g} != {world}")

    tp = pp.tp
    dp = world // tp if world % tp == 0 else 0
    if world % tp:
        errors.append(f"parallel: tp * dp != world_size: tp = {tp} does not divide world_size {world}")
    elif n * g == world and g % tp and tp % g:
        errors.append(f"parallel: tp = {tp} straddles nodes of {g} devices (TP groups are consecutive ranks):"
                      f" choose a tp that divides devices_per_node {g} or is a multiple of it")

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
        if e > world:
            errors.append(f"parallel: MoE layer {l}: ep * edp != world_size: ep = {e} exceeds world_size {world}")
            continue
        if world % e:
            errors.append(f"parallel: MoE layer {l}: ep * edp != world_size: ep = {e} does not divide "
                          f"world_size {world}")
            continue
        if e <= E and E % e:
            errors.append(f"parallel: MoE layer {l} has {E} experts, not divisible by its ep = {e}")
            continue
        if e > E and e % E:
            errors.append(f"parallel: MoE layer {l} has {E} experts and ep = {e} > {E}: expert slicing needs "
                          f"ep to be a multiple of the expert count ({e} % {E} != 0)")
            continue
        whole_nodes = n * g == world and g > 1 and e % g == 0 and e // g >= 2
        straddles = n * g == world and e % g and g % e
        hier = pp.hierarchical_a2a
        if hier is True and straddles and e > 1:
            errors.append(f"parallel: MoE layer {l}: hierarchical_a2a = true needs EP groups of whole nodes, "
                          f"but ep = {e} is neither a multiple nor a divisor of devices_per_node {g}")
            continue
        if not whole_nodes:
            hier = False
        layers.append(LayerParallel(
            layer=l, experts=E, ep=e, edp=world // e,
            experts_per_rank=E // e if e <= E else 1,
            expert_slicing=e // E if e > E else 1,
            hierarchical=hier,
            hier_shape=(e // g, g) if whole_nodes else None,
        ))
    if errors:
        raise PlanError("\n".join(errors) if len(errors) == 1 else
                        f"{len(errors)} problems with the parallel plan:\n  " + "\n  ".join(errors))
    return ResolvedParallel(world=world, nodes=n, devices_per_node=g, tp=tp, dp=dp, layers=tuple(layers))


def _blocks(world: int, size: int) -> list[tuple[int, ...]]:
    """Contiguous blocks of `size` ranks."""
    return [tuple(range(b, b + size)) for b in range(0, world, size)]


def _strided(world: int, stride: int) -> list[tuple[int, ...]]:
    """Ranks with the same r % stride."""
    return [tuple(range(i, world, stride)) for i in range(stride)]


def rank_layout(resolved: ResolvedParallel) -> dict[str, list[tuple[int, ...]]]:
    """For each group name, the partition of the world into rank tuples (see module docstring).

    Insertion order is the creation order `build_groups` uses on every rank.
    """
    w, g = resolved.world, resolved.devices_per_node
    out: dict[str, list[tuple[int, ...]]] = {
        "world": [tuple(range(w))],
        "intra_node": _blocks(w, g),
        "inter_node": _strided(w, g),
        "tp": _blocks(w, resolved.tp),
        "dp": _strided(w, resolved.tp),
    }
    for e in resolved.ep_sizes:
        out[f"ep{e}"] = _blocks(w, e)
        out[f"edp{e}"] = _strided(w, e)
    for s in sorted({lp.expert_slicing for lp in resolved.layers if lp.expert_slicing > 1}):
        out[f"slice{s}"] = _blocks(w, s)
    for e in sorted({lp.ep for lp in resolved.layers if lp.hier_shape is not None}):
        k = e // g
        out[f"ep{e}_inter"] = [tuple(b + m * g + i for m in range(k)) for b in range(0, w, e) for i in range(g)]
    return out


@dataclass(frozen=True)
class LayerGroups:
    """The groups one MoE layer's collectives run on (for this rank), with their names.

    intra / inter: the two steps of the hierarchical all-to-all, None when the layer is flat-only.
    expert_slice: None without expert slicing.
    """

    ep: Any
    edp: Any
    expert_slice: Any
    intra: Any
    inter: Any
    names: dict = field(default_factory=dict)


@dataclass
class ProcessGroups:
    """This rank's process groups for a `ResolvedParallel` (see the module docstring).

    mesh: DeviceMesh ("node", "local") of shape nodes x devices_per_node.
    meshes: also "tp" -> ("dp", "tp") and "ep{n}" -> ("edp", "ep"), built from the same groups.
    """

    resolved: ResolvedParallel
    rank: int
    mesh: Any
    meshes: dict
    _groups: dict  # name -> ProcessGroup of this rank
    _ranks: dict  # name -> rank tuple of this rank's group

    def group(self, name: str):
        """This rank's group called `name` ("tp", "ep8", ...)."""
        if name not in self._groups:
            raise KeyError(f"no process group {name!r}; known: {sorted(self._groups)}")
        return self._groups[name]

    def ranks(self, name: str) -> tuple[int, ...]:
        """Global ranks of this rank's group called `name`."""
        return self._ranks[name]

    @property
    def names(self) -> list[str]:
        return list(self._groups)

    @property
    def world(self):
        return self._groups["world"]

    @property
    def intra_node(self):
        return self._groups["intra_node"]

    @property
    def inter_node(self):
        return self._groups["inter_node"]

    @property
    def tp(self):
        return self._groups["tp"]

    @property
    def dp(self):
        return self._groups["dp"]

    def layer(self, l: int) -> LayerGroups:
        """Groups of MoE layer `l` (index into `resolved.layers`)."""
        names = self.resolved.layers[l].group_names
        get = lambda k: self._groups[names[k]] if k in names else None  # noqa: E731
        return LayerGroups(ep=get("ep"), edp=get("edp"), expert_slice=get("expert_slice"),
                           intra=get("intra"), inter=get("inter"), names=names)


def build_groups(resolved: ResolvedParallel, device_type: str | None = None) -> ProcessGroups:
    """Create every group of `rank_layout(resolved)` on the initialised default process group.

    Collective: every rank must call it, with the same `resolved`. Groups are created in one fixed
    order and cached by rank tuple, so a tuple shared by several names (ep = devices_per_node and
    intra_node, ep = world and world, ...) is one ProcessGroup. The ("node", "local") mesh comes
    from `init_device_mesh`; the "tp" and "ep{n}" meshes wrap the cached groups
    (`DeviceMesh.from_group`). device_type defaults to "cuda" under nccl, else "cpu".
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if not dist.is_initialized():
        raise PlanError("build_groups needs an initialised default process group: call "
                        "moefx.runtime.init_from_env() (or torch.distributed.init_process_group) first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != resolved.world:
        raise PlanError(f"parallel: the plan was resolved for world_size {resolved.world} but this job has "
                        f"{world} ranks: nodes * devices_per_node != world_size: {resolved.nodes} * "
                        f"{resolved.devices_per_node} != {world}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"

    n, g = resolved.nodes, resolved.devices_per_node
    mesh = init_device_mesh(device_type, (n, g), mesh_dim_names=("node", "local"))
    cache: dict[tuple[int, ...], Any] = {tuple(range(world)): dist.group.WORLD}
    layout = rank_layout(resolved)
    # Register the mesh's groups (the whole partitions, identically on every rank) first, so no rank
    # tuple gets a second ProcessGroup and every rank skips the same tuples below.
    for name, dim in (("intra_node", "local"), ("inter_node", "node")):
        for t in layout[name]:
            cache.setdefault(t, mesh.get_group(dim) if rank in t else None)

    groups: dict[str, Any] = {}
    ranks: dict[str, tuple[int, ...]] = {}
    for name, partition in layout.items():
        for t in partition:  # same order on every rank: new_group is collective over the world
            if t not in cache:
                pg = dist.new_group(list(t))
                cache[t] = pg if rank in t else None
        mine = _mine(partition, rank)
        groups[name], ranks[name] = cache[mine], mine

    grid = torch.arange(world)
    meshes = {"world": mesh,
              "tp": DeviceMesh.from_group([groups["dp"], groups["tp"]], device_type,
                                          mesh=grid.reshape(world // resolved.tp, resolved.tp),
                                          mesh_dim_names=("dp", "tp"))}
    for e in resolved.ep_sizes:
        meshes[f"ep{e}"] = DeviceMesh.from_group([groups[f"edp{e}"], groups[f"ep{e}"]], device_type,
                                                 mesh=grid.reshape(world // e, e), mesh_dim_names=("edp", "ep"))
    return ProcessGroups(resolved=resolved, rank=rank, mesh=mesh, meshes=meshes, _groups=groups, _ranks=ranks)


def _mine(partition: list[tuple[int, ...]], rank: int) -> tuple[int, ...]:
    for t in partition:
        if rank in t:
            return t
    raise AssertionError(f"rank {rank} is in no group of {partition}")
