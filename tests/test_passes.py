"""Pass contract: requires / call / ensures, purity, the one pipeline, verification, capture errors."""
import pytest
import torch
from torch import fx

import moefx
from moefx.facts import facts
import moefx.nn.moe
from moefx import meta as M
from moefx.errors import AnalysisError, BackendError, CaptureError, PassError, PlanError
from moefx.models import load_model
from moefx.passes import pipeline
from moefx.passes.base import Pass, PassContext
from moefx.passes.conditions import GATING_LOWERED, MOE_LAYERS
from moefx.passes.lower_gating import LOWER_GATING
from moefx.passes.pr_moe import PR_MOE
from moefx.plan import PASS_NAMES

PLAN = moefx.Plan.from_dict({"moe": {"experts": 4, "every": 2, "residual": True, "drop_tokens": False}})
CTX = PassContext(PLAN)


@pytest.fixture(scope="module")
def captured():
    model, inputs = load_model("llama-tiny")
    return moefx.capture(model, inputs), inputs


def test_one_pipeline_in_order_with_stages():
    assert tuple(p.name for p in moefx.PIPELINE) == PASS_NAMES == (
        "pr_moe", "shrink", "lower_gating", "expert_parallel", "tensor_parallel", "hierarchical_a2a",
        "overlap_a2a")
    assert [p.stage for p in moefx.PIPELINE] == ["convert"] * 3 + ["distribute"] * 4
    assert all(isinstance(p, Pass) for p in moefx.PIPELINE)
    full = moefx.Plan.from_dict({**PLAN.to_dict(), "student": {"layers": 3},
                                 "parallel": {"nodes": 2, "devices_per_node": 2, "tp": 2}})
    assert [p.name for p in pipeline.check(PassContext(full))] == list(PASS_NAMES)
    assert [p.name for p in pipeline.check(CTX)] == ["pr_moe", "lower_gating"]
    # a dense plan has no MoE layers to lower: lower_gating has nothing to do
    assert [p.name for p in pipeline.check(PassContext(moefx.Plan()))] == []


def test_passes_keep_no_state_and_do_not_mutate_their_input(captured):
    gm, inputs = captured
    code, names = gm.code, set(dict(gm.named_modules()))
    out = PR_MOE(gm, CTX)
    assert gm.code == code and set(dict(gm.named_modules())) == names
    lowered = LOWER_GATING(out, CTX)
    assert lowered is not out and out.moe1.gate.impl == "auto" and lowered.moe1.gate.impl == "torch"
    assert all(n.meta.get(M.PASS) == "pr_moe" for n in out.graph.nodes if n.meta.get(M.ROLE) == "dispatch")
    assert all(vars(p) == {} for p in moefx.PIPELINE), "a pass object keeps per-call state"


def test_requires_are_checked(captured):
    gm, _ = captured
    with pytest.raises(PassError, match="pass 'lower_gating' requires moe_layers"):
        LOWER_GATING(gm, CTX)                           # a dense graph: no MoE layers to lower
    with pytest.raises(AnalysisError, match="pass 'pr_moe' requires ffns_found"):
        moefx.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), PLAN, (torch.randn(2, 4),))


def test_lowering_records_impl_and_refuses_triton_on_cpu(captured, monkeypatch):
    gm, _ = captured
    out = pipeline.run(gm, CTX, "convert")
    impls = {n.meta[M.IMPL] for n in out.graph.nodes if M.IMPL in n.meta}
    assert impls == {"torch"} and GATING_LOWERED.holds(out) and MOE_LAYERS.holds(out)
    assert facts(out).passes == ("pr_moe", "lower_gating")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forced = moefx.Plan.from_dict({**PLAN.to_dict(), "lowering": {"gating": "triton"}})
    with pytest.raises(BackendError, match="needs a CUDA device"):
        pipeline.run(gm, PassContext(forced), "convert")


def test_disable_skips_a_pass(captured):
    gm, _ = captured
    plan = moefx.Plan.from_dict({**PLAN.to_dict(), "disable": ["lower_gating"]})
    out = pipeline.run(gm, PassContext(plan), "convert")
    assert facts(out).passes == ("pr_moe",)


