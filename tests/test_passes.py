"""Pass contract: purity, verification after every pass, lowering choices, capture errors."""
import pytest
import torch
from torch import fx

import moefx
import moefx.nn.moe
from moefx import meta as M
from moefx.errors import BackendError, CaptureError, PassError
from moefx.models import load_model
from moefx.passes.infra import run_pipeline
from moefx.passes.lower_gating import lower_gating
from moefx.passes.pr_moe import pr_moe

PLAN = moefx.Plan.from_dict({"moe": {"experts": 4, "every": 2, "residual": True, "drop_tokens": False}})


@pytest.fixture(scope="module")
def captured():
    model, inputs = load_model("llama-tiny")
    return moefx.capture(model, inputs), inputs


def test_passes_do_not_mutate_their_input(captured):
    gm, inputs = captured
    code, names = gm.code, set(dict(gm.named_modules()))
    out = pr_moe(gm, PLAN)
    assert gm.code == code and set(dict(gm.named_modules())) == names
    lowered = lower_gating(out, PLAN)
    assert lowered is not out and out.moe1.gate.impl == "auto" and lowered.moe1.gate.impl == "torch"
    assert all(n.meta.get(M.PASS) == "pr_moe" for n in out.graph.nodes if n.meta.get(M.ROLE) == "dispatch")


def test_lowering_records_impl_and_refuses_triton_on_cpu(captured, monkeypatch):
    gm, _ = captured
    out = run_pipeline(gm, PLAN, [pr_moe, lower_gating])
    impls = {n.meta[M.IMPL] for n in out.graph.nodes if M.IMPL in n.meta}
    assert impls == {"torch"}
    assert out.meta["moefx_passes"] == ["pr_moe", "lower_gating"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forced = moefx.Plan.from_dict({**PLAN.to_dict(), "lowering": {"gating": "triton"}})
    with pytest.raises(PassError, match="lower_gating.*needs a CUDA device"):
        run_pipeline(gm, forced, [pr_moe, lower_gating])


def test_disable_skips_a_pass(captured):
    gm, _ = captured
    plan = moefx.Plan.from_dict({**PLAN.to_dict(), "disable": ["lower_gating"]})
    out = run_pipeline(gm, plan, [pr_moe, lower_gating])
    assert out.meta["moefx_passes"] == ["pr_moe"]


def test_verifier_catches_a_broken_pass(captured):
    gm, _ = captured

    def broken(g, plan):
        out = pr_moe(g, plan)
        combine = next(n for n in out.graph.nodes if n.meta.get(M.ROLE) == "combine")
        combine.meta[M.LAYER] = 99  # a dispatch without its combine
        return out

    broken.name = "broken"
    with pytest.raises(PassError, match="pass 'broken' failed.*every dispatch needs its combine"):
        run_pipeline(gm, PLAN, [broken])


def test_dump_dir_writes_numbered_files(captured, tmp_path):
    gm, _ = captured
    run_pipeline(gm, PLAN, [pr_moe, lower_gating], dump_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_captured.py", "001_pr_moe.py", "002_lower_gating.py"]


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


def test_no_ffn_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PassError, match="no position-wise FFN"):
        moefx.convert(model, PLAN, (torch.randn(2, 4),))


def test_triton_impl_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="needs a CUDA device"):
        moefx.route(torch.randn(8, 4), impl="triton")
