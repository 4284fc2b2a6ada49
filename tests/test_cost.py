"""Flat vs hierarchical all-to-all cost model: the obvious regimes, and sympy == plain python."""
import pytest

from moefx.cost import (a2a_cost_exprs, choose_hierarchical, crossover_bytes, flat_a2a_time,
                                hierarchical_a2a_time)


def test_tiny_messages_on_many_nodes_go_hierarchical():
    assert choose_hierarchical(4096, nodes=16, devices_per_node=8)
    assert choose_hierarchical(1, nodes=2, devices_per_node=2)


def test_one_node_or_one_device_per_node_stays_flat():
    assert not choose_hierarchical(1, nodes=1, devices_per_node=8)
    assert not choose_hierarchical(1, nodes=16, devices_per_node=1)
    assert crossover_bytes(1, 8) == 0.0


def test_huge_messages_go_flat():
    assert not choose_hierarchical(1 << 30, nodes=16, devices_per_node=8)


def test_crossover_is_where_the_choice_flips():
    v = crossover_bytes(16, 8)
    assert 1e6 < v < 1e9
    assert choose_hierarchical(v * 0.99, 16, 8) and not choose_hierarchical(v * 1.01, 16, 8)
    # more nodes -> more hops saved -> larger crossover
    assert crossover_bytes(64, 8) > crossover_bytes(4, 8)
    # zero latency: hierarchical never wins
    assert not choose_hierarchical(1, 16, 8, alpha=0.0)


def test_sympy_matches_python():
    t_flat, t_hier, s = a2a_cost_exprs()
    vals = {"N": 4, "G": 8, "V": 3e6, "alpha": 7e-6, "beta_intra": 1e11, "beta_inter": 1e10, "beta_mem": 5e11}
    sub = {s[k]: v for k, v in vals.items()}
    assert float(t_flat.subs(sub)) == pytest.approx(flat_a2a_time(3e6, 4, 8, 7e-6, 1e11, 1e10))
    assert float(t_hier.subs(sub)) == pytest.approx(hierarchical_a2a_time(3e6, 4, 8, 7e-6, 1e11, 1e10, 5e11))
    # with V = 0 the hop saving is exactly (G - 1)(N - 1) alpha
    import sympy as sp
    diff = sp.simplify((t_flat - t_hier).subs(s["V"], 0))
    assert sp.simplify(diff - (s["G"] - 1) * (s["N"] - 1) * s["alpha"]) == 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        choose_hierarchical(-1, 2, 2)


# ------------------------------------------------------------------ measured profiles

def test_a_fixed_cost_per_call_makes_flat_win_and_slow_links_make_hierarchical_win():
    from moefx.cost import CostProfile

    loopback = CostProfile(launch=2e-4, alpha_intra=5e-6, alpha_inter=5e-6, beta_intra=2e9, beta_inter=2e9,
                           beta_mem=5e9)
    assert not loopback.choose_hierarchical(4096, 2, 2)
    assert not loopback.choose_hierarchical(1 << 20, 2, 4)
    slow = CostProfile(launch=2e-4, alpha_intra=5e-6, alpha_inter=2e-3, beta_intra=2e9, beta_inter=2e8, beta_mem=5e9)
    assert slow.choose_hierarchical(4096, 2, 2) and slow.choose_hierarchical(4096, 4, 8)
    assert not slow.choose_hierarchical(4096, 1, 8)          # one node: nothing to save


def test_profiles_round_trip(tmp_path):
    from moefx.cost import CostProfile
    from moefx.errors import PlanError

    p = CostProfile(launch=1e-4, alpha_inter=3e-3, source="test")
    assert CostProfile.load(p.save(tmp_path / "p.json")) == p
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="cannot read the cost profile .* write one with `moefx calibrate`"):
        CostProfile.load(tmp_path / "bad.json")


def test_the_hierarchical_pass_decides_with_the_profile():
    import moefx
    from moefx.cost import CostProfile
    from moefx.distribute import resolve
    from moefx.models import load_model
    from moefx.passes.base import PassContext
    from moefx.passes.pipeline import run

    model, inputs = load_model("gpt2-tiny")
    plan = moefx.Plan.from_dict({"moe": {"experts": [4, 8], "every": 2, "drop_tokens": False},
                                 "parallel": {"nodes": 2, "devices_per_node": 2, "ep": 4}})
    gm = moefx.convert(model, plan, inputs)
    resolved = resolve(gm, plan.parallel, 4)
    for profile, want in ((CostProfile(launch=2e-4, alpha_inter=5e-6, beta_inter=2e9, beta_intra=2e9), []),
                          (CostProfile(launch=2e-4, alpha_inter=2e-3, beta_inter=2e8), [0, 1])):
        out = run(gm, PassContext(plan, rank=1, resolved=resolved, tokens_per_rank=16, profile=profile), "distribute")
        assert out.meta.get("moefx_hierarchical_layers", []) == want
