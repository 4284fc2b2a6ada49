"""Rank graphs are plain data: they compile with fullgraph=True and export with torch.export on gloo
ranks (eager results), and every tensor handed to a collective lives on the tokens' device (proved
on fake CUDA tensors, without a GPU)."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import moefx
from moefx.outputs import main_tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

MOE = {"experts": [4, 8], "every": 2, "residual": True, "drop_tokens": False, "init_noise": 0.2}
PLANS = {
    "ep2-dropless": {"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": 2, "ep": 2}},
    "ep2-capacity": {"moe": {**MOE, "top_k": 2, "drop_tokens": True, "residual": False},
                     "parallel": {"nodes": 1, "devices_per_node": 2, "ep": 2}},
    "tp2-coordinated": {"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2}},
}


A2A = "_c10d_functional.all_to_all_single.default"
WAIT = "_c10d_functional.wait_tensor.default"


def _recording_backend(graphs: dict):
    """aot_eager that keeps the forward and backward ATen graphs AOT autograd hands the compiler."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _compile_and_export(rank, world, names):
    from torch._dynamo.utils import counters
    from torch.export import Dim

    from moefx.runtime.build import ModelSpec, build_rank, example_inputs

    warnings.filterwarnings("ignore", message=".*drop_tokens.*")
    spec = ModelSpec(name="gpt2-tiny")
    x = example_inputs(spec)
    other = example_inputs(ModelSpec(name="gpt2-tiny", batch=3, seq=5))
    for name in names:
        local, _ = build_rank(spec, moefx.Plan.from_dict(PLANS[name]))
        out = main_tensor(local(*x))
        (out.pow(2).mean() + moefx.aux_loss(local)).backward()
        eager = {n: p.grad.clone() for n, p in local.named_parameters()}
        local.zero_grad()
        torch._dynamo.reset()
        counters.clear()
        graphs: dict = {}
        compiled = torch.compile(local, fullgraph=True, backend=_recording_backend(graphs))  # no user Dynamo flags
        got = main_tensor(compiled(*x))
        (got.pow(2).mean() + moefx.aux_loss(local)).backward()
        assert sum(counters["graph_break"].values()) == 0, (name, dict(counters["graph_break"]))
        torch.testing.assert_close(got, out, rtol=0, atol=1e-6, msg=f"{name}: compiled output")
        for n, p in local.named_parameters():
            torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-7, msg=f"{name}: compiled grad {n}")
        # what the compiler sees: torch's functional all-to-alls, each with a wait node of its own,
        # forward (dispatch + combine per EP layer, 2 layers) and backward (their reverse trips)
        for kind in ("forward", "backward"):
            t = _targets(graphs[kind][0])
            assert t.count(A2A) == 4 and t.count(WAIT) >= 4, (name, kind, t.count(A2A), t.count(WAIT))
            assert "moefx.all_to_all.default" not in t and "moefx.all_to_all_start.default" not in t
        with torch.no_grad():
            torch.testing.assert_close(main_tensor(compiled(*other)), main_tensor(local(*other)), rtol=0, atol=1e-6)
        local.eval()
        ep = torch.export.export(local, x, dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)
        assert A2A in _targets(ep.graph_module), name
        # an even token count: torch's all_to_all_single meta checks every split >= 0, and over a
        # capacity of sym_max(ceil(N / 2), min_capacity) that check leaves the program a guard that N is even
        even = example_inputs(ModelSpec(name="gpt2-tiny", batch=3, seq=6))
        with torch.no_grad():
            torch.testing.assert_close(main_tensor(ep.module()(*even)), main_tensor(local(*even)), rtol=0,
                                       atol=1e-6, msg=f"{name}: exported, another shape")


@pytest.mark.dist
@pytest.mark.slow
def test_rank_graphs_compile_fullgraph_and_export_on_2_ranks():
    # capacity mode (static shapes, no count exchange) and dropless with TP-coordinated dispatch (uneven
    # splits from exchanged counts, TP collectives); plain dropless EP is the latter without TP
    run_world(_compile_and_export, 2, ["ep2-capacity", "tp2-coordinated"], timeout=600)


# ------------------------------------------------------------------ NCCL-ready: devices of collective inputs

CUDA_PLANS = {
    **PLANS,
    "hier-2x2": {"moe": MOE, "parallel": {"nodes": 2, "devices_per_node": 2, "ep": 4, "hierarchical_a2a": True}},
    "slicing-2x4": {"moe": {**MOE, "top_k": 2}, "parallel": {"nodes": 2, "devices_per_node": 4, "ep": 8}},
    "hier-capacity": {"moe": {**MOE, "drop_tokens": True, "capacity_factor": 2.0},
                      "parallel": {"nodes": 2, "devices_per_node": 2, "ep": 4, "hierarchical_a2a": True}},
}


