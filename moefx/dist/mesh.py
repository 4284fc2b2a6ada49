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
from ..parallel import ResolvedParallel, group_of, rank_layout
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
    flat = root._flatten("world")
    meshes: dict[str, Any] = {"node_local": root, "world": flat}
    groups: dict[str, Any] = {"world": flat.get_group("world"), "intra_node": root.get_group("local"),
                              "inter_node": root.get_group("node")}

    def derive(key: str, sizes: tuple, names: tuple, wanted: dict) -> None:
        m = flat._unflatten(0, sizes, names)
        meshes[key] = m
        for dim_name, group_name in wanted.items():
            groups[group_name] = m.get_group(dim_name)

    derive("tp", (world // tp, tp), ("dp", "tp"), {"dp": "dp", "tp": "tp"})
    for e in resolved.ep_sizes:
        derive(f"ep{e}", (world // e, e), (f"edp{e}", f"ep{e}"), {f"edp{e}": f"edp{e}", f"ep{e}": f"ep{e}"})
    for s in sorted({lp.expert_slicing for lp in resolved.layers if lp.expert_slicing > 1}):
        derive(f"slice{s}", (world // s, s), (f"slices{s}", f"slice{s}"), {f"slice{s}": f"slice{s}"})
    for e in sorted({lp.ep for lp in resolved.layers if lp.hier_shape is not None}):
        derive(f"ep{e}_inter", (world // e, e // g, g), (f"ep{e}_block", f"ep{e}_inter", f"ep{e}_local"),
               {f"ep{e}_inter": f"ep{e}_inter"})

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
