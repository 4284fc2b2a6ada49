"""KV-cache generation: prefill + decode graphs over one set of weights, token for token equal to
Hugging Face's generate (and nanoGPT's own loop) for upcycled dropless PR-MoE models."""
from __future__ import annotations

import json

import pytest
import torch

import moefx
from moefx.facts import gather_layers
from moefx.gen.generator import convert_generator
from moefx.models import load_model
from moefx.nn.moe import moe_layers

PLANS = {
    "top1-residual": {"moe": {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}},
    "top2": {"moe": {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False}},
}


def _left_padded(name: str):
    model, (ids,) = load_model(name, batch=3, seq=6, seed=1)
    ids, mask = ids.clone(), torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0
    mask[2, :4], ids[2, :4] = 0, 0
    return model, ids, mask


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_greedy_tokens_equal_hugging_face_generate(name, plan):
    model, ids, mask = _left_padded(name)
    gen = convert_generator(model, PLANS[plan], (ids,), max_cache_len=32)
    got = gen.generate(ids, mask, max_new_tokens=10)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert got.shape == (3, 16) and torch.equal(got, want)
    one = gen.generate(ids[1:2], max_new_tokens=6)                 # a smaller batch than the cache holds
    assert torch.equal(one, model.generate(ids[1:2], attention_mask=torch.ones_like(ids[1:2]), max_new_tokens=6,
                                           do_sample=False, pad_token_id=0))
    # the decode graph (3 tokens, static) runs every MoE layer on the gather path, the prefill (dynamic) on the buffer
    layers = [layer for layer, _ in moefx.nn.moe.moe_layers(gen.decode)]
    assert gather_layers(gen.decode) == layers
    assert gather_layers(gen.prefill) == []
    if name == "gpt2-tiny" and plan == "top1-residual":            # and `moefx dump` shows it
        rows = [ln.split() for ln in moefx.dump(gen.decode, "table").splitlines()[2:6]]
        assert [r[7] for r in rows] == ["-", "gather", "-", "gather"]      # blocks 1 and 3 are MoE
        layers_json = json.loads(moefx.dump(gen.prefill, "json"))["moe_layers"]
        assert {layer["experts_path"] for layer in layers_json} == {"buffer"}


def test_nanogpt_generates_what_its_own_loop_generates():
    model, (ids,) = load_model("nanogpt-tiny", batch=2, seq=5, seed=2)
    for plan in PLANS.values():
        gen = convert_generator(model, plan, (ids,), max_cache_len=32)
        assert torch.equal(gen.generate(ids, max_new_tokens=12), model.generate(ids, 12, do_sample=False))
        one = ids[:, :1]                                          # a 1-token prompt prefills with the decode graph
        assert torch.equal(gen.generate(one, max_new_tokens=5), model.generate(one, 5, do_sample=False))


def test_one_set_of_weights_and_one_cache():
    model, ids, _ = _left_padded("llama-tiny")
    gen = convert_generator(model, PLANS["top2"], (ids,), max_cache_len=32)
    pre = dict(gen.prefill.named_parameters())
    dec = dict(gen.decode.named_parameters())
    assert set(pre) == set(dec) and all(dec[k] is pre[k] for k in pre)
    assert any(k.startswith("moe") and ".experts." in k for k in pre)
    pre_b = dict(gen.prefill.named_buffers())
    dec_b = dict(gen.decode.named_buffers())
    caches = [k for k in pre_b if "key_cache" in k or "value_cache" in k]
    assert len(caches) == 8 and all(dec_b[k] is pre_b[k] for k in caches)


def test_decode_step_logits_equal_the_full_forward_at_the_same_position():
    model, (ids,) = load_model("llama-tiny", batch=2, seq=7, seed=3)
    plan = {"moe": {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False, "init_noise": 0.3}}
    gen = convert_generator(model, plan, (ids,), max_cache_len=16)
    full = moefx.convert(model, plan, (ids,))
    with torch.no_grad():
        want = full(ids).logits                                   # [2, 7, V]
        slots = torch.ones(2, 16, dtype=torch.long)
        pos = torch.arange(7).expand(2, 7)
        pre = gen.prefill(ids[:, :6], torch.arange(6), slots, pos[:, :6])
        step = gen.decode(ids[:, 6:], torch.tensor([6]), slots, pos[:, 6:])
    scale = want.abs().max()
    assert (pre - want[:, :6]).abs().max() <= 1e-5 * scale
    assert (step[:, 0] - want[:, 6]).abs().max() <= 1e-5 * scale


