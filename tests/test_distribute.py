"""Distributed equivalence on real gloo processes: partitioned == single-process, outputs and grads.

Every data-parallel replica gets its own batch (so a gradient reduced over the wrong group shows),
experts are distinct (init_noise, so a token sent to the wrong expert shows), and the reference
is the single-process model trained on the mean loss over all replicas' batches.
"""
import os
import sys

import pytest
import torch

from moefx.facts import collective_counts, facts

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

pytestmark = pytest.mark.dist

BASE = {"experts": [4, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False, "init_noise": 0.2}


def _case(moe: dict, parallel: dict) -> dict:
    return {"moe": {**BASE, **moe}, "parallel": parallel}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _loss(out):
    return _logits(out).float().pow(2).mean()


def replica_inputs(model_name: str, dp: int) -> list[tuple]:
    """One batch per data-parallel replica, all of the same shape, different tokens."""
    from moefx.models import load_model

    return [load_model(model_name, seed=100 + d)[1] for d in range(dp)]


def check_against_reference(rank, captured, plan_dict, model_name, tag):
    """Build the rank's model, run its replica's batch, compare output and reduced gradients with the
    single-process model on the mean loss over every replica's batch. Returns (local, output)."""
    import moefx
    from moefx.facts import placements

    plan = moefx.Plan.from_dict(plan_dict)
    torch.manual_seed(0)
    ref = moefx.convert(captured, plan)
    local = moefx.distribute(ref, plan)
    resolved = facts(local).parallel
    batches = replica_inputs(model_name, resolved.dp)
    mine = batches[resolved.dp_rank(rank)]

    out = _logits(local(*mine))
    with torch.no_grad():
        want = _logits(ref(*mine))
    scale = max(want.abs().max().item(), 1.0)
    assert (out - want).abs().max().item() <= 1e-5 * scale, f"{tag}: rank {rank} output differs"

    (_loss(out) + moefx.aux_loss(local)).backward()
    moefx.reduce_gradients(local)
    total = 0.0
    for b in batches:
        total = total + _loss(ref(*b)) + moefx.aux_loss(ref)
    (total / len(batches)).backward()

    ref_params = dict(ref.named_parameters())
    recs = placements(local)
    checked = 0
    for name, p in local.named_parameters():
        rec = recs[name]
        want_g = ref_params[rec.global_name].grad
        for dim in rec.shard_dims:
            want_g = want_g.narrow(dim, rec.offsets[dim], p.shape[dim])
        if not rec.counts:
            assert not p.grad.any(), f"{tag}: {name} is a copy that must not contribute"
            continue
        torch.testing.assert_close(p.grad, want_g, rtol=1e-4, atol=1e-6, msg=f"{tag}: rank {rank}: {name}")
        checked += 1
    assert checked > 0
    return local, out.detach()


def check_bound(local, tag):
    """A rank graph from moefx.distribute runs torch's functional collectives, not moefx's logical ops:
    every all-to-all is read by exactly one wait node of its own (torch's all_to_all_single +
    wait_tensor, or the issue / wait pair of an overlapped one), with the residual MLP and the
    coefficient between an issue and its wait where overlap_a2a moved them."""
    from moefx import meta as M
    from moefx.nn import bound_collectives as B
    from moefx.nn.collectives import OPS

    f = torch.ops._c10d_functional
    waits = {f.all_to_all_single.default: f.wait_tensor.default, B.all_to_all_start: B.all_to_all_wait}
    nodes = list(local.graph.nodes)
    assert not [n.name for n in nodes if n.target in OPS], f"{tag}: unbound moefx collectives"
    between = []
    for n in nodes:
        if n.target in waits:
            (w,) = n.users
            assert w.target is waits[n.target], f"{tag}: {n.name} is read by {w.name}, not by its wait"
            between += [m.meta.get(M.ROLE) for m in nodes[nodes.index(n) + 1:nodes.index(w)]]
    if facts(local).overlapped_layers:
        assert "residual" in between and "coef" in between, f"{tag}: {between}"
    else:
        assert not between, f"{tag}: {between}"


def _run_cases(rank, world, model_name, cases):
    import moefx
    from moefx.models import load_model

    model, inputs = load_model(model_name)
    captured = moefx.capture(model, inputs)
    outs = {}
    for tag, plan_dict in cases.items():
        expect = plan_dict.pop("_expect_counts", None)
        local, out = check_against_reference(rank, captured, plan_dict, model_name, tag)
        check_bound(local, tag)
        outs[tag] = out
        if expect is not None:
            counts = collective_counts(local)
            assert counts == expect, f"{tag}: collectives {counts} != {expect}"
    for a, b in [(t, t.replace("hier", "flat")) for t in cases if "hier" in t and t.replace("hier", "flat") in cases]:
        assert torch.equal(outs[a], outs[b]), f"{a} and {b} differ on rank {rank}"
    for a, b in [(t, t + "-serial") for t in cases if t + "-serial" in cases]:   # overlap_a2a changes no number
        assert torch.equal(outs[a], outs[b]), f"{a} and {b} differ on rank {rank}"
    for a, b in [(t, t.replace("coord", "uncoord")) for t in cases
                 if "-coord" in t and t.replace("coord", "uncoord") in cases]:
        torch.testing.assert_close(outs[a], outs[b], rtol=0, atol=1e-6, msg=f"{a} vs {b} on rank {rank}")


def test_world2_ep_only():
    cases = {
        "ep2-top1-residual-dropless": _case({}, {"nodes": 1, "devices_per_node": 2, "ep": 2}),
        "ep2-top1-residual-dropless-serial": {**_case({}, {"nodes": 1, "devices_per_node": 2, "ep": 2}),
                                              "disable": ["overlap_a2a"]},
        "ep2-top2-capacity": _case({"top_k": 2, "residual": False, "drop_tokens": True, "capacity_factor": 1.0},
                                   {"nodes": 1, "devices_per_node": 2, "ep": 2}),
        "ep1-dp2": _case({"top_k": 2}, {"nodes": 1, "devices_per_node": 2, "ep": 1}),
    }
    run_world(_run_cases, 2, "gpt2-tiny", cases, timeout=240)


def test_world2_tensor_parallel_attention_and_mlps():
    # GPT-2: fused qkv projection split chunk by chunk, experts over ep 2 with the TP ranks each
    # dispatching half of the tokens (coordinated) or all of them; T5: per-head position-bias mask
    cases = {
        "tp2-gpt2-coord": _case({"top_k": 2}, {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2}),
        "tp2-gpt2-uncoord": _case({"top_k": 2}, {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2,
                                                 "coordinated_a2a": False}),
        "tp2-gpt2-capacity-coord": _case({"top_k": 2, "drop_tokens": True, "capacity_factor": 1.5},
                                         {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2}),
        "tp2-gpt2-capacity-uncoord": _case({"top_k": 2, "drop_tokens": True, "capacity_factor": 1.5},
                                           {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2,
                                            "coordinated_a2a": False}),
    }
    run_world(_run_cases, 2, "gpt2-tiny", cases, timeout=240)
    cases = {"tp2-t5": _case({}, {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 1})}
    run_world(_run_cases, 2, "t5-tiny", cases, timeout=240)


def test_world4_ep_tp_dp_pyramid():
    cases = {
        # EP + TP + DP: dense / residual MLPs split over tp = 2 (2 replicas), experts over ep = 4
        "ep-tp": _case({"top_k": 2}, {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": 4}),
        # EP + DP with a pyramid: layer 0 (4 experts) ep 2 x edp 2, layer 1 (8 experts) ep 4 x edp 1
        "ep-dp-pyramid": _case({"residual": False, "drop_tokens": True, "capacity_factor": 1.5},
                               {"nodes": 1, "devices_per_node": 4, "ep": [2, 4]}),
        # 2 x 2 mesh: hierarchical and flat give the same numbers
        "hier-2x2": _case({}, {"nodes": 2, "devices_per_node": 2, "ep": 4, "hierarchical_a2a": True}),
        "flat-2x2": _case({}, {"nodes": 2, "devices_per_node": 2, "ep": 4, "hierarchical_a2a": False}),
    }
    run_world(_run_cases, 4, "llama-tiny", cases, timeout=400)


def test_world8_2x4_hierarchical_and_expert_slicing():
    cases = {
        "hier-ep8": _case({"experts": [8, 8]}, {"nodes": 2, "devices_per_node": 4, "ep": 8,
                                                "hierarchical_a2a": True}),
        "flat-ep8": _case({"experts": [8, 8]}, {"nodes": 2, "devices_per_node": 4, "ep": 8,
                                                "hierarchical_a2a": False}),
        "hier-ep8-capacity": _case({"experts": [8, 8], "drop_tokens": True, "capacity_factor": 2.0},
                                   {"nodes": 2, "devices_per_node": 4, "ep": 8, "hierarchical_a2a": True}),
        "flat-ep8-capacity": _case({"experts": [8, 8], "drop_tokens": True, "capacity_factor": 2.0},
                                   {"nodes": 2, "devices_per_node": 4, "ep": 8, "hierarchical_a2a": False}),
        # 4 experts on 8 ranks: each expert sliced over 2 ranks (tensor parallel inside experts)
        "slicing": _case({"experts": [4, 8], "top_k": 2}, {"nodes": 2, "devices_per_node": 4, "ep": 8}),
        "slicing-capacity": _case({"experts": [4, 8], "top_k": 2, "drop_tokens": True, "capacity_factor": 2.0},
                                  {"nodes": 2, "devices_per_node": 4, "ep": 8}),
    }
    run_world(_run_cases, 8, "gpt2-tiny", cases, timeout=600)


class _TokenStack(torch.nn.Module):
    """Pre-norm residual MLP blocks on [B, T, d] inputs (no attention): a batch may be empty."""

    def __init__(self, d=8, f=16, blocks=2):
        super().__init__()
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(blocks))
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, f) for _ in range(blocks))
        self.down = torch.nn.ModuleList(torch.nn.Linear(f, d) for _ in range(blocks))

    def forward(self, x):
        for ln, up, down in zip(self.ln, self.up, self.down):
            x = x + down(torch.nn.functional.gelu(up(ln(x))))
        return x


