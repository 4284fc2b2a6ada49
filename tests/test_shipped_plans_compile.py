"""Every shipped plan compiles with no graph break (torch.compile(fullgraph=True), aot_eager), forward
and backward, equal to eager: the tiny single-process plans on a Conv1D (GPT-2) and a SwiGLU (LLaMA)
decoder, the paper's 24-layer plans on a 24-block GPT-2 of tiny width, the parallel plan's rank
graphs on the real gloo ranks it names; and every other tiny built-in model with the tiny plan."""
import glob
import os
import sys
import warnings

import pytest
import torch

import moefx
from moefx.models import BUILTIN_MODELS, load_model
from moefx.outputs import main_tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = sorted(glob.glob(os.path.join(ROOT, "examples", "plans", "*.toml")))
SINGLE = [p for p in PLANS if moefx.Plan.from_file(p).parallel is None]
PARALLEL = [p for p in PLANS if moefx.Plan.from_file(p).parallel is not None]


def _logits(out):
    return main_tensor(out)


def _compiled_equals_eager(gm, inputs, tag):
    """Compile gm whole, run forward + backward, compare with eager; returns the graph-break count."""
    from torch._dynamo.utils import counters

    out = _logits(gm(*inputs))
    (out.float().pow(2).mean() + moefx.aux_loss(gm)).backward()
    eager = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    got = _logits(compiled(*inputs))
    (got.float().pow(2).mean() + moefx.aux_loss(gm)).backward()
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6, msg=f"{tag}: compiled output")
    for n, g in eager.items():
        torch.testing.assert_close(dict(gm.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6,
                                   msg=f"{tag}: compiled grad {n}")
    return sum(counters["graph_break"].values())


def _gpt2_24_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=24, n_embd=32, n_head=2, vocab_size=128, n_positions=32, use_cache=False,
                     attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # compiled RNG differs
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1)),)


@pytest.mark.slow
@pytest.mark.parametrize("path", SINGLE, ids=[os.path.basename(p) for p in SINGLE])
def test_every_single_process_plan_compiles_whole(path):
    plan = moefx.Plan.from_file(path)
    big = os.path.basename(path).startswith("350m")     # the paper's plans name 24 layers
    models = [_gpt2_24_blocks()] if big else [load_model("gpt2-tiny"), load_model("llama-tiny")]
    for model, inputs in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = moefx.convert(model, plan, inputs, train=True)
        gm.train()
        assert _compiled_equals_eager(gm, inputs, f"{type(model).__name__} {os.path.basename(path)}") == 0


TINY = os.path.join(ROOT, "examples", "plans", "tiny_pr_moe.toml")
OTHERS = [n for n in BUILTIN_MODELS if n.endswith("-tiny") and n not in ("gpt2-tiny", "llama-tiny")]


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_other_builtin_model_compiles_whole(name):
    # decoders, encoders, a ViT and encoder-decoders with the tiny PR-MoE plan (eval capture: some of
    # these keep dropout in train mode, whose compiled masks are drawn differently)
    model, inputs = load_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = moefx.convert(model, moefx.Plan.from_file(TINY), inputs)
    assert _compiled_equals_eager(gm, inputs, name) == 0


def _rank_graphs(rank, world, path, names):
    from moefx.runtime.build import ModelSpec, build_rank, example_inputs

    warnings.simplefilter("ignore")
    for name in names:
        spec = ModelSpec(name=name)
        local, _ = build_rank(spec, moefx.Plan.from_file(path), train=True)
        local.train()
        assert _compiled_equals_eager(local, example_inputs(spec), f"rank {rank} {name}") == 0


@pytest.mark.dist
@pytest.mark.slow
def test_the_parallel_plan_rank_graphs_compile_whole():
    (path,) = PARALLEL
    world = moefx.Plan.from_file(path).parallel.world_size
    run_world(_rank_graphs, world, path, ["llama-tiny", "gpt2-tiny"], timeout=900)
