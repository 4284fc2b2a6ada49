"""Converted models with distinct experts against an independent eager MoE written here.

Upcycled experts are identical copies of the dense FFN, so a token sent to the wrong expert, a
weight on the wrong choice or a dropped token in the wrong place cannot show in a
function-preservation test. Here the experts differ (random init, or noisy copies) and the
reference routes every token by hand, loops over tokens and experts, and runs each expert with the
Hugging Face model's own activation: nothing of moefx's routing table, dispatch, combine or
extracted FFN middle is used.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moefx
from moefx.models import load_model
from moefx.nn.moe import moe_layers

from conftest import first_tensor


def _route_by_hand(logits: torch.Tensor, k: int, unit_top1: bool, capacity: int | None):
    """[(experts, weights)] per token, DeepSpeed's rules, written out token by token."""
    S, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    choices = []
    for s in range(S):
        p = probs[s]
        if k == 1:
            picks = [int(torch.argmax(p))]
        elif k == 2:
            first = int(torch.argmax(p))
            masked = logits[s].float().clone()
            masked[first] = -math.inf
            picks = [first, int(torch.argmax(masked))]
        else:
            picks = [int(i) for i in torch.argsort(p, descending=True, stable=True)[:k]]
        choices.append(picks)
    kept = [[True] * k for _ in range(S)]
    if capacity is not None:                       # position order; top-2: all first choices first
        load = [0] * E
        order = [(s, j) for j in range(k) for s in range(S)] if k == 2 else [(s, j) for s in range(S) for j in range(k)]
        for s, j in order:
            e = choices[s][j]
            kept[s][j] = load[e] < capacity
            load[e] += 1
    out = []
    for s in range(S):
        p = probs[s]
        ps = [float(p[e]) if kept[s][j] else 0.0 for j, e in enumerate(choices[s])]
        if k == 1:
            w = [1.0 if (unit_top1 and kept[s][0]) else ps[0]]
        else:
            total = sum(ps)
            w = [x / max(total, torch.finfo(torch.float32).eps) for x in ps]
        out.append([(e, wi) for e, wi, kj in zip(choices[s], w, kept[s]) if kj])
    return out


class ReferenceMoE(torch.nn.Module):
    """An eager MoE block made from a converted layer's parameters and the dense block's MLP."""

    def __init__(self, layer, dense_mlp, expert_fn, capacity_factor=None):
        super().__init__()
        self.layer, self.dense, self.expert_fn, self.cf = layer, dense_mlp, expert_fn, capacity_factor

    def forward(self, h):
        B, T, d = h.shape
        x = h.reshape(-1, d)
        logits = x.float() @ self.layer.router.weight.float().t()
        g = self.layer.gate
        cap = None
        if g.drop_tokens:
            S, E = logits.shape
            cap = max(math.ceil(S / E * g.eval_capacity_factor * g.top_k), g.min_capacity)
        routes = _route_by_hand(logits, g.top_k, g.unit_top1, cap)
        self.used = {e for picks in routes for e, _ in picks}
        rows = []
        for s, picks in enumerate(routes):
            acc = torch.zeros(d, dtype=torch.float32)
            for e, w in picks:
                acc = acc + w * self.expert_fn(self.layer.experts, e, x[s:s + 1])[0].float()
            rows.append(acc.to(x.dtype))
        moe = torch.stack(rows) if rows else x.new_zeros(0, d)
        if self.layer.coef is not None:
            c = torch.softmax(F.linear(x, self.layer.coef.weight, self.layer.coef.bias), dim=-1)
            moe = moe * c[:, 0:1] + self.dense(h).reshape(-1, d) * c[:, 1:2]
        return moe.reshape(B, T, d)


def _gpt2_expert(act):
    def run(experts, e, x):
        h = act(x @ experts.up_weight[0][e] + experts.up_bias[0][e])
        return h @ experts.down_weight[e] + experts.down_bias[e]
    return run


def _llama_expert(act):
    def run(experts, e, x):   # HF LlamaMLP: down(act(gate(x)) * up(x)); moefx keeps the ups in graph order
        return (act(x @ experts.up_weight[0][e]) * (x @ experts.up_weight[1][e])) @ experts.down_weight[e]
    return run


def _patched(name, model, gm):
    """The dense HF model with every MoE block's MLP replaced by a ReferenceMoE."""
    import copy

    ref = copy.deepcopy(model)
    blocks = ref.transformer.h if name == "gpt2-tiny" else ref.model.layers
    for _, layer in moe_layers(gm):
        dense = blocks[layer.block].mlp
        fn = _gpt2_expert(dense.act) if name == "gpt2-tiny" else _llama_expert(dense.act_fn)
        blocks[layer.block].mlp = ReferenceMoE(layer, dense, fn)
    return ref.eval()


PLANS = {
    "top1-residual-random": {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False,
                             "init": "random"},
    "top2-noisy-copies": {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False, "init_noise": 0.5},
    "top1-unit-noisy-capacity": {"experts": 4, "every": 2, "top_k": 1, "drop_tokens": True, "capacity_factor": 1.0,
                                 "min_capacity": 1, "init_noise": 0.5},
    "top3-random": {"experts": 6, "every": 2, "top_k": 3, "drop_tokens": False, "init": "random"},
}


@pytest.mark.filterwarnings("ignore::moefx.errors.InexactConversionWarning")
@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_distinct_experts_match_the_eager_reference(name, plan_name):
    model, inputs = load_model(name, batch=2, seq=6)
    gm = moefx.convert(model, {"moe": PLANS[plan_name]}, inputs)
    gm.eval()
    layers = moe_layers(gm)
    assert layers
    for _, layer in layers:                          # the experts really differ
        w = layer.experts.down_weight
        assert (w[0] - w[1]).abs().max() > 1e-3
    ref = _patched(name, model, gm)
    with torch.no_grad():
        got, want = first_tensor(gm(*inputs)), first_tensor(ref(*inputs))
        assert (got - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1.0)
    used = [m.used for m in ref.modules() if isinstance(m, ReferenceMoE)]
    assert len(used) == len(layers) and any(len(u) > 1 for u in used)   # the routing is not trivial


def test_upcycled_expert_order_is_the_dense_projection_order():
    """The convention the reference relies on: up_weight[0] is the first up projection in the graph
    (LLaMA's gate_proj), up_weight[1] the second (up_proj), stored as [d, f] matrices."""
    model, inputs = load_model("llama-tiny")
    gm = moefx.convert(model, {"moe": {"experts": 2, "every": 2, "drop_tokens": False}}, inputs)
    _, layer = moe_layers(gm)[0]
    mlp = model.model.layers[layer.block].mlp
    assert torch.equal(layer.experts.up_weight[0][1], mlp.gate_proj.weight.t())
    assert torch.equal(layer.experts.up_weight[1][1], mlp.up_proj.weight.t())
    assert torch.equal(layer.experts.down_weight[0], mlp.down_proj.weight.t())
