"""One named DeviceMesh for a job, and every process group a rank graph names, derived from it.

`build_mesh(resolved)` creates the ("node", "local") DeviceMesh of nodes x devices_per_node ranks,
flattens it into the "world" mesh and unflattens that into the meshes the plan needs, each a view
of the same ranks: ("dp", "tp"), ("edp{e}", "ep{e}") per EP degree, ("slices{s}", "slice{s}") for
expert slicing, ("ep{e}_block", "ep{e}_inter", "ep{e}_local") for a hierarchical all-to-all. The
groups are exactly `moefx.parallel.rank_layout(resolved)` (checked), and they are bound by name
(`moefx.nn.collectives.bind_groups`) so the rank graphs' collectives find them. Collective: every
rank calls it with the same `resolved`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.device_mesh import init_device_mesh
import torch.distributed as dist

from ..errors import PlanError
from ..parallel import (DP, INTER_NODE, INTRA_NODE, TP, WORLD, ResolvedParallel, edp_group, ep_group, ep_inter_group,
                        group_of, rank_layout, slice_group)
from ..nn.collectives import bind_groups

__all__ = ["Mesh", "build_mesh"]


@dataclass
class Mesh:
    """This rank's view of the job: the root DeviceMesh, the derived meshes, the groups by name."""

    resolved: ResolvedParallel
    rank: int
    device_mesh: Any              # DeviceMesh ("node", "local")
    meshes: dict                  # name -> derived DeviceMesh ("world", "tp", "ep4", ...)
    groups: dict                  # group name -> ProcessGroup of this rank
    ranks: dict                   # group name -> ranks of this rank's group

    def group(self, name: str):
        """This rank's group called `name` ("tp", "ep8", ...)."""
        if name not in self.groups:
            raise KeyError(f"no process group {name!r}; known: {sorted(self.groups)}")
        return self.groups[name]

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def check_covers(self, resolved: ResolvedParallel) -> None:
        """Raise PlanError unless this mesh holds every group `resolved` needs, with the same ranks:
        a job has one mesh, and every graph it partitions runs on it."""
        if resolved.world != self.resolved.world or resolved.devices_per_node != self.resolved.devices_per_node:
            raise PlanError(f"parallel: this job's mesh is {self.resolved.nodes} x {self.resolved.devices_per_node} "
                            f"ranks; a graph asks for {resolved.nodes} x {resolved.devices_per_node}")
        layout = rank_layout(resolved)
        missing = [name for name in layout if name not in self.ranks]
        differ = [name for name in layout if name in self.ranks and self.ranks[name] != group_of(layout, name, self.rank)]
        if missing or differ:
            raise PlanError(f"parallel: a graph of this job needs process groups its mesh does not have "
                            f"(missing {missing}, other ranks {differ}); the mesh was built for:\n"
                            f"{self.resolved.describe()}")


def build_mesh(resolved: ResolvedParallel, device_type: str | None = None) -> Mesh:
    """Create the job's DeviceMesh and every group of `rank_layout(resolved)` on the initialised
    default process group, and bind the groups by name. device_type defaults to "cuda" under nccl,
    else "cpu"."""
    if not dist.is_initialized():
        raise PlanError("build_mesh needs an initialised default process group: call "
                        "moefx.dist.worker.init_from_env() (or torch.distributed.init_process_group) first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != resolved.world:
        raise PlanError(f"parallel: the plan was resolved for world_size {resolved.world} but this job has "
                        f"{world} ranks: nodes * devices_per_node != world_size: {resolved.nodes} * "
                        f"{resolved.devices_per_node} != {world}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    n, g, tp = resolved.nodes, resolved.devices_per_node, resolved.tp
    root = init_device_mesh(device_type, (n, g), mesh_dim_names=("node", "local"))
    flat = root._flatten(WORLD)
    meshes: dict[str, Any] = {"node_local": root, WORLD: flat}
    groups: dict[str, Any] = {WORLD: flat.get_group(WORLD), INTRA_NODE: root.get_group("local"),
                              INTER_NODE: root.get_group("node")}

    def derive(key: str, sizes: tuple, names: tuple, wanted: tuple) -> None:
        m = flat._unflatten(0, sizes, names)
        meshes[key] = m
        for name in wanted:
            groups[name] = m.get_group(name)

    derive(TP, (world // tp, tp), (DP, TP), (DP, TP))
    for e in resolved.ep_sizes:
        derive(ep_group(e), (world // e, e), (edp_group(e), ep_group(e)), (edp_group(e), ep_group(e)))
    for s in sorted({lp.expert_slicing for lp in resolved.layers if lp.expert_slicing > 1}):
        derive(slice_group(s), (world // s, s), (f"slices{s}", slice_group(s)), (slice_group(s),))
    for e in sorted({lp.ep for lp in resolved.layers if lp.hier_shape is not None}):
        derive(ep_inter_group(e), (world // e, e // g, g), (f"ep{e}_block", ep_inter_group(e), f"ep{e}_local"),
               (ep_inter_group(e),))

    layout = rank_layout(resolved)
    ranks = {}
    for name in layout:
        want = group_of(layout, name, rank)
        got = tuple(dist.get_process_group_ranks(groups[name]))
        if got != want:
            raise AssertionError(f"rank {rank}: mesh group {name!r} has ranks {got}, the layout says {want}")
        ranks[name] = want
    bind_groups(groups)
    return Mesh(resolved=resolved, rank=rank, device_mesh=root, meshes=meshes, groups=groups, ranks=ranks)