@pytest.fixture(scope="module")
def converted():
    from moefx.models import load_model

    model, inputs = load_model("gpt2-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: moefx.convert(model, {"moe": p["moe"]}, inputs) for k, p in CUDA_PLANS.items()}, inputs


@pytest.mark.parametrize("name", sorted(CUDA_PLANS))
def test_every_collective_input_is_on_the_tokens_device(name, converted):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from moefx.nn.collectives import OPS
    from moefx.weights.materialize import retarget

    graphs, inputs = converted
    plan = moefx.Plan.from_dict(CUDA_PLANS[name])
    rank = plan.parallel.world_size - 1
    local = moefx.partitioned_view(graphs[name], plan, rank=rank)
    retarget(local, torch.device("cpu"), torch.device("cuda"))     # what materialising on a GPU does
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)
    cuda = torch.device("cuda", 0)
    conv = mode.fake_tensor_converter
    fake = lambda t: conv.from_meta_and_device(mode, t.detach().to("meta"), cuda)  # noqa: E731
    state = {k: fake(v) for k, v in list(local.named_parameters()) + list(local.named_buffers())}
    seen: dict[str, set] = {}

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target in OPS:
                devices = {a.device for a in torch.utils._pytree.tree_leaves((args, kwargs))
                           if isinstance(a, torch.Tensor)}
                seen.setdefault(str(target), set()).update(devices)
            return super().call_function(target, args, kwargs)

    ids = fake(inputs[0])
    from torch._dispatch.python import enable_python_dispatcher

    with mode, enable_python_dispatcher():           # symbolic (data-dependent) shapes, as export traces them
        with torch.nn.utils.stateless._reparametrize_module(local, state):
            out = Recorder(local).run(ids)
    assert main_tensor(out).device == cuda
    assert seen, "no collective ran"
    assert all(devices == {cuda} for devices in seen.values()), seen
    expected = {"moefx.all_to_all_start.default", "moefx.all_gather_rows.default"} if not CUDA_PLANS[name]["moe"][
        "drop_tokens"] else {"moefx.all_to_all_start.default"}
    assert expected <= set(seen), seen


# ------------------------------------------------------------------ exact all-to-all bytes

def _bytes_sent(rank, world):
    import torch.distributed as dist

    from moefx.runtime.build import ModelSpec, build_rank, example_inputs
    from moefx.runtime.stats import bytes_by_layer, collective_bytes

    spec = ModelSpec(name="gpt2-tiny", batch=2, seq=7)
    x = example_inputs(ModelSpec(name="gpt2-tiny", batch=2, seq=7, seed=rank))   # different tokens per rank
    S, d, k = 2 * 7, 32, 2
    for coordinated in (False, True):
        plan = {"moe": {**MOE, "top_k": k}, "parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2,
                                                        "coordinated_a2a": coordinated}}
        if not coordinated:
            plan["parallel"] = {"nodes": 1, "devices_per_node": 2, "ep": 2}
        local, _ = build_rank(spec, moefx.Plan.from_dict(plan))
        sent = bytes_by_layer(collective_bytes(local, *x))
        mine = torch.tensor([sent[0], sent[1]])
        if coordinated:     # the TP pair shares the batch: each sends its share of the routed rows, exactly
            total = mine.clone()
            dist.all_reduce(total)
            assert total.tolist() == [S * k * d * 4] * 2, total
            assert all(b < S * k * d * 4 for b in mine.tolist())
        else:               # dropless: exactly the routed rows, no padding to the busiest expert
            assert mine.tolist() == [S * k * d * 4] * 2, mine
    plan = {"moe": {**MOE, "top_k": k, "drop_tokens": True, "capacity_factor": 1.0},
            "parallel": {"nodes": 1, "devices_per_node": 2, "ep": 2}}
    local, _ = build_rank(spec, moefx.Plan.from_dict(plan))
    records = collective_bytes(local, *x)
    assert not [r for r in records if r.op == "all_gather_rows"], "capacity layers exchange no counts"
    sent = bytes_by_layer(records)
    for layer, E in ((0, 4), (1, 8)):
        C = max(-(-S * k // E), 4)
        assert sent[layer] == E * C * d * 4


@pytest.mark.dist
def test_all_to_all_bytes_are_the_routed_rows():
    run_world(_bytes_sent, 2, timeout=300)
