"""Attention shapes tensor parallelism must split exactly: multi-query / grouped-query attention with
fewer key-value heads than ranks, per-head q / k norms, eager attention (HF "eager", GPT-J), and
interleaved rotary built with `stack`. Each converts (top-2 and top-1 residual plans), and TP = 2 on
2 gloo ranks equals the single-process output with every head split (no replication warning)."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import transformers as T

import moefx
from moefx.analysis.attention import find_attention
from moefx.outputs import main_tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, use_cache=False)


def _model(name: str):
    torch.manual_seed(0)
    if name == "llama-mqa":           # one key-value head: fewer than the TP ranks
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, attn_implementation="sdpa", **COMMON))
    if name == "llama-gqa-eager":     # HF's eager attention with 2 key-value heads
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, attn_implementation="eager", **COMMON))
    if name == "qwen3-qk-norm":       # RMSNorm over the head dim of q and k, one key-value head
        return T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=1, head_dim=8, attn_implementation="sdpa",
                                                **COMMON))
    if name == "gptj":                # eager attention, interleaved rotary (stack + flatten), partial rotary dim
        return T.GPTJForCausalLM(T.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                              n_positions=64, bos_token_id=0, eos_token_id=0, use_cache=False))
    raise KeyError(name)


MODELS = ["llama-mqa", "llama-gqa-eager", "qwen3-qk-norm", "gptj"]
PLANS = {"top2": {"moe": {"experts": 4, "every": 2, "top_k": 2, "drop_tokens": False}},
         "top1-residual": {"moe": {"experts": 4, "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}}}


@pytest.mark.parametrize("name", MODELS)
def test_attention_is_found_with_its_head_axes(name):
    model = _model(name).eval()
    gm = moefx.capture(model, (torch.randint(0, 128, (2, 6)),))
    atts = find_attention(gm)
    assert len(atts) == 2 and all(a.supported for a in atts), [a.reason for a in atts]
    kinds = {"llama-mqa": "sdpa", "qwen3-qk-norm": "sdpa", "llama-gqa-eager": "eager", "gptj": "eager"}
    kv = {"llama-mqa": 1, "qwen3-qk-norm": 1, "llama-gqa-eager": 2, "gptj": 4}
    assert [(a.kind, a.heads, a.kv_heads, len(a.projections)) for a in atts] == [(kinds[name], 4, kv[name], 3)] * 2


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", MODELS)
def test_converts_preserving_function_and_trains(name, plan):
    model = _model(name).eval()
    ids = torch.randint(0, 128, (2, 6))
    gm = moefx.convert(model, PLANS[plan], (ids,))
    assert len(moefx.find_ffns(moefx.capture(model, (ids,)))) == 2
    for shape in ((2, 6), (3, 9)):
        x = torch.randint(0, 128, shape)
        with torch.no_grad():
            want, got = main_tensor(model(x)), main_tensor(gm(x))
        assert (got - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0)
    (main_tensor(gm(ids)).pow(2).mean() + moefx.aux_loss(gm)).backward()
    new = [(n, p) for n, p in gm.named_parameters() if n.startswith("moe")]
    assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in new if "coef" not in n or
                       plan == "top1-residual")


def _tp_equals_single(rank, world, names):
    warnings.filterwarnings("ignore", message=".*drop_tokens.*")
    plan = moefx.Plan.from_dict({**PLANS["top2"], "parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 1}})
    for name in names:
        model = _model(name).eval()
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
        gm = moefx.convert(model, plan, (ids,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            local = moefx.distribute(gm, plan)
        replicated = [str(w.message) for w in caught if "keeps these layers replicated" in str(w.message)]
        assert not replicated, (name, replicated)
        # the query projection is split by heads; a single key-value head stays whole
        shapes = {n: tuple(p.shape) for n, p in local.named_parameters()}
        q = [s for n, s in shapes.items() if "q_proj" in n and n.endswith("weight")]
        assert q and all(s[0] == 16 for s in q), (name, q)
        x = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))
        want = main_tensor(gm(x))
        got = main_tensor(local(x))
        assert (got - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0), name
        # gradients: every rank's copy of a replicated parameter gets the same, full gradient
        gm.zero_grad()
        main_tensor(gm(x)).pow(2).mean().backward()
        main_tensor(local(x)).pow(2).mean().backward()
        moefx.reduce_gradients(local)
        from moefx.placement import whole
        from moefx.facts import placements
        recs = placements(local)
        ref = dict(gm.named_parameters())
        for n, p in local.named_parameters():
            rec = recs.get(n) or whole(n, tuple(p.shape))
            g = ref[rec.global_name].grad
            for d, off in enumerate(rec.offsets):
                g = g.narrow(d, off, p.shape[d])
            assert (p.grad - g).abs().max() <= 1e-5 * max(g.abs().max().item(), 1e-3), (name, n)


@pytest.mark.dist
def test_tensor_parallel_two_ranks_equal_one_process():
    run_world(_tp_equals_single, 2, MODELS, timeout=300)
