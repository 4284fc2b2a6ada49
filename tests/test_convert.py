"""End-to-end conversion of every supported architecture: structure, numerics, gradients."""
import pytest
import torch

import moefx
from moefx.facts import facts
from moefx import meta as M
from moefx.models import load_model, num_blocks
from moefx.nn.moe import MoELayer

from conftest import first_tensor

ARCHS = ["gpt2-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny", "bert-tiny", "vit-tiny", "t5-tiny",
         "t5gated-tiny", "encoder-tiny", "nanogpt-tiny"]
PLANS = {
    "top1-residual": {"moe": {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}},
    "top2": {"moe": {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False}},
}
ACTIVATIONS = {"gpt2-tiny": "gelu_tanh", "llama-tiny": "swiglu", "mistral-tiny": "swiglu", "qwen2-tiny": "swiglu",
               "bert-tiny": "gelu", "vit-tiny": "gelu", "t5-tiny": "relu", "t5gated-tiny": "geglu",
               "encoder-tiny": "relu", "nanogpt-tiny": "gelu"}


def _close(out, ref):
    scale = max(ref.abs().max().item(), 1.0)
    return (out - ref).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("name", ARCHS)
def test_find_ffns_one_per_block(name):
    model, inputs = load_model(name)
    ffns = moefx.find_ffns(moefx.capture(model, inputs))
    assert len(ffns) == num_blocks(name)
    assert [f.block for f in ffns] == list(range(num_blocks(name)))
    assert {f.activation for f in ffns} == {ACTIVATIONS[name]}
    for f in ffns:
        assert f.f > f.d and f.down in f.nodes and set(f.ups) <= set(f.nodes)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("name", ARCHS)
def test_convert_preserves_function_and_trains(name, plan_name):
    plan = moefx.Plan.from_dict(PLANS[plan_name])
    model, inputs = load_model(name)
    gm = moefx.convert(model, plan, inputs)
    gm.graph.lint()

    blocks = num_blocks(name)
    layers = dict(sorted((m.block, m) for m in gm.modules() if isinstance(m, MoELayer)))
    assert layers.keys() == set(plan.moe.moe_blocks(blocks))
    assert [m.num_experts for m in layers.values()] == list(plan.moe.layer_experts(blocks).values())
    assert all(m.gate.top_k == plan.moe.top_k for m in layers.values())
    assert all((m.coef is not None) == plan.moe.residual for m in layers.values())
    roles = [n.meta.get(M.ROLE) for n in gm.graph.nodes]
    for role in ("route", "dispatch", "experts", "combine"):
        assert roles.count(role) == len(layers), role
    assert facts(gm).counters["pr_moe"] == len(layers)

    with torch.no_grad():
        assert _close(first_tensor(gm(*inputs)), first_tensor(model(*inputs)))
        _, other = load_model(name, batch=3, seq=5)
        assert _close(first_tensor(gm(*other)), first_tensor(model(*other)))

    out = first_tensor(gm(*other))
    (out.float().pow(2).mean() + moefx.aux_loss(gm)).backward()
    for layer in layers.values():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.down_weight.grad.abs().sum() > 0
        if layer.coef is not None:
            assert layer.coef.weight.grad is not None
    if plan.moe.residual:  # the dense MLP of a PR-MoE layer still learns
        params = dict(gm.named_parameters())
        weights = [a.target for n in gm.graph.nodes if n.meta.get(M.ROLE) == "residual"
                   for a in n.all_input_nodes if a.op == "get_attr" and a.target in params]
        assert weights and all(params[w].grad is not None for w in weights), weights