def test_gather_and_buffer_paths_agree_on_distinct_experts():
    model, (ids,) = load_model("gpt2-tiny", batch=2, seq=5, seed=4)
    base = {"moe": {"experts": [4, 8], "every": 2, "top_k": 2, "drop_tokens": False, "init": "random"}}
    gather = convert_generator(model, {**base, "lowering": {"experts": "gather"}}, (ids,), max_cache_len=16)
    buffer = convert_generator(model, {**base, "lowering": {"experts": "buffer"}}, (ids,), max_cache_len=16)
    assert gather_layers(gather.prefill) == [0, 1] and gather_layers(buffer.decode) == []
    slots = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        for g in (gather, buffer):
            g.prefill(ids, torch.arange(5), slots, torch.arange(5).expand(2, 5))
        a = gather.decode(ids[:, :1], torch.tensor([5]), slots, torch.full((2, 1), 5))
        b = buffer.decode(ids[:, :1], torch.tensor([5]), slots, torch.full((2, 1), 5))
    assert (a - b).abs().max() <= 1e-6 * max(b.abs().max().item(), 1.0)
    assert torch.equal(gather.generate(ids, max_new_tokens=6), buffer.generate(ids, max_new_tokens=6))
    # "auto": the 2-token decode step gathers in both layers unless it has more tokens than gather_max_tokens;
    # never the prefill (its token count is dynamic)
    for lowering, want in (({"experts": "auto"}, [0, 1]), ({"experts": "auto", "gather_max_tokens": 1}, [])):
        g = convert_generator(model, {**base, "lowering": lowering}, (ids,), max_cache_len=16)
        assert (gather_layers(g.decode), gather_layers(g.prefill)) == (want, []), lowering


def test_the_decode_step_compiles_fullgraph():
    from torch._dynamo.utils import counters

    model, (ids,) = load_model("gpt2-tiny", batch=2, seq=5, seed=5)
    gen = convert_generator(model, PLANS["top2"], (ids,), max_cache_len=16)
    eager = gen.generate(ids, max_new_tokens=6)
    torch._dynamo.reset()
    counters.clear()
    gen.compile(backend="aot_eager")
    assert torch.equal(gen.generate(ids, max_new_tokens=6), eager)
    assert sum(counters["graph_break"].values()) == 0

    # guards="inputs" (the default) drops the guards on the graphs' modules: parameters are still read on
    # every call (an in-place update is seen), but a module attribute changed after compiling is not;
    # guards="all" keeps torch's guards, which recompile for it
    args = (ids[:, :1], torch.tensor([5]), torch.ones(2, 16, dtype=torch.long), torch.full((2, 1), 5))
    for guards, seen in (("all", True), ("inputs", False)):
        torch._dynamo.reset()
        gen.compile(backend="aot_eager", guards=guards)
        experts = [m.experts for _, m in moe_layers(gen.compiled_graph)]   # the graph compiled (see products)
        with torch.no_grad():
            for e in experts:
                e.bias_scale = 1.0
            before = gen._decode_fn(*args)
            for e in experts:
                e.down_bias.add_(0.5)                # in place: seen under either setting
            updated = gen._decode_fn(*args)
            for e in experts:
                e.bias_scale = 0.0                   # drops the experts' down bias in the gather path
            assert not torch.equal(updated, before)
            assert torch.equal(gen._decode_fn(*args), updated) is not seen, guards
    with pytest.raises(moefx.MoefxError, match="guards='none'"):
        gen.compile(guards="none")


def test_sampling_is_seeded_and_eos_stops_rows():
    model, ids, mask = _left_padded("llama-tiny")
    gen = convert_generator(model, PLANS["top1-residual"], (ids,), max_cache_len=32)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=30, top_p=0.9)
    a, b = gen.generate(ids, mask, seed=11, **kw), gen.generate(ids, mask, seed=11, **kw)
    assert torch.equal(a, b) and not torch.equal(a, gen.generate(ids, mask, seed=12, **kw))
    greedy = gen.generate(ids, mask, max_new_tokens=8)
    eos = int(greedy[0, 7])                                        # the first row's 2nd new token ends it
    out = gen.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    row = out[0, 6:].tolist()
    assert row[:2] == greedy[0, 6:8].tolist() and set(row[2:]) <= {0}
    with pytest.raises(moefx.MoefxError, match="exceed the cache of 32"):
        gen.generate(ids, max_new_tokens=40)
    with pytest.raises(moefx.MoefxError, match="cache holds 3"):
        gen.generate(torch.cat([ids, ids]), max_new_tokens=2)


