"""The gather path's copy-free pieces: the grouped matmul op, the three ways StackedExperts runs each
choice through its expert (host-planned loop, grouped op, index_select copies) against an eager
per-token reference with distinct experts, and the table-free gate against route()."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from moefx.nn.experts import StackedExperts
from moefx.nn.grouped_ops import _grouped_mm_op, grouped_mm
from moefx.nn.moe import Gate
from moefx.nn.routing import route, route_choices


def _loop_reference(x, w, offs):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype)
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


# float64 takes the per-group loop, fp32 / bf16 F.grouped_mm on the CPU
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ends", [[1, 3, 3, 6], [0, 0, 6, 6], [2, 2, 2, 4]])  # empty groups; rows past the end
def test_grouped_mm_matches_per_group_matmuls(ends, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(6, 8, dtype=dtype), torch.randn(4, 8, 8, dtype=dtype)   # 16-byte aligned rows
    offs = torch.tensor(ends, dtype=torch.int32)
    want = _loop_reference(x, w, offs)
    for _ in range(3):                                # fresh outputs: unwritten rows would hold garbage
        assert torch.equal(grouped_mm(x, w, offs), want)
        assert torch.equal(_grouped_mm_op(x, w, offs), want)
    if ends[-1] < 6:
        assert torch.count_nonzero(want[ends[-1]:]) == 0


def test_grouped_mm_gradients_and_compile():
    torch.manual_seed(1)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offs), (x, w))
    # non-contiguous weights (the backward's w.transpose) and a fullgraph compile through the fake impl
    compiled = torch.compile(lambda a, b, o: grouped_mm(a, b, o), backend="aot_eager", fullgraph=True)
    wt = torch.randn(3, 6, 4, dtype=torch.float64).transpose(1, 2)
    assert torch.equal(compiled(x.detach(), wt, offs), _loop_reference(x.detach(), wt, offs))


def _middle():
    class Swiglu(torch.nn.Module):
        def forward(self, a, b):
            return F.silu(a) * b

    return fx.symbolic_trace(Swiglu())


def _experts(bias_scale=1.0):
    torch.manual_seed(2)
    E, d, f = 4, 8, 12
    return StackedExperts([torch.randn(E, d, f), torch.randn(E, d, f)], [torch.randn(E, f), None],
                          torch.randn(E, f, d), torch.randn(E, d), _middle(), first_expert=0, bias_scale=bias_scale)


def _per_token(ex, tokens, expert):
    """Each token through each of its experts, one at a time, from the module's weights."""
    rows = []
    for s in range(tokens.shape[0]):
        outs = []
        for e in expert[s].tolist():
            x = tokens[s]
            a = x @ ex.up_weight[0][e] + ex.up_bias[0][e]
            b = x @ ex.up_weight[1][e]
            outs.append((F.silu(a) * b) @ ex.down_weight[e] + ex.bias_scale * ex.down_bias[e])
        rows.append(torch.stack(outs))
    return torch.stack(rows)


@pytest.mark.parametrize("layout", ["as built", "long_rows"])
@pytest.mark.parametrize("bias_scale", [1.0, 0.0])
@pytest.mark.parametrize("S,k,choice", [(1, 1, "random"), (6, 2, "random"), (5, 1, "random"), (3, 1, "one expert")])
def test_gather_paths_agree_with_a_per_token_reference(S, k, choice, bias_scale, layout):
    ex = _experts(bias_scale)
    if layout == "long_rows":          # the decode layout: the down weight [E, f, d] stored as [E, d, f]
        ex.down_weight.data = ex.down_weight.data.transpose(1, 2).contiguous().transpose(1, 2)
        assert ex.down_weight.stride(1) == 1
    tokens = torch.randn(S, 8)
    if choice == "one expert":         # every row chose expert 2: the loop's no-permutation path
        expert = torch.full((S, 1), 2)
    else:
        expert = torch.stack([torch.randperm(4)[:k] for _ in range(S)])  # distinct experts per token, unsorted
    want = _per_token(ex, tokens, expert)
    x, idx = tokens.repeat_interleave(k, 0), expert.reshape(-1)
    with torch.no_grad():
        got = {"loop (eager default)": ex(tokens, expert),
               "grouped": ex._gather_grouped(x, idx).reshape(S, k, -1),
               "copies": ex._gather_copies(x, idx).reshape(S, k, -1)}
    for name, y in got.items():
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=name)


def test_gather_gradients_match_the_copies_path():
    ex = _experts()
    tokens = torch.randn(6, 8, requires_grad=True)
    expert = torch.stack([torch.randperm(4)[:2] for _ in range(6)])
    g = torch.randn(6, 2, 8)
    params = [tokens, *ex.parameters()]
    grouped = torch.autograd.grad(ex(tokens, expert), params, g)        # grad on: the custom op path
    reference = ex._gather_copies(tokens.repeat_interleave(2, 0), expert.reshape(-1)).reshape(6, 2, -1)
    copies = torch.autograd.grad(reference, params, g)
    for a, b in zip(grouped, copies):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gather_compiles_fullgraph():
    ex = _experts()
    tokens, expert = torch.randn(3, 8), torch.tensor([[2], [0], [2]])
    with torch.no_grad():
        want = ex(tokens, expert)
        got = torch.compile(ex, backend="aot_eager", fullgraph=True)(tokens, expert)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,unit", [(1, True), (1, False), (2, False), (3, False)])
def test_table_free_routing_matches_route(k, unit):
    logits = torch.randn(7, 6)
    full = route(logits, top_k=k, drop_tokens=False, unit_top1=unit, impl="torch")
    free = route_choices(logits, top_k=k, unit_top1=unit)
    assert torch.equal(free.expert, full.expert) and torch.equal(free.weight, full.weight)
    assert torch.equal(free.aux_loss, full.aux_loss)
    assert free.capacity == -1 and free.counts is None and torch.count_nonzero(free.slot) == 0
    with torch.no_grad():
        assert route_choices(logits, top_k=k, unit_top1=unit, aux=False).aux_loss is None


def test_table_free_gate_falls_back_when_a_choice_can_drop():
    gate = Gate(4, 1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1, drop_tokens=True,
                unit_top1=False, table=False).eval()
    few, many = torch.randn(1, 4), torch.zeros(8, 4)  # 8 tokens on expert 0, capacity 2: some must drop
    assert gate(few).counts is None
    dropped = gate(many)
    assert dropped.counts is not None and int((dropped.slot < 0).sum()) == 6
    with torch.no_grad():
        assert gate(few).aux_loss is None
    assert gate(few).aux_loss is not None  # autograd on: the loss is kept