def test_converted_model_does_not_alias_the_dense_one():
    model, inputs = load_model("gpt2-tiny")
    gm = moefx.convert(model, PLANS["top1-residual"], inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_router_learns_with_unit_top1_weights():
    model, inputs = load_model("gpt2-tiny")
    gm = moefx.convert(model, {"moe": {"experts": 4, "every": 2, "top_k": 1, "drop_tokens": False}}, inputs)
    layer = next(m for m in gm.modules() if isinstance(m, MoELayer))
    assert layer.gate.unit_top1
    before = layer.router.weight.detach().clone()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    ids = inputs[0]
    for _ in range(3):
        logits = gm(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + moefx.aux_loss(gm)).backward()
        opt.step()
    assert (layer.router.weight - before).abs().max() > 1e-6


def test_deepspeed_prob_weights_do_not_preserve_but_run():
    model, inputs = load_model("llama-tiny")
    plan = {"moe": {"experts": 4, "every": 2, "combine_weight": "prob", "drop_tokens": False}}
    gm = moefx.convert(model, plan, inputs)
    with torch.no_grad():
        out, ref = first_tensor(gm(*inputs)), first_tensor(model(*inputs))
    assert out.shape == ref.shape and not _close(out, ref)


def test_init_noise_breaks_symmetry_approximately():
    model, inputs = load_model("llama-tiny")
    plan = {"moe": {"experts": 4, "every": 2, "top_k": 2, "drop_tokens": False, "init_noise": 0.01}}
    gm = moefx.convert(model, plan, inputs)
    layer = next(m for m in gm.modules() if isinstance(m, MoELayer))
    w = layer.experts.down_weight
    assert not torch.equal(w[0], w[1])
    with torch.no_grad():
        out, ref = first_tensor(gm(*inputs)), first_tensor(model(*inputs))
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_capacity_drop_warns_and_runs():
    model, inputs = load_model("gpt2-tiny")
    with pytest.warns(UserWarning, match="drop_tokens"):
        gm = moefx.convert(model, {"moe": {"experts": 4, "every": 2, "capacity_factor": 0.5, "min_capacity": 1,
                                           "drop_tokens": True}}, inputs)
    assert first_tensor(gm(*inputs)).shape == first_tensor(model(*inputs)).shape


def test_random_init_experts_differ_from_dense():
    model, inputs = load_model("gpt2-tiny")
    gm = moefx.convert(model, {"moe": {"experts": 4, "init": "random", "drop_tokens": False}}, inputs)
    layer = next(m for m in gm.modules() if isinstance(m, MoELayer))
    assert not torch.equal(layer.experts.down_weight[0], layer.experts.down_weight[1])


def test_meta_device_conversion_of_a_24_layer_model():
    model, inputs = load_model("gpt2-medium-24", device="meta")
    plan = {"moe": {"experts": 128, "every": 2, "top_k": 1, "residual": False}}
    gm = moefx.convert(model, plan, inputs)
    assert all(p.device.type == "meta" for p in gm.parameters())
    layers = [m for m in gm.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 12 and all(m.num_experts == 128 for m in layers)
    counts = moefx.count_params(gm)
    per_expert = 2 * 1024 * 4096 + 4096 + 1024
    assert counts.expert == 12 * 128 * per_expert
    assert counts.active == counts.total - counts.expert + 12 * per_expert
    # non-residual: the 12 dense FFNs are replaced (gone), each MoE layer adds 128 experts + a router
    assert counts.total == _gpt2_medium_dense() - 12 * _ffn() + 12 * (128 * _ffn() + 1024 * 128)
    assert counts.total == 13_148_437_504  # the paper's 350M+MoE-128: "13B"


def _ffn(d=1024):
    """One GPT-2 FFN: c_fc [d, 4d] + bias, c_proj [4d, d] + bias."""
    return d * 4 * d + 4 * d + 4 * d * d + d


def _gpt2_medium_dense(d=1024, layers=24, vocab=50257, positions=1024):
    """GPT-2 medium's parameters from its config (lm_head tied to wte)."""
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + _ffn(d)
    return vocab * d + positions * d + layers * block + 2 * d


def test_paper_pr_moe_plan_parameter_count_on_meta():
    model, inputs = load_model("gpt2-medium-24", device="meta")
    assert moefx.count_params(model).total == _gpt2_medium_dense() == 354_823_168
    plan = moefx.Plan.from_file("examples/plans/350m_pr_moe_32_64.toml")
    gm = moefx.convert(model, plan, inputs)
    experts = [m.num_experts for m in gm.modules() if isinstance(m, MoELayer)]
    assert experts == [32] * 10 + [64] * 2
    # residual: every dense FFN stays; each MoE layer adds E experts, a router [E, d] and coef Linear(d, 2)
    want = _gpt2_medium_dense() + sum(e * _ffn() + 1024 * e + 2 * 1024 + 2 for e in experts)
    assert moefx.count_params(gm).total == want == 4_115_696_664  # paper: ~4B
