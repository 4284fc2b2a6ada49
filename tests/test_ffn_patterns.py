"""FFN patterns beyond separate up / down nn.Linears: fused gate/up projections (chunk, split, slicing;
HF Phi-3), einsum linears in both weight layouts, a dropout between activation and down, and a
LayerNorm over f inside the FFN (NormFormer). Each is found once per block, converts with a top-2
and a top-1 residual plan to the exact parameter count, preserves the dense function when
upcycled, trains, and (with distinct experts) matches an eager MoE written by hand."""
from __future__ import annotations

import math

import pytest
import torch

import moefx
from moefx import meta as M
from moefx.analysis.linear import aten, packet
from moefx.nn.experts import GenericExperts, StackedExperts
from moefx.nn.moe import MoELayer, moe_layers
from moefx.outputs import main_tensor

from ffn_pattern_models import BLOCKS, D, FF, FFNS, VOCAB, base_params, ffn_params, phi3, phi3_base_params, tiny_model

ARCHS = [*FFNS, "phi3"]
E = 4
PLANS = {
    "top2": {"moe": {"experts": E, "every": 1, "top_k": 2, "residual": False, "drop_tokens": False}},
    "top1-residual": {"moe": {"experts": E, "every": 1, "top_k": 1, "residual": True, "drop_tokens": False}},
}
ACTIVATION = {"fused-chunk": "swiglu", "fused-split": "swiglu", "fused-slice": "geglu", "einsum-in-out": "gelu",
              "einsum-out-in": "relu", "dropout": "gelu", "normformer": "gelu", "phi3": "swiglu"}
GENERIC = {"normformer"}          # parameters inside the FFN middle: every expert its own copy, vmapped
FUSED = {"fused-chunk", "fused-split", "fused-slice", "phi3"}


def _model(arch: str):
    return phi3() if arch == "phi3" else tiny_model(arch)


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _ffn_size(arch: str) -> int:
    return D * 2 * FF + FF * D if arch == "phi3" else ffn_params(arch)


