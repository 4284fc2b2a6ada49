"""validate_parallel / rank_layout (pure) and build_groups on a real 4-rank gloo world."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_world

from moefx.errors import PlanError
from moefx.plan import ParallelPlan
from moefx.runtime.mesh import build_groups, rank_layout, validate_parallel


def PP(**kw):
    return ParallelPlan(**kw)


# ------------------------------------------------------------------ validate_parallel: resolution

def test_paper_pyramid_degrees():
    # 128 GPUs, 32/64/128-expert layers -> EP 32/64/128, EDP 4/2/1 (DeepSpeed-MoE).
    r = validate_parallel(PP(nodes=16, devices_per_node=8), 128, [32, 64, 128])
    assert [(lp.ep, lp.edp, lp.experts_per_rank, lp.expert_slicing) for lp in r.layers] == \
        [(32, 4, 1, 1), (64, 2, 1, 1), (128, 1, 1, 1)]
    assert (r.world, r.tp, r.dp) == (128, 1, 128)
    assert [lp.hier_shape for lp in r.layers] == [(4, 8), (8, 8), (16, 8)]
    assert all(lp.hierarchical == "auto" for lp in r.layers)


def test_auto_ep_is_gcd_and_explicit_forms():
    r = validate_parallel(PP(nodes=2, devices_per_node=4), 8, [6, 12, 2, 16])
    assert [lp.ep for lp in r.layers] == [2, 4, 2, 8]
    assert [lp.experts_per_rank for lp in r.layers] == [3, 3, 1, 2]
    r = validate_parallel(PP(nodes=2, devices_per_node=4, ep=4), 8, [8, 16])
    assert [(lp.ep, lp.edp) for lp in r.layers] == [(4, 2), (4, 2)]
    r = validate_parallel(PP(nodes=2, devices_per_node=4, ep=[2, 8]), 8, [8, 16])
    assert [(lp.ep, lp.edp) for lp in r.layers] == [(2, 4), (8, 1)]


def test_expert_slicing_when_more_ranks_than_experts():
    r = validate_parallel(PP(nodes=2, devices_per_node=4, ep=8), 8, [2])
    lp = r.layers[0]
    assert (lp.ep, lp.edp, lp.experts_per_rank, lp.expert_slicing) == (8, 1, 1, 4)
    assert [list(lp.experts_of(q)) for q in range(8)] == [[0]] * 4 + [[1]] * 4
    assert [lp.slice_of(q) for q in range(8)] == [0, 1, 2, 3] * 2
    r = validate_parallel(PP(nodes=1, devices_per_node=4, ep=4), 4, [8])
    assert [list(r.layers[0].experts_of(q)) for q in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_tp_dp_and_hierarchical_flags():
    r = validate_parallel(PP(nodes=2, devices_per_node=4, tp=2, hierarchical_a2a=True), 8, [8, 4])
    assert (r.tp, r.dp) == (2, 4)
    assert [lp.hierarchical for lp in r.layers] == [True, False]       # ep 4 lives inside one node
    assert r.layers[1].hier_shape is None
    r = validate_parallel(PP(nodes=2, devices_per_node=4, hierarchical_a2a=False), 8, [8])
    assert r.layers[0].hierarchical is False and r.layers[0].hier_shape == (2, 4)
    r = validate_parallel(PP(nodes=2, devices_per_node=4), 8, [8])
    assert r.layers[0].use_hierarchical(1e3) is True and r.layers[0].use_hierarchical(1e10) is False
    assert "ep    8" in r.describe()


def test_no_moe_layers_and_single_rank():
    r = validate_parallel(PP(), 1, [])
    assert r.layers == () and (r.world, r.dp) == (1, 1)
    r = validate_parallel(PP(), 1, [4])
    assert (r.layers[0].ep, r.layers[0].experts_per_rank) == (1, 4)


# ------------------------------------------------------------------ validate_parallel: errors

@pytest.mark.parametrize("pp, world, counts, msg", [
    (PP(nodes=2, devices_per_node=4), 6, [8],
     "parallel: nodes * devices_per_node != world_size: 2 * 4 != 6"),
    (PP(nodes=2, devices_per_node=4, tp=3), 8, [8],
     "parallel: tp * dp != world_size: tp = 3 does not divide world_size 8"),
    (PP(nodes=3, devices_per_node=4, ep=6), 12, [1, 1, 1, 32],
     "MoE layer 3 has 32 experts, not divisible by its ep = 6"),
    (PP(nodes=2, devices_per_node=4, ep=6), 8, [12],
     "ep * edp != world_size: ep = 6 does not divide world_size 8"),
    (PP(nodes=2, devices_per_node=4, ep=16), 8, [16],
     "ep = 16 exceeds world_size 8"),
    (PP(nodes=2, devices_per_node=4, ep=[4, 4, 4]), 8, [8, 8],
     "ep lists 3 degrees but the model has 2 MoE layers"),
    (PP(nodes=2, devices_per_node=4, ep=8), 8, [3],
     "expert slicing needs ep to be a multiple of the expert count (8 % 3 != 0)"),
    (PP(nodes=2, devices_per_node=4, tp=8), 8, [8],
     None),  # tp = whole world: allowed (multiple of devices_per_node)
    (PP(nodes=2, devices_per_node=6, tp=4), 12, [12],
     "tp = 4 straddles nodes of 6 devices"),
    (PP(nodes=3, devices_per_node=4, ep=6, hierarchical_a2a=True), 12, [12],
     "hierarchical_a2a = true needs EP groups of whole nodes"),
])
def test_errors_name_the_product(pp, world, counts, msg):
    if msg is None:
        validate_parallel(pp, world, counts)
        return
    with pytest.raises(PlanError) as e:
        validate_parallel(pp, world, counts)
    assert msg in str(e.value), str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(PlanError) as e:
        validate_parallel(PP(nodes=2, devices_per_node=4, tp=3, ep=[6, 8, 3]), 8, [32, 3, 2, 4])
    text = str(e.value)
    assert "2 problems" in text and "tp = 3" in text and "ep lists 3 degrees" in text


def test_bad_inputs():
    with pytest.raises(PlanError, match="expert count"):
        validate_parallel(PP(), 1, [0])
    with pytest.raises(PlanError, match="ParallelPlan"):
        validate_parallel({"nodes": 1}, 1, [1])


# ------------------------------------------------------------------ rank_layout (pure)

def test_rank_layout_2x4():
    r = validate_parallel(PP(nodes=2, devices_per_node=4, tp=2, ep=[4, 8, 8]), 8, [32, 64, 2])
    lay = rank_layout(r)
    assert lay["intra_node"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert lay["inter_node"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert lay["tp"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert lay["dp"] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert lay["ep4"] == [(0, 1, 2, 3), (4, 5, 6, 7)] and lay["edp4"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert lay["ep8"] == [tuple(range(8))] and lay["edp8"] == [(i,) for i in range(8)]
    assert lay["slice4"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert lay["ep8_inter"] == lay["inter_node"]
    for name, part in lay.items():                     # every family partitions the world
        assert sorted(q for t in part for q in t) == list(range(8)), name


def test_rank_layout_ep_inter_inside_blocks():
    # 4 nodes x 2, ep = 4: each EP block spans 2 nodes; inter groups stay inside the block.
    r = validate_parallel(PP(nodes=4, devices_per_node=2, ep=4), 8, [8])
    lay = rank_layout(r)
    assert lay["ep4"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert lay["ep4_inter"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert r.layers[0].hier_shape == (2, 2)


# ------------------------------------------------------------------ build_groups on 4 gloo ranks

def _check_layout(rank, pp, counts):
    """Build the groups of a plan and check each against rank_layout; returns the ProcessGroups."""
    import torch.distributed as dist

    r = validate_parallel(pp, dist.get_world_size(), counts)
    pg = build_groups(r)
    lay = rank_layout(r)
    assert tuple(pg.mesh.mesh.shape) == (pp.nodes, pp.devices_per_node)
    seen = {}
    for name, part in lay.items():
        mine = next(t for t in part if rank in t)
        assert pg.ranks(name) == mine, name
        assert tuple(dist.get_process_group_ranks(pg.group(name))) == mine, name
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=pg.group(name))      # every group is usable
        assert t.item() == sum(mine), name
        names = [None] * len(mine)                    # members agree on which group this is
        dist.all_gather_object(names, pg.group(name).group_name, group=pg.group(name))
        assert len(set(names)) == 1, (name, names)
        assert seen.setdefault(mine, pg.group(name)) is pg.group(name), name   # one group per rank tuple
    return pg


def _check_groups(rank, world):
    from moefx.runtime.all_to_all import flat_all_to_all, hierarchical_all_to_all

    pg = _check_layout(rank, PP(nodes=2, devices_per_node=2, tp=2, ep=[2, 4, 4]), [4, 8, 2])
    assert pg.mesh.mesh_dim_names == ("node", "local")
    # cached by rank tuple: equal tuples share one ProcessGroup object
    assert pg.group("ep2") is pg.group("intra_node") and pg.group("tp") is pg.group("intra_node")
    assert pg.group("ep4") is pg.world and pg.group("ep4_inter") is pg.inter_node
    assert pg.meshes["ep4"].mesh_dim_names == ("edp", "ep") and tuple(pg.meshes["tp"].mesh.shape) == (2, 2)

    lg = pg.layer(1)                                   # 8 experts, ep 4 over 2 nodes: hierarchical
    assert lg.names == {"ep": "ep4", "edp": "edp4", "intra": "intra_node", "inter": "ep4_inter"}
    assert pg.layer(0).intra is None and pg.layer(2).names["expert_slice"] == "slice2"
    # end to end on the built groups: hierarchical == flat over the EP group
    g = torch.Generator().manual_seed(0)
    S = torch.randint(0, 3, (4, 4), generator=g)
    x = torch.randn(int(S[rank].sum()), 2, generator=g) + rank
    send, recv = S[rank].tolist(), S[:, rank].tolist()
    flat = flat_all_to_all(x, send, recv, lg.ep)
    hier = hierarchical_all_to_all(x, send, recv, lg.intra, lg.inter, 2, 2)
    assert torch.equal(flat, hier)

    with pytest.raises(PlanError, match="resolved for world_size 8"):
        build_groups(validate_parallel(PP(nodes=2, devices_per_node=4), 8, [8]))


def _check_groups_world8(rank, world):
    pg = _check_layout(rank, PP(nodes=2, devices_per_node=4, tp=2, ep=[4, 8, 8]), [32, 64, 2])
    assert pg.layer(1).names["inter"] == "ep8_inter" and pg.layer(2).names["expert_slice"] == "slice4"
    pg = _check_layout(rank, PP(nodes=4, devices_per_node=2, ep=4), [8])       # EP blocks of 2 nodes
    assert pg.ranks("ep4_inter") == ((0, 2), (1, 3), (4, 6), (5, 7))[[0, 1, 0, 1, 2, 3, 2, 3][rank]]


@pytest.mark.dist
def test_build_groups_world4():
    run_world(_check_groups, 4)


@pytest.mark.dist
def test_build_groups_world8():
    run_world(_check_groups_world8, 8)


def test_build_groups_needs_init():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(PlanError, match="init_from_env"):
        build_groups(validate_parallel(PP(), 1, [1]))