def test_disabling_a_needed_pass_is_refused_before_any_work(monkeypatch):
    import importlib

    C = importlib.import_module("moefx.convert")   # the module (moefx.convert is the function)

    def no_capture(*a, **k):
        raise AssertionError("capture ran before the plan was checked")

    monkeypatch.setattr(C, "capture", no_capture)
    model, inputs = load_model("gpt2-tiny")
    plan = moefx.Plan.from_dict({**PLAN.to_dict(), "disable": ["lower_gating"],
                                 "parallel": {"nodes": 1, "devices_per_node": 2}})
    with pytest.raises(PlanError, match="pass 'expert_parallel' needs gating_lowered .* which pass 'lower_gating' "
                                        "provides, but plan.disable switches it off"):
        moefx.convert(model, plan, inputs)
    plan = moefx.Plan.from_dict({**PLAN.to_dict(), "disable": ["pr_moe"]})
    with pytest.raises(PlanError, match="pass 'lower_gating' needs moe_layers .* which pass 'pr_moe' provides"):
        moefx.convert(model, plan, inputs)


class _Broken(Pass):
    name = "broken"
    stage = "convert"

    def call(self, gm, ctx):
        out = PR_MOE.call(gm, ctx)
        combine = next(n for n in out.graph.nodes if n.meta.get(M.ROLE) == "combine")
        combine.meta[M.LAYER] = 99  # a dispatch without its combine
        return out


def test_verifier_catches_a_broken_pass(captured, monkeypatch):
    gm, _ = captured
    with pytest.raises(AssertionError, match="every dispatch needs its combine"):
        _Broken()(gm, CTX)
    monkeypatch.setattr(pipeline, "check", lambda ctx, gm=None, stage=None: [_Broken()])
    with pytest.raises(PassError, match="pass 'broken' failed.*every dispatch needs its combine"):
        pipeline.run(gm, CTX, "convert")


def test_ensures_catch_a_wrong_result(captured):
    gm, _ = captured

    class Forgetful(type(PR_MOE)):
        def call(self, g, ctx):   # a PR-MoE that forgets the last layer (rewrites as if every 3rd block)
            sparse = moefx.Plan.from_dict({**ctx.plan.to_dict(), "moe": {**ctx.plan.to_dict()["moe"], "every": 3}})
            return PR_MOE.call(g, PassContext(sparse))

    with pytest.raises(AssertionError, match="pr_moe made 1 MoE layers, the plan asks for 2"):
        Forgetful()(gm, CTX)


def test_dump_dir_writes_numbered_files(captured, tmp_path):
    gm, _ = captured
    pipeline.run(gm, CTX, "convert", dump_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_convert_input.py", "001_pr_moe.py",
                                                          "003_lower_gating.py"]


class _TinyMixer(torch.nn.Module):
    """A plain module symbolic_trace can handle: token mixing by a causal mean, then an MLP."""

    def __init__(self, d=16, blocks=2):
        super().__init__()
        self.emb = torch.nn.Embedding(32, d)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(blocks))
        self.ups = torch.nn.ModuleList(torch.nn.Linear(d, 4 * d) for _ in range(blocks))
        self.downs = torch.nn.ModuleList(torch.nn.Linear(4 * d, d) for _ in range(blocks))

    def forward(self, ids):
        h = self.emb(ids)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + h.cumsum(1) / 4
            h = h + down(torch.nn.functional.gelu(up(norm(h))))
        return h


def test_user_traced_graph_module_is_accepted():
    model = _TinyMixer()
    inputs = (torch.randint(0, 32, (2, 6)),)
    traced = fx.symbolic_trace(model)
    gm = moefx.convert(traced, PLAN, inputs)
    assert len([m for m in gm.modules() if isinstance(m, moefx.nn.moe.MoELayer)]) == 1
    with torch.no_grad():
        assert torch.allclose(gm(*inputs), model(*inputs), atol=1e-5)
        other = torch.randint(0, 32, (3, 4))
        assert torch.allclose(gm(other), model(other), atol=1e-5)


def test_untraceable_model_names_the_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value
                return x * 2
            return x

    with pytest.raises(CaptureError, match=r"test_passes.py:\d+.*if x.sum\(\) > 0"):
        moefx.capture(DataDependent(), (torch.randn(2, 3),))


def test_triton_impl_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="needs a CUDA device"):
        moefx.route(torch.randn(8, 4), impl="triton")