def _dense_size(arch: str) -> int:
    return (phi3_base_params() if arch == "phi3" else base_params()) + BLOCKS * _ffn_size(arch)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return (out - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def _dense_ffn(model, arch: str, block: int):
    return model.model.layers[block].mlp if arch == "phi3" else model.blocks[block]["ffn"]


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_found_once_per_block(arch):
    model = _model(arch)
    ffns = moefx.find_ffns(moefx.capture(model, (_ids(2, 6),)))
    assert len(ffns) == BLOCKS and [f.block for f in ffns] == list(range(BLOCKS))
    for f in ffns:
        assert (f.d, f.f, f.activation) == (D, FF, ACTIVATION[arch])
        assert f.fused == (arch in FUSED) and len(f.ups) == 1
        if arch in FUSED:   # one fused up, cut into gate and up parts: experts keep one matrix per part
            assert f.gated and [(lo, hi) for _, _, lo, hi in f.parts] == [(0, FF), (FF, 2 * FF)]
            assert {up for _, up, _, _ in f.parts} == set(f.ups) and set(f.splits) <= set(f.nodes)
            assert f.middle_elementwise and not f.elementwise     # TP would split the fused columns wrongly
        elif arch in GENERIC:
            assert f.middle_params and not f.stackable and not f.elementwise and not f.middle_elementwise
        else:
            assert f.elementwise and f.stackable and f.parts == ((f.ups[0], f.ups[0], 0, FF),)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_converts_preserves_function_and_trains(arch, plan_name):
    model, ids = _model(arch), _ids(2, 6)
    plan = moefx.Plan.from_dict(PLANS[plan_name])
    gm = moefx.convert(model, plan, (ids,))
    layers = [m for _, m in moe_layers(gm)]
    assert [m.block for m in layers] == list(range(BLOCKS))
    assert all(isinstance(m.experts, GenericExperts if arch in GENERIC else StackedExperts) for m in layers)
    if arch in FUSED:
        assert all(len(m.experts.up_weight) == 2 and m.experts.up_weight[0].shape == (E, D, FF) for m in layers)

    ffn = _ffn_size(arch)
    if plan.moe.residual:   # the dense FFN stays; E experts, a router [E, d] and coef Linear(d, 2) are added
        want = _dense_size(arch) + BLOCKS * (E * ffn + E * D + 2 * D + 2)
    else:                   # the dense FFN is gone: E experts and a router replace it
        want = _dense_size(arch) + BLOCKS * (E * ffn + E * D - ffn)
        dense = [n for n, _ in gm.named_parameters() if ".ffn." in n or ".mlp." in n]
        assert dense == [], f"dense FFN parameters left in the graph: {dense}"
        assert not [n.name for n in gm.graph.nodes if n.meta.get(M.ROLE) == "ffn"]
        if arch == "dropout":   # eval capture records the FFN's dropout too: it goes with the FFN
            assert not [n for n in gm.graph.nodes if packet(n) in (aten.dropout, aten.native_dropout)]
    assert moefx.count_params(gm).total == want

    with torch.no_grad():
        for shape in ((3, 5), (1, 9)):
            x = _ids(*shape, seed=1)
            assert _close(main_tensor(gm(x)), main_tensor(model(x))), shape

    out = main_tensor(gm(_ids(4, 16, seed=2)))
    (out.float().pow(2).mean() + moefx.aux_loss(gm)).backward()
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"moe{i}.{name} gets no gradient"


def test_dropout_ffn_leaves_nothing_dead_in_train_mode():
    """convert(train=True) keeps dropout active; the replaced FFN's up, GELU and dropout are erased,
    and the dropout now runs inside every expert."""
    model, ids = tiny_model("dropout"), _ids(2, 6)
    cap = moefx.capture(model, (ids,), train=True)
    assert [n.args[2] for n in cap.graph.nodes if packet(n) is aten.dropout] == [True] * BLOCKS
    gm = moefx.convert(model, PLANS["top2"], (ids,), train=True)
    assert not [n for n in gm.graph.nodes if packet(n) in (aten.dropout, aten.native_dropout)]
    assert not [n for n, _ in gm.named_parameters() if ".ffn." in n]
    assert moefx.count_params(gm).total == base_params() + BLOCKS * E * (ffn_params("dropout") + D)
    for _, layer in moe_layers(gm):
        drops = [n for n in layer.experts.middle.graph.nodes if packet(n) is aten.dropout]
        assert len(drops) == 1 and drops[0].args[1:] == (0.1, True)
    torch.manual_seed(0)
    out = gm(_ids(4, 16, seed=2))
    (out.pow(2).mean() + moefx.aux_loss(gm)).backward()
    assert all(p.grad is not None for _, layer in moe_layers(gm) for p in layer.parameters())


# -- distinct experts against an eager MoE written here ---------------------------------------------

def _expert_state(arch: str, layer: MoELayer, e: int, dense_ffn) -> dict:
    """Expert e's weights in the dense FFN module's own layout, by the conventions written here:
    stacked ups are [d, f] matrices in graph order (a fused up's gate part first), the down [f, d];
    generic experts hold every region parameter under its flat name."""
    ex = layer.experts
    if isinstance(ex, GenericExperts):
        prefix = f"blocks_{layer.block}_ffn_"
        return {n: ex.expert_params[prefix + n.replace(".", "_")][e] for n, _ in dense_ffn.named_parameters()}
    if arch in FUSED:
        up, down = ("gate_up_proj", "down_proj") if arch == "phi3" else ("gate_up", "down")
        state = {f"{up}.weight": torch.cat([w[e].t() for w in ex.up_weight]), f"{down}.weight": ex.down_weight[e].t()}
        if len(ex.up_bias):
            state[f"{up}.bias"] = torch.cat([b[e] for b in ex.up_bias])
        if ex.down_bias is not None:
            state[f"{down}.bias"] = ex.down_bias[e]
        return state
    if arch == "einsum-in-out":
        return {"wi": ex.up_weight[0][e], "wo": ex.down_weight[e]}
    if arch == "einsum-out-in":
        return {"wi": ex.up_weight[0][e].t(), "wo": ex.down_weight[e].t()}
    raise KeyError(arch)


def _route(logits: torch.Tensor, k: int, unit_top1: bool) -> list[list[tuple[int, float]]]:
    """Per token [(expert, weight)]: top-1 argmax of p with weight 1 (unit_top1, the default when
    upcycling) or p; top-2 argmax of p, then argmax of the logits without it, weights p / (p1 + p2).
    No capacity (drop_tokens=False)."""
    probs = torch.softmax(logits.float(), dim=-1)
    routes = []
    for s in range(logits.shape[0]):
        first = int(torch.argmax(probs[s]))
        if k == 1:
            routes.append([(first, 1.0 if unit_top1 else float(probs[s, first]))])
            continue
        masked = logits[s].float().clone()
        masked[first] = -math.inf
        second = int(torch.argmax(masked))
        p1, p2 = float(probs[s, first]), float(probs[s, second])
        routes.append([(first, p1 / (p1 + p2)), (second, p2 / (p1 + p2))])
    return routes


class _ReferenceMoE(torch.nn.Module):
    """Replaces a dense FFN: routes each token by hand and runs the dense module with its experts' weights."""

    def __init__(self, arch: str, layer: MoELayer, dense_ffn):
        super().__init__()
        self.arch, self.layer, self.dense = arch, layer, dense_ffn
        self.used: set[int] = set()

    def forward(self, h):
        d = h.shape[-1]
        x = h.reshape(-1, d)
        logits = x.float() @ self.layer.router.weight.float().t()
        rows = []
        for s, picks in enumerate(_route(logits, self.layer.gate.top_k, self.layer.gate.unit_top1)):
            acc = torch.zeros(x.shape[-1])
            for e, w in picks:
                self.used.add(e)
                state = _expert_state(self.arch, self.layer, e, self.dense)
                y = torch.func.functional_call(self.dense, state, (x[s:s + 1].reshape(1, 1, d),))
                acc = acc + w * y.reshape(d)
            rows.append(acc)
        out = torch.stack(rows)
        if self.layer.coef is not None:
            c = torch.softmax(self.layer.coef(x), dim=-1)
            out = out * c[:, 0:1] + self.dense(h).reshape(-1, d) * c[:, 1:2]
        return out.reshape(h.shape)


def _patched(model, gm, arch: str):
    import copy

    ref = copy.deepcopy(model)
    for _, layer in moe_layers(gm):
        dense = _dense_ffn(ref, arch, layer.block)
        if arch == "phi3":
            ref.model.layers[layer.block].mlp = _ReferenceMoE(arch, layer, dense)
        else:
            ref.blocks[layer.block]["ffn"] = _ReferenceMoE(arch, layer, dense)
    return ref.eval()


DISTINCT = [
    ("fused-chunk", "top2", {"init": "random"}),
    ("fused-split", "top1-residual", {"init_noise": 0.5}),
    ("fused-slice", "top2", {"init_noise": 0.5}),
    ("einsum-in-out", "top1-residual", {"init": "random"}),
    ("einsum-out-in", "top2", {"init_noise": 0.5}),
    ("normformer", "top2", {"init_noise": 0.5}),
    ("normformer", "top1-residual", {"init": "random"}),
    ("phi3", "top2", {"init": "random"}),
]


@pytest.mark.parametrize("arch,plan_name,init", DISTINCT, ids=[f"{a}-{p}-{next(iter(i))}" for a, p, i in DISTINCT])
def test_distinct_experts_match_a_hand_written_moe(arch, plan_name, init):
    model, ids = _model(arch), _ids(2, 6)
    plan = {"moe": {**PLANS[plan_name]["moe"], **init}}
    gm = moefx.convert(model, plan, (ids,)).eval()
    for _, layer in moe_layers(gm):           # the experts really differ
        p = next(p for p in layer.experts.parameters() if p.dim() == 3)
        assert (p[0] - p[1]).abs().max() > 1e-3
    ref = _patched(model, gm, arch)
    x = _ids(3, 5, seed=3)
    with torch.no_grad():
        got, want = main_tensor(gm(x)), main_tensor(ref(x))
    assert _close(got, want)
    assert not _close(got, main_tensor(model(x)))            # the experts matter
    used = [m.used for m in ref.modules() if isinstance(m, _ReferenceMoE)]
    assert len(used) == BLOCKS and all(len(u) > 1 for u in used)   # the routing is not trivial


def test_random_init_norm_weight_inside_the_ffn_is_one():
    """init="random" draws matrices and zeroes biases, but a norm's weight inside the FFN starts at 1
    (zero would make every expert's output constant)."""
    gm = moefx.convert(tiny_model("normformer"), {"moe": {**PLANS["top2"]["moe"], "init": "random"}}, (_ids(2, 6),))
    params = gm.moe0.experts.expert_params
    assert torch.equal(params["blocks_0_ffn_norm_weight"], torch.ones(E, FF))
    assert torch.equal(params["blocks_0_ffn_norm_bias"], torch.zeros(E, FF))
    assert torch.equal(params["blocks_0_ffn_fc1_bias"], torch.zeros(E, FF))


# -- slicing / tensor parallelism stay exact -----------------------------------------------------------

@pytest.mark.parametrize("arch", ["fused-chunk", "fused-slice"])
def test_fused_experts_slice_over_f_exactly(arch):
    """A fused up is kept as one stacked matrix per part, so expert slicing stays exact."""
    gm = moefx.convert(tiny_model(arch), {"moe": {**PLANS["top2"]["moe"], "init_noise": 0.5}}, (_ids(2, 6),))
    ex = gm.moe1.experts
    assert ex.sliceable
    buf = torch.randn(E, 5, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ex(buf)
        parts = sum(ex.slice_inner(i, 2)(buf) for i in range(2))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


def test_ffn_with_params_in_the_middle_is_never_sliced():
    gm = moefx.convert(tiny_model("normformer"), PLANS["top2"], (_ids(2, 6),))
    ex = gm.moe0.experts
    assert isinstance(ex, GenericExperts) and not ex.sliceable
    with pytest.raises(ValueError, match="expert slicing"):
        ex.slice_inner(0, 2)


@pytest.mark.parametrize("arch", ["fused-chunk", "fused-slice", "normformer"])
def test_tp_keeps_fused_and_normformer_ffns_whole(arch):
    cap = moefx.capture(tiny_model(arch), (_ids(2, 6),))
    plan = moefx.Plan.from_dict({"parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2}})
    with pytest.warns(UserWarning, match="FFN of block 0: its middle is not elementwise"):
        view = moefx.partitioned_view(cap, plan, rank=1)
    sharded = [n for n, _ in view.named_parameters() if n.startswith("tp_shard_") and "_ffn_" in n]
    assert sharded == []


@pytest.mark.parametrize("arch", ["einsum-in-out", "einsum-out-in"])
def test_tp_splits_einsum_ffns_over_f(arch):
    cap = moefx.capture(tiny_model(arch), (_ids(2, 6),))
    plan = moefx.Plan.from_dict({"parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2}})
    view = moefx.partitioned_view(cap, plan, rank=1)
    shapes = {n: tuple(p.shape) for n, p in view.named_parameters() if n.startswith("tp_shard_blocks_0_ffn_")}
    half = FF // 2
    want = ({"wi": (D, half), "wo": (half, D)} if arch == "einsum-in-out" else {"wi": (half, D), "wo": (D, half)})
    assert shapes == {f"tp_shard_blocks_0_ffn_{k}": v for k, v in want.items()}


def test_fused_experts_materialise_per_rank_like_convert():
    """The recipes of a fused up's parts (chunks of the dense weight) rebuild the same tensors."""
    from moefx.runtime.build import ModelSpec, build_reference

    plan = {"moe": {**PLANS["top1-residual"]["moe"], "init_noise": 0.1}}
    ref = build_reference(ModelSpec(name="ffn_pattern_models:fused_chunk_lm"), moefx.Plan.from_dict(plan))
    model, ids = tiny_model("fused-chunk"), _ids(2, 8)
    gm = moefx.convert(model, plan, (ids,))
    got, want = ref.state_dict(), gm.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


class _BiasInMiddle(torch.nn.Module):
    """`x @ W + b` linears (matmul, then a bias add over f inside the FFN), or an interleaved fused
    gate/up projection (`h[..., ::2]`, `h[..., 1::2]`)."""

    def __init__(self, kind: str, d: int = D, f: int = FF):
        super().__init__()
        self.kind = kind
        self.w1 = torch.nn.Parameter(torch.randn(d, 2 * f if kind == "interleaved" else f) / d ** 0.5)
        self.b1 = torch.nn.Parameter(torch.randn(f))
        self.w2 = torch.nn.Parameter(torch.randn(f, d) / f ** 0.5)

    def forward(self, x):
        x = x + x.cumsum(1) / 4
        h = x @ self.w1
        h = torch.relu(h + self.b1) if self.kind == "bias" else torch.nn.functional.silu(h[..., ::2]) * h[..., 1::2]
        return x + h @ self.w2


def test_bias_over_f_in_the_middle_goes_generic_and_stays_whole_under_tp():
    model, x = _BiasInMiddle("bias").eval(), torch.randn(2, 6, D)
    (ffn,) = moefx.find_ffns(moefx.capture(model, (x,)))
    assert ffn.middle_params == ("b1",) and not ffn.stackable and not ffn.elementwise   # b1 would need splitting
    gm = moefx.convert(model, PLANS["top2"], (x,))
    assert isinstance(gm.moe0.experts, GenericExperts)
    with torch.no_grad():
        other = torch.randn(3, 4, D)
        assert _close(gm(other), model(other))


def test_interleaved_fused_projection_is_not_taken_for_contiguous_parts():
    model, x = _BiasInMiddle("interleaved").eval(), torch.randn(2, 6, D)
    assert moefx.find_ffns(moefx.capture(model, (x,))) == []
