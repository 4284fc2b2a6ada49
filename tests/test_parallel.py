"""validate_parallel and rank_layout: pure, no torch.distributed."""
from __future__ import annotations

import pytest

from moefx.errors import PlanError
from moefx.parallel import rank_layout, validate_parallel
from moefx.plan import ParallelPlan


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
    assert (r.tp, r.dp) == (2, 4) and r.coordinated
    assert [lp.hierarchical for lp in r.layers] == [True, False]       # ep 4 lives inside one node
    assert r.layers[1].hier_shape is None
    r = validate_parallel(PP(nodes=2, devices_per_node=4, hierarchical_a2a=False), 8, [8])
    assert r.layers[0].hierarchical is False and r.layers[0].hier_shape == (2, 4)
    r = validate_parallel(PP(nodes=2, devices_per_node=4, tp=2, coordinated_a2a=False), 8, [8])
    assert not r.coordinated and r.expert_grad_divisor() == 8
    assert "ep    8" in r.describe()


def test_no_moe_layers_and_single_rank():
    r = validate_parallel(PP(), 1, [])
    assert r.layers == () and (r.world, r.dp) == (1, 1)
    r = validate_parallel(PP(), 1, [4])
    assert (r.layers[0].ep, r.layers[0].experts_per_rank) == (1, 4)


# ------------------------------------------------------------------ validate_parallel: errors

@pytest.mark.parametrize("pp, world, counts, msg", [
    (dict(nodes=2, devices_per_node=4), 6, [8],
     "parallel: nodes * devices_per_node != world_size: 2 * 4 != 6"),
    (dict(nodes=3, devices_per_node=4, ep=6), 12, [1, 1, 1, 32],
     "MoE layer 3 has 32 experts, not divisible by its ep = 6"),
    (dict(nodes=2, devices_per_node=4, ep=[4, 4, 4]), 8, [8, 8],
     "ep lists 3 degrees but the model has 2 MoE layers"),
    (dict(nodes=2, devices_per_node=4, ep=8), 8, [3],
     "expert slicing needs ep to be a multiple of the expert count (8 % 3 != 0)"),
    (dict(nodes=2, devices_per_node=4, tp=8), 8, [8],
     None),  # tp = whole world: allowed (multiple of devices_per_node)
])
def test_errors_name_the_product(pp, world, counts, msg):
    if msg is None:
        validate_parallel(PP(**pp), world, counts)
        return
    with pytest.raises(PlanError) as e:
        validate_parallel(PP(**pp), world, counts)
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("pp, msg", [
    (dict(nodes=2, devices_per_node=4, tp=3), "parallel: tp * dp != world_size: tp = 3 does not divide world_size"),
    (dict(nodes=2, devices_per_node=4, ep=6), "ep * edp != world_size: ep = 6 does not divide world_size 8"),
    (dict(nodes=2, devices_per_node=4, ep=16), "ep = 16 does not divide world_size 8"),
    (dict(nodes=2, devices_per_node=6, tp=4), "tp = 4 straddles nodes of 6 devices"),
    (dict(nodes=3, devices_per_node=4, ep=6, hierarchical_a2a=True), "hierarchical_a2a = true needs EP groups of whole nodes"),
])
def test_model_free_errors_come_at_parse_time(pp, msg):
    with pytest.raises(PlanError) as e:
        PP(**pp)
    assert msg in str(e.value), str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(PlanError) as e:
        validate_parallel(PP(nodes=2, devices_per_node=4, ep=[8, 8, 2, 4]), 8, [32, 3, 2, 6])
    text = str(e.value)
    assert "2 problems" in text and "MoE layer 1 has 3 experts" in text and "MoE layer 3 has 6 experts" in text


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
