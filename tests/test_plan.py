"""Plan parsing and validation: every error names the problem and the fix."""
import json

import pytest

from moefx import MoEPlan, ParallelPlan, Plan, PlanError, StudentPlan


def test_expert_forms_resolve_to_the_same_counts():
    want = {1: 32, 3: 32, 5: 64}
    for experts in ([32, 32, 64], "32x2+64", {"levels": [32, 64], "boundaries": [0.6]}):
        assert MoEPlan(experts=experts, every=2).layer_experts(6) == want
    assert MoEPlan(experts=8).layer_experts(3) == {0: 8, 1: 8, 2: 8}


def test_every_follows_deepspeed_convention():
    assert MoEPlan(every=2).moe_blocks(24) == list(range(1, 24, 2))
    assert MoEPlan(every=3).moe_blocks(7) == [2, 5]


@pytest.mark.parametrize("section, match", [
    ({"experts": 0}, "moe.experts must be >= 1"),
    ({"experts": [4, -1]}, r"moe.experts\[1\]"),
    ({"experts": "4y2"}, "not of the form"),
    ({"experts": {"levels": [4, 8]}}, "len\\(levels\\) == len\\(boundaries\\) \\+ 1"),
    ({"every": 0}, "moe.every"),
    ({"top_k": 0}, "moe.top_k"),
    ({"noisy_gate": "gauss"}, "moe.noisy_gate"),
    ({"init": "zeros"}, "moe.init"),
    ({"use_rts": True, "top_k": 2}, "use_rts"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"expert": 4}, "unknown key"),
])
def test_bad_moe_sections(section, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({"moe": section})


def test_errors_that_need_the_model():
    with pytest.raises(PlanError, match="gives 3 counts but the model has 8 blocks.*give 4 counts"):
        MoEPlan(experts=[4, 4, 8], every=2).layer_experts(8)
    with pytest.raises(PlanError, match="top_k = 4 exceeds the 2 experts of block 1"):
        MoEPlan(experts=[2, 8], every=2, top_k=4).layer_experts(4)
    with pytest.raises(PlanError, match="selects no block"):
        MoEPlan(every=5).layer_experts(4)
    with pytest.raises(PlanError, match="exceeds the teacher's 4 blocks"):
        StudentPlan(layers=6).num_layers(4)


def test_other_sections():
    with pytest.raises(PlanError, match="unknown plan section"):
        Plan.from_dict({"moes": {}})
    with pytest.raises(PlanError, match="parallel.tp"):
        Plan.from_dict({"parallel": {"tp": 0}})
    with pytest.raises(PlanError, match="hierarchical_a2a"):
        ParallelPlan(hierarchical_a2a="maybe")
    with pytest.raises(PlanError, match="lowering.gating"):
        Plan.from_dict({"lowering": {"gating": "cuda"}})
    with pytest.raises(PlanError, match="student.layers or student.depth, not both"):
        StudentPlan(layers=2, depth=0.5)


def test_files_round_trip(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[moe]\nexperts = "4x2"\nevery = 2\nresidual = true\n[parallel]\nnodes = 2\nep = [2, 4]\n')
    plan = Plan.from_file(toml)
    assert plan.moe.residual and plan.parallel.ep == (2, 4) and plan.parallel.world_size == 2
    js = tmp_path / "p.json"
    js.write_text(json.dumps(plan.to_dict()))
    assert Plan.from_file(js) == plan
    with pytest.raises(PlanError, match="does not exist"):
        Plan.from_file(tmp_path / "missing.toml")
    with pytest.raises(PlanError, match=".toml or .json"):
        Plan.from_file(toml.rename(tmp_path / "p.yaml"))


def test_paper_plans_parse():
    plan = Plan.from_file("examples/plans/350m_pr_moe_32_64.toml")
    assert list(plan.moe.layer_experts(24).values()) == [32] * 10 + [64] * 2
    assert plan.moe.residual and plan.moe.top_k == 1
    assert set(Plan.from_file("examples/plans/350m_moe_128.toml").moe.layer_experts(24).values()) == {128}
