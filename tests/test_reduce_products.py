"""Few-row products as reductions (moefx.passes.reduce_products, moefx.nn.products) and the compiled
decode step that uses them (Generator.compile(products=...), weight_layout.input_contiguous)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moefx
from moefx.gen.generator import convert_generator
from moefx.gen.weight_layout import input_contiguous
from moefx.models import load_model
from moefx.nn.moe import moe_layers
from moefx.nn.products import linear_by_reduction, rows_by_reduction
from moefx.facts import facts
from moefx.passes.reduce_products import reduce_products

# distinct experts (random init), so a row sent to the wrong expert changes the logits
TOP1 = {"moe": {"experts": 4, "every": 2, "top_k": 1, "residual": True, "drop_tokens": False, "init": "random"}}
TOP2 = {"moe": {"experts": 4, "every": 2, "top_k": 2, "residual": False, "drop_tokens": False, "init": "random"}}


def _decode_args(gen, ids, position):
    B = ids.shape[0]
    return (ids[:, :1], torch.tensor([position]), torch.ones(B, gen.max_cache_len, dtype=torch.long),
            torch.full((B, 1), position))


def test_products_as_reductions_equal_their_matrix_products():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    torch.testing.assert_close(linear_by_reduction(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_by_reduction(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    stack, rows = torch.randn(5, 16, 24, generator=g), torch.randn(3, 16, generator=g)
    idx = torch.tensor([4, 0, 4])
    want = torch.stack([rows[n] @ stack[int(idx[n])] for n in range(3)])
    torch.testing.assert_close(rows_by_reduction(rows, stack, idx), want, rtol=1e-5, atol=1e-5)


def test_the_pass_rewrites_the_small_products_of_a_copy_sharing_every_parameter():
    model, (ids,) = load_model("nanogpt-tiny", batch=1, seq=6, seed=3)
    gen = convert_generator(model, TOP1, (ids,), max_cache_len=12)
    out = reduce_products(gen.decode)
    # nanogpt-tiny: 4 blocks x (qkv, attention out, fc, proj) + the LM head; MoE layers in blocks 1 and 3
    assert facts(out).reduced_products == {"linears": 17, "experts": [0, 1]}
    assert sum(n.target is linear_by_reduction for n in out.graph.nodes) == 17
    assert {id(p) for p in out.parameters()} == {id(p) for p in gen.decode.parameters()}
    for (_, mine), (_, theirs) in zip(moe_layers(out), moe_layers(gen.decode)):
        assert mine.experts is not theirs.experts and mine.experts.down_weight is theirs.experts.down_weight
        assert (mine.experts.products, theirs.experts.products) == ("reduce", "grouped")
    assert not any(n.target is linear_by_reduction for n in gen.decode.graph.nodes)   # the input is unchanged
    # more rows than max_rows: nothing changes; experts=False leaves the experts alone
    assert facts(reduce_products(gen.decode, max_rows=0)).reduced_products == {"linears": 0, "experts": []}
    assert facts(reduce_products(gen.decode, experts=False)).reduced_products == {"linears": 17, "experts": []}
    # the experts copy shares the parameters but not the registries: a parameter added to one is not in the other
    copy = moe_layers(out)[0][1].experts
    copy.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    assert not hasattr(moe_layers(gen.decode)[0][1].experts, "extra")


def test_top2_at_batch_2_reduces_the_linears_but_not_the_four_expert_rows():
    model, (ids,) = load_model("nanogpt-tiny", batch=2, seq=6, seed=3)
    gen = convert_generator(model, TOP2, (ids,), max_cache_len=12)
    # 2 rows per linear, 4 routed rows per MoE layer; no residual MLP: 4 x 2 attention + 2 x 2 MLP + the head
    assert facts(reduce_products(gen.decode)).reduced_products == {"linears": 13, "experts": []}


@pytest.mark.parametrize("plan,batch", [(TOP1, 1), (TOP2, 2)], ids=["top1-residual-b1", "top2-b2"])
def test_the_rewritten_decode_step_equals_the_original(plan, batch):
    model, (ids,) = load_model("gpt2-tiny", batch=batch, seq=5, seed=4)
    gen = convert_generator(model, plan, (ids,), max_cache_len=12)
    gen.generate(ids, max_new_tokens=1)                                    # a prefilled cache to attend over
    out = reduce_products(gen.decode, max_rows=4)                          # top-2 at batch 2: 4 routed rows
    assert facts(out).reduced_products["experts"] == [0, 1]
    args = _decode_args(gen, ids, 5)
    with torch.no_grad():
        want = gen.decode(*args)
        changed = input_contiguous(out)
        again = gen.decode(*args)                                          # the eager graph on the new layout
    got = out(*args).detach()        # with autograd on, the experts leave their eager loop for the reduce path
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    assert changed > 0
    for _, layer in moe_layers(out):
        assert all(w.stride(-2) == 1 for w in (*layer.experts.up_weight, layer.experts.down_weight))
    assert all(out.get_parameter(n.args[1].target).is_contiguous() for n in out.graph.nodes
               if n.target is linear_by_reduction)


def test_the_experts_reduce_path_sends_each_row_to_its_own_expert():
    model, (ids,) = load_model("nanogpt-tiny", batch=1, seq=6, seed=3)
    gen = convert_generator(model, TOP2, (ids,), max_cache_len=12)
    experts = moe_layers(gen.decode)[0][1].experts
    x = torch.randn(4, experts.d, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([2, 0, 0, 3])
    with torch.no_grad():
        want = torch.stack([experts.expert_ffn(int(i), x[n:n + 1])[0] for n, i in enumerate(idx)])
        got = experts._gather_reduce(x, idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_with_reductions_for_few_rows_decodes_the_same_tokens():
    model, (ids,) = load_model("nanogpt-tiny", batch=1, seq=6, seed=3)
    plain = convert_generator(model, TOP1, (ids,), max_cache_len=16)
    torch._dynamo.reset()
    # "auto" never picks the machine-dependent reductions: the captured products
    assert plain.compile(backend="aot_eager").products == "matmul" and plain.compiled_graph is plain.decode
    gen = convert_generator(model, TOP1, (ids,), max_cache_len=16)
    eager = gen.generate(ids, max_new_tokens=6)
    torch._dynamo.reset()
    gen.compile(backend="aot_eager", products="reduce")
    assert gen.products == "reduce" and gen.weight_layout == "input_contiguous"
    assert facts(gen.compiled_graph).reduced_products == {"linears": 17, "experts": [0, 1]}
    assert torch.equal(gen.generate(ids, max_new_tokens=6), eager)
    wide = convert_generator(model, TOP1, (ids,), max_cache_len=16, batch_size=8)
    assert wide.compile(backend="aot_eager", products="reduce").products == "matmul"
    assert wide.compiled_graph is wide.decode
    with pytest.raises(moefx.MoefxError, match="products='fast'"):
        gen.compile(products="fast")
    # torch.compile refuses mode and options together: with guards="inputs" the mode becomes its options
    torch._dynamo.reset()
    gen.compile(backend="aot_eager", mode="max-autotune-no-cudagraphs")
    assert torch.equal(gen.generate(ids, max_new_tokens=6), eager)