def _empty_rank_trains(rank, world, plan_dict):
    import moefx
    from moefx.facts import placements

    torch.manual_seed(0)
    model = _TokenStack()
    example = torch.randn(2, 4, 8)
    plan = moefx.Plan.from_dict(plan_dict)
    ref = moefx.convert(model, plan, (example,))
    local = moefx.distribute(ref, plan)
    batches = [torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(7)), torch.randn(0, 4, 8)]
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = local(batches[rank])
        assert out.shape == batches[rank].shape
        (out.pow(2).sum() + moefx.aux_loss(local)).backward()      # rank 1: no tokens, still every collective
        moefx.reduce_gradients(local)
        opt.step()
        ref_opt.zero_grad()
        total = 0.0
        for b in batches:
            total = total + ref(b).pow(2).sum() + moefx.aux_loss(ref)
        (total / 2).backward()
        ref_opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in local.named_parameters():
        rec = placements(local)[name]
        want = ref_params[rec.global_name].detach()
        for dim in rec.shard_dims:
            want = want.narrow(dim, rec.offsets[dim], p.shape[dim])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("moe", [{"top_k": 2}, {"top_k": 1, "residual": True}])
def test_world2_a_rank_with_no_tokens_trains(moe):
    # dropless layers exchange the routed rows, so token counts may differ between ranks, down to none;
    # (capacity layers exchange static [E, C, d] buffers: every rank of an EP group has the same tokens)
    plan = {"moe": {"experts": 4, "every": 1, "init_noise": 0.3, "drop_tokens": False, **moe},
            "parallel": {"nodes": 1, "devices_per_node": 2, "ep": 2}}
    run_world(_empty_rank_trains, 2, plan, timeout=120)
