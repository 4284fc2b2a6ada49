"""Decode weight layout (moefx.gen.weight_layout): long rows for matrix-vector products, same parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx.gen.generator import Generator, convert_generator
from moefx.gen.weight_layout import long_rows
from moefx.models import load_model
from moefx.nn.moe import moe_layers

# distinct experts (random init), so a weight read wrongly after re-striding changes the tokens
PLAN = {"moe": {"experts": 4, "every": 2, "top_k": 1, "residual": True, "drop_tokens": False, "init": "random"}}


def _nanogpt():
    return load_model("nanogpt-tiny", batch=2, seq=5, seed=7)


def test_long_rows_restrides_exactly_the_short_row_matrices_in_place():
    model, (ids,) = _nanogpt()
    gen = convert_generator(model, PLAN, (ids,), max_cache_len=16, weight_layout="keep")
    params = dict(gen.decode.named_parameters())
    before = {name: (p, p.detach().clone()) for name, p in params.items()}
    short = {name for name, p in params.items() if p.dim() >= 2 and p.shape[-1] < p.shape[-2]}
    n_layer = model.config.n_layer
    moe = len(moe_layers(gen.decode))
    # per block: the fused qkv [3d, d] and the up projection [4d, d]; the tied embedding / head [V, d];
    # per MoE layer: the experts' down weight [E, 4d, d] (routers [E, d] and coefficients [2, d] have long rows)
    assert len(short) == 2 * n_layer + 1 + moe
    assert long_rows(gen.decode) == len(short)
    assert long_rows(gen.decode) == 0                                  # idempotent: nothing left to change
    for name, p in gen.decode.named_parameters():
        old, value = before[name]
        assert p is old and torch.equal(p, value)                      # the same Parameter, the same values
        if name in short:
            assert p.stride(-2) == 1 and p.stride(-1) == p.shape[-2], name   # the longer dim is contiguous
        else:
            assert p.is_contiguous(), name
    # the prefill graph holds the same parameters, so it sees the new layout too
    assert all(p.stride(-2) == 1 for n, p in gen.prefill.named_parameters() if n in short)


def test_generators_default_to_long_rows_on_the_cpu_and_decode_the_same():
    model, (ids,) = _nanogpt()
    fast = convert_generator(model, PLAN, (ids,), max_cache_len=16)
    keep = convert_generator(model, PLAN, (ids,), max_cache_len=16, weight_layout="keep")
    assert fast.weight_layout == "long_rows" and keep.weight_layout == "keep"
    assert fast.weight_layout_changed == 2 * model.config.n_layer + 1 + len(moe_layers(fast.decode))
    assert keep.weight_layout_changed == 0 and all(p.is_contiguous() for p in keep.decode.parameters())
    # four rows per step: a small matrix product, which the layout does not speed up; "auto" keeps it
    four = convert_generator(model, PLAN, (ids,), batch_size=4, max_cache_len=16)
    assert four.weight_layout == "keep" and four.weight_layout_changed == 0
    assert torch.equal(fast.generate(ids, max_new_tokens=8), keep.generate(ids, max_new_tokens=8))
    slots = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        steps = []
        for g in (fast, keep):
            g.prefill(ids, torch.arange(5), slots, torch.arange(5).expand(2, 5))
            steps.append(g.decode(ids[:, :1], torch.tensor([5]), slots, torch.full((2, 1), 5)))
    assert (steps[0] - steps[1]).abs().max() <= 1e-5 * steps[1].abs().max()


def test_a_generator_leaves_the_callers_parameters_alone_without_a_copy():
    model, (ids,) = _nanogpt()
    gen = convert_generator(model, {}, (ids,), max_cache_len=16, copy_weights=False)
    assert gen.weight_layout == "keep" and all(p.is_contiguous() for p in model.parameters())


def test_save_load_of_a_restrided_generator(tmp_path):
    model, (ids,) = _nanogpt()
    gen = convert_generator(model, PLAN, (ids,), max_cache_len=16)
    want = gen.generate(ids, max_new_tokens=6)
    moefx.save(gen, tmp_path / "g")
    back = moefx.load(tmp_path / "g")
    assert back.weight_layout_changed == gen.weight_layout_changed
    assert torch.equal(back.generate(ids, max_new_tokens=6), want)


def test_an_unknown_weight_layout_is_refused_before_any_work():
    model, (ids,) = _nanogpt()
    with pytest.raises(ValueError, match="weight_layout must be one of 'auto', 'long_rows', 'keep'"):
        convert_generator(model, PLAN, (ids,), max_cache_len=16, weight_layout="column")


def test_a_weight_the_graph_views_keeps_its_layout():
    class TwoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(8, 4))
            self.b = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return F.linear(x, self.a) + F.linear(x, self.b.view(4, 8).t())   # b is viewed: needs contiguous

    gm = moefx.capture(TwoWeights(), (torch.randn(3, 4),))
    x = torch.randn(3, 4)
    want = gm(x)
    assert long_rows(gm) == 1
    assert gm.a.stride() == (1, 8) and gm.b.is_contiguous()
    torch.testing.assert_close(gm(x), want, rtol=1e-6, atol=1e-6)


def test_the_generator_constructor_keeps_the_layout_unless_asked():
    model, (ids,) = _nanogpt()
    gen = convert_generator(model, PLAN, (ids,), max_cache_len=16, weight_layout="keep")
    again = Generator(gen.prefill, gen.decode, 2, 16)          # graphs whose parameters may be someone else's
    assert again.weight_layout == "keep" and all(p.is_contiguous() for p in gen.decode.parameters())
    assert Generator(gen.prefill, gen.decode, 2, 16, weight_layout="auto").weight_layout_changed > 0
