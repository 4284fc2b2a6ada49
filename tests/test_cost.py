"""Flat vs hierarchical all-to-all cost model (`CostProfile`): the obvious regimes, the formulas
against hand-computed values, measured profiles, and the pass deciding with a profile."""
import pytest

from moefx.cost import CostProfile
from moefx.facts import facts

GPU = CostProfile()          # the defaults: a GPU cluster, no fixed cost per call


def test_tiny_messages_on_many_nodes_go_hierarchical():
    assert GPU.choose_hierarchical(4096, nodes=16, devices_per_node=8)
    assert GPU.choose_hierarchical(1, nodes=2, devices_per_node=2)


def test_one_node_or_one_device_per_node_stays_flat():
    assert not GPU.choose_hierarchical(1, nodes=1, devices_per_node=8)
    assert not GPU.choose_hierarchical(1, nodes=16, devices_per_node=1)


def test_huge_messages_go_flat():
    assert not GPU.choose_hierarchical(1 << 30, nodes=16, devices_per_node=8)


def test_the_choice_flips_once_between_small_and_large_messages():
    sizes = [1 << k for k in range(0, 34)]
    picks = [GPU.choose_hierarchical(v, 16, 8) for v in sizes]
    flips = [i for i in range(1, len(picks)) if picks[i] != picks[i - 1]]
    assert len(flips) == 1 and picks[0] and not picks[-1]
    # zero latency: hierarchical never wins (same inter-node volume, more intra-node bytes, copies)
    free = CostProfile(alpha_intra=0.0, alpha_inter=0.0)
    assert not any(free.choose_hierarchical(v, 16, 8) for v in sizes)


def test_the_formulas_against_hand_computed_values():
    p = CostProfile(launch=1e-4, alpha_intra=2e-6, alpha_inter=7e-6, beta_intra=1e11, beta_inter=1e10, beta_mem=5e11)
    N, G, V = 4, 8, 3e6
    flat = 1e-4 + 7 * 2e-6 + 24 * 7e-6 + V * 7 / (32 * 1e11) + V * 24 / (32 * 1e10)
    hier = 2e-4 + 7 * 2e-6 + 3 * 7e-6 + V * 7 / (8 * 1e11) + V * 3 / (4 * 1e10) + 2 * V / 5e11
    assert p.flat_time(V, N, G) == pytest.approx(flat, rel=1e-12)
    assert p.hierarchical_time(V, N, G) == pytest.approx(hier, rel=1e-12)
    # with V = 0 the message saving is (G - 1)(N - 1) inter-node messages, less one extra call
    saved = p.flat_time(0, N, G) - p.hierarchical_time(0, N, G)
    assert saved == pytest.approx((G - 1) * (N - 1) * 7e-6 - 1e-4, rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError):
        GPU.choose_hierarchical(-1, 2, 2)


# ------------------------------------------------------------------ measured profiles

def test_a_fixed_cost_per_call_makes_flat_win_and_slow_links_make_hierarchical_win():

    loopback = CostProfile(launch=2e-4, alpha_intra=5e-6, alpha_inter=5e-6, beta_intra=2e9, beta_inter=2e9,
                           beta_mem=5e9)
    assert not loopback.choose_hierarchical(4096, 2, 2)
    assert not loopback.choose_hierarchical(1 << 20, 2, 4)
    slow = CostProfile(launch=2e-4, alpha_intra=5e-6, alpha_inter=2e-3, beta_intra=2e9, beta_inter=2e8, beta_mem=5e9)
    assert slow.choose_hierarchical(4096, 2, 2) and slow.choose_hierarchical(4096, 4, 8)
    assert not slow.choose_hierarchical(4096, 1, 8)          # one node: nothing to save


def test_profiles_round_trip(tmp_path):
    from moefx.errors import PlanError

    p = CostProfile(launch=1e-4, alpha_inter=3e-3, source="test")
    assert CostProfile.load(p.save(tmp_path / "p.json")) == p
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="cannot read the cost profile .* write one with `moefx calibrate`"):
        CostProfile.load(tmp_path / "bad.json")


def test_the_hierarchical_pass_decides_with_the_profile():
    import moefx
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
        assert list(facts(out).hierarchical_layers) == want


def test_a_profile_reads_with_units_and_flags_a_fit_on_noise():
    from moefx.runtime.calibrate import Timings, fit_profile

    small = {"world": 300e-6, "intra": 200e-6, "inter": 150e-6}
    sane = fit_profile(2, 2, Timings(small, {"world": 9e-3, "intra": 5e-3, "inter": 8e-3}, 1e-3), "test")
    text = sane.describe()
    assert "us/call" in text and "GB/s" in text and "implausible" not in text and sane.implausible() == []
    # the large message 2 ns slower than the small one: a bandwidth of 500 TB/s is timer noise
    noise = fit_profile(2, 2, Timings(small, {"world": 300e-6, "intra": 200e-6 + 2e-9, "inter": 150e-6}, 1e-3),
                        "test")
    assert "beta_intra" in noise.implausible() and "implausible: beta_intra" in noise.describe()
    assert "n/a (no such peers)" in fit_profile(1, 2, Timings(small, small, 1e-3), "test").describe()