def _perturbed(module):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module


def test_save_load_generate_gives_the_same_tokens(tmp_path):
    model, ids, mask = _left_padded("llama-tiny")
    plan = {"moe": {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False, "init": "random"}}
    gen = convert_generator(model, plan, (ids,), max_cache_len=24)
    _perturbed(gen.prefill)                                          # weights no recipe can rebuild
    want = gen.generate(ids, mask, max_new_tokens=8)
    moefx.save(gen, tmp_path / "gen")
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["model.safetensors", "moefx.json"]
    loaded = moefx.load(tmp_path / "gen")
    assert isinstance(loaded, moefx.Generator) and torch.equal(loaded.generate(ids, mask, max_new_tokens=8), want)
    pre = dict(loaded.prefill.named_parameters())
    assert all(p is pre[n] for n, p in loaded.decode.named_parameters())        # still one set of weights


def test_save_load_a_trained_graph_and_generate_from_it(tmp_path):
    from moefx.saving import load_generator

    model, (ids,) = load_model("gpt2-tiny", batch=2, seq=6, seed=8)
    plan = {"moe": {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}}
    gm = _perturbed(moefx.convert(model, plan, (ids,)))
    moefx.save(gm, tmp_path / "moe")
    back = moefx.load(tmp_path / "moe")
    with torch.no_grad():
        want = gm(ids).logits
        assert torch.equal(back(ids).logits, want)
        gen = load_generator(tmp_path / "moe", batch_size=2, max_cache_len=16)
        got = gen.prefill(ids, torch.arange(6), torch.ones(2, 16, dtype=torch.long), torch.arange(6).expand(2, 6))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # a damaged weights file is refused before anything is built
    weights = tmp_path / "moe" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(moefx.MoefxError, match="does not match the checksum"):
        moefx.load(tmp_path / "moe")


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    gm = moefx.convert(enc, {"moe": {"experts": 2, "every": 1}}, (torch.randn(2, 4, 16),))
    with pytest.raises(moefx.MoefxError, match="needs to know how to rebuild the dense model"):
        moefx.save(gm, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(moefx.MoefxError, match="not a folder written by moefx.save"):
        moefx.load(tmp_path)


def test_moe_layers_follow_the_mode_the_graph_was_captured_in():
    model, (ids,) = load_model("nanogpt-tiny", batch=2, seq=5, seed=7)
    gen = convert_generator(model, PLANS["top1-residual"], (ids,), max_cache_len=16)
    for gm in (gen.prefill, gen.decode):
        assert not gm.training and not any(m.training for _, layer in moe_layers(gm) for m in layer.modules())
    # behaviour: an eval-captured graph gates with eval_capacity_factor, not capacity_factor (which drops here)
    drop = {"experts": 4, "every": 1, "top_k": 1, "drop_tokens": True, "min_capacity": 0, "init": "random"}
    outs = {}
    for cf in (0.25, 4.0):
        gm = moefx.convert(model, {"moe": {**drop, "capacity_factor": cf, "eval_capacity_factor": 4.0}}, (ids,))
        assert not any(m.training for _, layer in moe_layers(gm) for m in layer.modules())
        with torch.no_grad():
            outs[cf] = gm(ids)
    assert torch.equal(outs[0.25], outs[4.0])
    train = moefx.convert(model, {"moe": {**drop, "capacity_factor": 0.25, "eval_capacity_factor": 4.0}}, (ids,),
                          train=True)
    assert all(m.training for _, m in moe_layers(train))
    with torch.no_grad():
        assert not torch.equal(train(ids), outs[4.0])   # in train mode capacity_factor 0.25 drops tokens
    # a no-grad decode step on the gather path computes no load-balancing loss
    with torch.no_grad():
        gen.generate(ids, max_new_tokens=2)
    assert all(m.aux.value is None for _, m in moe_layers(gen.decode))
