"""Plan parsing and validation: every error names the problem and the fix."""
import json

import pytest

from moefx import MoEPlan, ParallelPlan, Plan, PlanError, StudentPlan


def test_expert_forms_resolve_to_the_same_counts():
    want = {1: 32, 3: 32, 5: 64}
    for experts in ([32, 32, 64], "32x2+64", {"levels": [32, 64], "boundaries": [0.6]}):
        assert MoEPlan(experts=experts, every=2).layer_experts(6) == want
    assert MoEPlan(experts=8, every=1).layer_experts(3) == {0: 8, 1: 8, 2: 8}


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
    toml.write_text('[moe]\nexperts = "4x2"\nevery = 2\nresidual = true\n[parallel]\nnodes = 2\nep = [1, 2]\n')
    plan = Plan.from_file(toml)
    assert plan.moe.residual and plan.parallel.ep == (1, 2) and plan.parallel.world_size == 2
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


# ------------------------------------------------------------------ strict types (issue: strict plans)

@pytest.mark.parametrize("section, value, match", [
    ("moe", {"residual": "no"}, r"moe.residual must be true or false, got 'no' \(str\): write true / false"),
    ("moe", {"drop_tokens": "false"}, r"moe.drop_tokens must be true or false, got 'false'"),
    ("moe", {"residual": 1}, r"moe.residual must be true or false, got 1 \(int\)"),
    ("moe", {"top_k": True}, r"moe.top_k must be an integer, got True \(bool\)"),
    ("moe", {"experts": True}, r"moe.experts must be an int"),
    ("moe", {"experts": [4, True]}, r"moe.experts\[1\] must be an integer, got True"),
    ("moe", {"top_k": 1.0}, r"moe.top_k must be an integer, got 1.0 \(float\)"),
    ("moe", {"capacity_factor": float("inf")}, r"moe.capacity_factor must be finite, got inf"),
    ("moe", {"capacity_factor": float("nan")}, r"moe.capacity_factor must be finite"),
    ("moe", {"capacity_factor": "1.5"}, r"moe.capacity_factor must be a number, got '1.5' \(str\): write it without quotes"),
    ("moe", {"min_capacity": "4"}, r"moe.min_capacity must be an integer, got '4' \(str\)"),
    ("moe", {"aux_loss_coef": -1}, r"moe.aux_loss_coef must be >= 0"),
    ("moe", {"every": "2"}, r"moe.every must be an integer"),
    ("moe", {"seed": -3}, r"moe.seed must be >= 0"),
    ("moe", {"experts": "4x0"}, r"not of the form"),
    ("parallel", {"tp": "2"}, r"parallel.tp must be an integer, got '2'"),
    ("parallel", {"nodes": True}, r"parallel.nodes must be an integer, got True"),
    ("parallel", {"ep": "4"}, r"parallel.ep must be 'auto', an int >= 1 or a list of them, got '4'"),
    ("parallel", {"ep": [2, "a"]}, r"parallel.ep\[1\] must be an integer"),
    ("parallel", {"hierarchical_a2a": "yes"}, r"parallel.hierarchical_a2a must be one of \[True, False, 'auto'\]"),
    ("parallel", {"hierarchical_a2a": 1}, r"parallel.hierarchical_a2a must be one of"),
    ("student", {"layers": "3"}, r"student.layers must be an integer"),
    ("student", {"depth": float("inf")}, r"student.depth must be finite"),
    ("lowering", {"gating": True}, r"lowering.gating must be one of"),
])
def test_strict_field_types(section, value, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({section: value})


def test_disable_is_a_list_of_known_passes():
    with pytest.raises(PlanError, match=r"disable must be a list of pass names, got 'lower_gating' \(str\): "
                                        r"write disable = \['lower_gating'\]"):
        Plan.from_dict({"disable": "lower_gating"})
    with pytest.raises(PlanError, match=r"disable names an unknown pass 'partition'; the passes are \['pr_moe', "
                                        r"'shrink', 'lower_gating', 'expert_parallel', 'tensor_parallel', 'hierarchical_a2a', 'overlap_a2a'\]"):
        Plan.from_dict({"disable": ["partition"]})
    assert Plan.from_dict({"disable": ["lower_gating"]}).disable == ("lower_gating",)


@pytest.mark.parametrize("parallel, match", [
    ({"nodes": 1, "devices_per_node": 8, "tp": 3}, "tp = 3 does not divide world_size = nodes \\* devices_per_node = 1 \\* 8 = 8"),
    ({"nodes": 2, "devices_per_node": 6, "tp": 4}, "tp = 4 straddles nodes of 6 devices"),
    ({"nodes": 2, "devices_per_node": 4, "ep": 3}, "ep = 3 does not divide world_size 8"),
    ({"nodes": 2, "devices_per_node": 4, "ep": 16}, "ep = 16 does not divide world_size 8"),
    ({"nodes": 2, "devices_per_node": 4, "ep": [4, 3]}, "MoE layer 1: ep \\* edp != world_size: ep = 3"),
    ({"nodes": 3, "devices_per_node": 4, "ep": 6, "hierarchical_a2a": True}, "needs EP groups of whole nodes"),
])
def test_parallel_checks_at_parse_time(parallel, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({"parallel": parallel})


def test_malformed_files_name_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[moe]\nexperts = 4\ntop_k = \n')
    with pytest.raises(PlanError, match=r"bad.toml: not valid TOML: .*line 3, column 9"):
        Plan.from_file(bad)
    js = tmp_path / "bad.json"
    js.write_text('{"moe": {"experts": 4,}}')
    with pytest.raises(PlanError, match=r"bad.json:1:23: not valid JSON: Expecting property name"):
        Plan.from_file(js)
    typed = tmp_path / "typed.toml"
    typed.write_text('[moe]\nresidual = "no"\n')
    with pytest.raises(PlanError, match=r"typed.toml: moe.residual must be true or false"):
        Plan.from_file(typed)
