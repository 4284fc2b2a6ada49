"""build_mesh on real gloo worlds: every group of rank_layout, usable, bound by name."""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_world

from moefx.dist.mesh import build_mesh
from moefx.errors import PlanError
from moefx.nn.collectives import all_to_all
from moefx.parallel import rank_layout, validate_parallel
from moefx.plan import ParallelPlan


def PP(**kw):
    return ParallelPlan(**kw)


# ------------------------------------------------------------------ build_mesh on gloo ranks

def _check_layout(rank, pp, counts):
    """Build the mesh of a plan and check each group against rank_layout; returns the Mesh."""
    import torch.distributed as dist

    from moefx.nn.collectives import group

    r = validate_parallel(pp, dist.get_world_size(), counts)
    mesh = build_mesh(r)
    lay = rank_layout(r)
    assert tuple(mesh.device_mesh.mesh.shape) == (pp.nodes, pp.devices_per_node)
    assert mesh.device_mesh.mesh_dim_names == ("node", "local")
    for name, part in lay.items():
        mine = next(t for t in part if rank in t)
        assert mesh.ranks[name] == mine, name
        assert tuple(dist.get_process_group_ranks(mesh.group(name))) == mine, name
        assert group(name) is mesh.group(name), name          # bound by name for the graphs' collectives
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mesh.group(name))           # every group is usable
        assert t.item() == sum(mine), name
        names = [None] * len(mine)                          # members agree on which group this is
        dist.all_gather_object(names, mesh.group(name).group_name, group=mesh.group(name))
        assert len(set(names)) == 1, (name, names)
    return mesh


def _check_groups(rank, world):
    mesh = _check_layout(rank, PP(nodes=2, devices_per_node=2, tp=2, ep=[2, 4, 4]), [4, 8, 2])
    assert mesh.meshes["ep4"].mesh_dim_names == ("edp4", "ep4") and tuple(mesh.meshes["tp"].mesh.shape) == (2, 2)
    lp = mesh.resolved.layers[1]                       # 8 experts, ep 4 over 2 nodes: hierarchical
    assert lp.group_names == {"ep": "ep4", "edp": "edp4", "intra": "intra_node", "inter": "ep4_inter"}
    assert "intra" not in mesh.resolved.layers[0].group_names
    assert mesh.resolved.layers[2].group_names["expert_slice"] == "slice2"
    # the graphs' all-to-all op routes rows over a bound group by name: rank s sends s * 10 + d to d
    x = torch.tensor([[float(rank * 10 + d)] for d in range(4)])
    got = all_to_all(x, [1] * 4, [1] * 4, "ep4")
    assert got[:, 0].tolist() == [float(s * 10 + rank) for s in range(4)]

    with pytest.raises(PlanError, match="resolved for world_size 8"):
        build_mesh(validate_parallel(PP(nodes=2, devices_per_node=4), 8, [8]))


def _check_groups_world8(rank, world):
    mesh = _check_layout(rank, PP(nodes=2, devices_per_node=4, tp=2, ep=[4, 8, 8]), [32, 64, 2])
    assert mesh.resolved.layers[1].group_names["inter"] == "ep8_inter"
    assert mesh.resolved.layers[2].group_names["expert_slice"] == "slice4"
    mesh = _check_layout(rank, PP(nodes=4, devices_per_node=2, ep=4), [8])       # EP blocks of 2 nodes
    assert mesh.ranks["ep4_inter"] == ((0, 2), (1, 3), (4, 6), (5, 7))[[0, 1, 0, 1, 2, 3, 2, 3][rank]]


@pytest.mark.dist
def test_build_mesh_world4():
    run_world(_check_groups, 4)


@pytest.mark.dist
def test_build_mesh_world8():
    run_world(_check_groups_world8, 8)


def test_build_mesh_needs_init():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(PlanError, match="init_from_env"):
        build_mesh(validate_parallel(PP(), 1, [1]))
