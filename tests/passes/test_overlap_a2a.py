"""overlap_a2a: each expert all-to-all is an issue node and a separate wait, with the layer's
residual MLP between the dispatch pair and its coefficient between the combine pair; never when
that would reorder random draws; switched off by plan.disable."""
import functools
import warnings

import pytest
import torch

import moefx
from moefx import meta as M
from moefx.facts import facts
from moefx.models import load_model
from moefx.nn import collectives as C
from moefx.passes.overlap_a2a import _move

MOE = {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}
EP2 = {"nodes": 1, "devices_per_node": 2, "ep": 2}
HIER = {"nodes": 2, "devices_per_node": 2, "ep": 4, "hierarchical_a2a": True}
TP2 = {"nodes": 1, "devices_per_node": 2, "ep": 2, "tp": 2}


@functools.lru_cache(maxsize=None)
def _converted(train: bool = False, model: str = "gpt2-tiny", **moe):
    model, inputs = load_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moefx.convert(model, {"moe": {**MOE, **moe}}, inputs, train=train)


def _view(gm, parallel, **plan):
    p = moefx.Plan.from_dict({"moe": MOE, "parallel": parallel, **plan})
    return moefx.partitioned_view(gm, p, rank=1)


def _pairs(gm, layer, step):
    """(start, wait) of layer's `step` all-to-alls, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.target is C.ALL_TO_ALL_START and n.meta.get(M.LAYER) == layer and n.meta.get(M.A2A) == step:
            (wait,) = n.users
            assert wait.target is C.WAIT
            out.append((n, wait))
    return out


def _between(gm, role, layer, start, wait):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    block = start.meta[M.BLOCK]
    nodes = [n for n in gm.graph.nodes if n.meta.get(M.ROLE) == role
             and (n.meta.get(M.LAYER) == layer if role == "coef" else n.meta.get(M.BLOCK) == block)]
    return [order[start] < order[n] < order[wait] for n in nodes]


@pytest.mark.parametrize("parallel, dispatch_step, combine_step", [(EP2, 0, 0), (HIER, 1, 0), (TP2, 0, 0)],
                         ids=["flat", "hierarchical", "tensor-parallel"])
def test_residual_mlp_and_coefficient_run_while_the_all_to_alls_are_in_flight(parallel, dispatch_step,
                                                                              combine_step):
    gm = _view(_converted(), parallel)
    assert not any(n.target is C.ALL_TO_ALL for n in gm.graph.nodes)
    assert facts(gm).overlapped_layers == (0, 1)
    for layer in (0, 1):
        dispatch, combine = _pairs(gm, layer, "dispatch"), _pairs(gm, layer, "combine")
        assert len(dispatch) == len(combine) == (2 if parallel is HIER else 1)
        # the inter-node step of a hierarchical all-to-all is the one overlapped
        residual = _between(gm, "residual", layer, *dispatch[dispatch_step])
        assert len(residual) > 5 and all(residual[:-1]), residual   # the last one reshapes the sum, after
        coef = _between(gm, "coef", layer, *combine[combine_step])
        assert coef and all(coef)
        if parallel is TP2:              # the split MLP's all-reduce moves along with it
            start, wait = dispatch[dispatch_step]
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            reduces = [n for n in gm.graph.nodes if n.target is C.TP_REDUCE and order[start] < order[n] < order[wait]]
            assert len(reduces) == 1
    gm.graph.lint()


def test_disabled_the_all_to_alls_stay_fused_and_in_place():
    # (that both schedules compute the same numbers is checked on real ranks in test_distribute)
    gm = _converted()
    plan = moefx.Plan.from_dict({"moe": MOE, "parallel": EP2})
    overlapped = moefx.partitioned_view(gm, plan, rank=0)
    serial = moefx.partitioned_view(gm, moefx.Plan.from_dict({**plan.to_dict(), "disable": ["overlap_a2a"]}),
                                    rank=0)
    assert sum(n.target is C.ALL_TO_ALL for n in serial.graph.nodes) == 4
    assert not any(n.target in (C.ALL_TO_ALL_START, C.WAIT) for n in serial.graph.nodes)
    order = lambda g: [n.name for n in g.graph.nodes if n.meta.get(M.ROLE) == "residual"]  # noqa: E731
    assert sorted(order(overlapped)) == sorted(order(serial))
    assert [n.meta.get(M.ROLE) for n in overlapped.graph.nodes] != [n.meta.get(M.ROLE) for n in serial.graph.nodes]


def _tiny_graph(crossed):
    """x -> d = dropout(x) [the node to move] -> c = crossed(x) -> all_to_all_start(c) -> wait -> + d."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    d = g.call_function(torch.ops.aten.dropout.default, (x, 0.5, True))
    c = g.call_function(crossed, (x,))
    start = g.call_function(C.ALL_TO_ALL_START, (c, [1], [1], "ep2"))
    wait = g.call_function(C.WAIT, (start,))
    g.output(g.call_function(torch.ops.aten.add.Tensor, (wait, d)))
    return torch.fx.GraphModule(torch.nn.Module(), g), d, start, wait


@pytest.mark.parametrize("crossed, moves", [(torch.ops.aten.relu.default, True),
                                            (torch.ops.aten.bernoulli.default, False)])
def test_random_draws_keep_their_order(crossed, moves):
    # a dropout may move past a deterministic node, never past another random draw: the masks would swap
    gm, d, start, wait = _tiny_graph(crossed)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert _move(gm, [d], start, wait, order) is moves
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert (order[start] < order[d] < order[wait]) is moves
    gm.graph.lint()


def test_train_mode_dropout_in_the_residual_mlp_moves_when_nothing_random_is_crossed():
    # T5's FFN has dropout between its projections; its residual MLP follows the (noisy) router in
    # the graph, so moving it into the dispatch crosses only deterministic layout nodes
    gm = _view(_converted(train=True, model="t5-tiny", noisy_gate="rsample"), EP2)
    assert any("dropout" in str(n.target) for n in gm.graph.nodes if n.meta.get(M.ROLE) == "residual")
    assert facts(gm).overlapped_layers == (0, 1)


def test_a_single_rank_plan_has_nothing_to_overlap():
    gm = _view(_converted(), {"nodes": 1, "devices_per_node": 2, "ep": 1})
    assert "overlap_a2a" not in facts(gm).passes
    assert not any(n.target is C.ALL_TO_ALL_START for n in gm.graph.nodes)
