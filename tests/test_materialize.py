"""Per-rank materialisation: meta conversion + partitioning, then only the rank's tensors filled
from a source (a safetensors folder, the dense model, a seeded init); equal to the single-process
model, outputs and reduced gradients."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import moefx
from moefx.facts import facts
from moefx.models import load_model
from moefx.outputs import main_tensor
from moefx.runtime.build import ModelSpec, build_reference
from moefx.weights.sources import SafetensorsSource, SeededSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

PLAN = {"moe": {"experts": [4, 8], "every": 2, "residual": True, "drop_tokens": False, "init_noise": 0.1}}


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "t5-tiny", "bert-tiny", "vit-tiny", "nanogpt-tiny"])
def test_meta_then_materialize_equals_convert(name):
    ref = build_reference(ModelSpec(name=name), moefx.Plan.from_dict(PLAN))
    model, inputs = load_model(name)
    gm = moefx.convert(model, PLAN, inputs)
    got, want = ref.state_dict(), gm.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(main_tensor(ref(*inputs)), main_tensor(gm(*inputs)))


def test_sources_read_exact_slices(tmp_path):
    model, _ = load_model("llama-tiny")
    model.save_pretrained(tmp_path)
    src = SafetensorsSource(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    full = model.state_dict()[name]
    assert torch.equal(src.read(name), full)
    assert torch.equal(src.read(name, {0: (16, 48), 1: (8, 24)}), full[16:48, 8:24])
    assert src.shape(name) == tuple(full.shape)
    seeded = SeededSource({"w": (10, 6), "ln.weight": (6,), "b.bias": (6,)}, seed=3)
    w = seeded.read("w")
    assert torch.equal(seeded.read("w", {0: (2, 7), 1: (1, 4)}), w[2:7, 1:4])
    assert torch.equal(seeded.read("ln.weight"), torch.ones(6)) and torch.equal(seeded.read("b.bias"), torch.zeros(6))
    assert not torch.equal(w, SeededSource({"w": (10, 6)}, seed=4).read("w"))
    assert 0.01 < float(w.std()) < 0.04


def test_a_tied_weight_resolves_through_its_alias(tmp_path):
    model, _ = load_model("gpt2-tiny")
    model.save_pretrained(tmp_path)        # writes transformer.wte.weight once (lm_head.weight is tied)
    assert "lm_head.weight" not in SafetensorsSource(tmp_path).names()
    spec = ModelSpec(weights=str(tmp_path))
    ref = build_reference(spec, moefx.Plan.from_dict(PLAN))
    assert torch.equal(ref.lm_head.weight, model.transformer.wte.weight)   # the graph reads it as lm_head


def _rank_equals_reference(rank, world, spec_kw, plan_dict, folder):
    import moefx
    from moefx.facts import placements
    from moefx.runtime.build import ModelSpec, build_rank, build_reference, example_inputs
    from moefx.weights.materialize import meta_tensors

    if folder is not None and rank == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        raise AssertionError("the weights folder was not written")
    spec = ModelSpec(**spec_kw)
    plan = moefx.Plan.from_dict(plan_dict)
    local, _ = build_rank(spec, plan)
    assert meta_tensors(local) == []
    ref = build_reference(spec, plan)
    resolved = facts(local).parallel
    held = sum(t.numel() for _, t in local.state_dict().items())
    full = sum(t.numel() for _, t in ref.state_dict().items())
    if resolved.world > 1 and any(lp.ep > 1 for lp in resolved.layers):
        assert held < full, "a rank holds the whole model"
    batches = [tuple(x.clone() for x in example_inputs(ModelSpec(**{**spec_kw, "seed": 50 + d})))
               for d in range(resolved.dp)]
    mine = batches[resolved.dp_rank(rank)]
    out = main_tensor(local(*mine))
    with torch.no_grad():
        want = main_tensor(ref(*mine))
    assert (out - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1.0), f"rank {rank} output"
    (out.float().pow(2).mean() + moefx.aux_loss(local)).backward()
    moefx.reduce_gradients(local)
    total = 0.0
    for b in batches:
        total = total + main_tensor(ref(*b)).float().pow(2).mean() + moefx.aux_loss(ref)
    (total / len(batches)).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in local.named_parameters():
        rec = placements(local)[name]
        g = ref_params[rec.global_name].grad
        for dim in rec.shard_dims:
            g = g.narrow(dim, rec.offsets[dim], p.shape[dim])
        if rec.counts:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")


@pytest.mark.dist
def test_ranks_from_a_safetensors_folder_seeded_init_and_the_dense_model(tmp_path):
    model, _ = load_model("llama-tiny", seed=3)
    model.save_pretrained(tmp_path / "llama")
    ep_tp = {**PLAN, "parallel": {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": 4}}
    run_world(_rank_equals_reference, 4, {"weights": str(tmp_path / "llama")}, ep_tp, str(tmp_path / "llama"),
              timeout=300)
    ep_dp = {**PLAN, "moe": {**PLAN["moe"], "top_k": 2, "residual": False}, "parallel": {"nodes": 2,
                                                                                         "devices_per_node": 2,
                                                                                         "ep": [2, 4]}}
    run_world(_rank_equals_reference, 4, {"name": "gpt2-tiny", "init": "seeded"}, ep_dp, None, timeout=300)
    # an encoder-decoder from the dense model: TP 2 with both ranks in one EP group (coordinated dispatch)
    run_world(_rank_equals_reference, 2, {"name": "t5-tiny"}, {**PLAN, "parallel": {"nodes": 1, "devices_per_node": 2,
                                                                                   "tp": 2, "ep": 2}}, None, timeout=300)
