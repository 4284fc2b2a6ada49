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
