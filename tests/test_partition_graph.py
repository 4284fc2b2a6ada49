"""Partitioned graphs without processes: collectives counted per group, shards, dumps."""
import math

import pytest
import torch

import moefx
from moefx.facts import facts, collective_counts
from moefx.placement import Shard

from moefx import meta as M
from moefx.errors import PlanError
from moefx.models import load_model


@pytest.fixture(scope="module")
def converted():
    model, inputs = load_model("gpt2-tiny")
    plan = {"moe": {"experts": [4, 8], "every": 2, "residual": True, "drop_tokens": False}}
    return moefx.convert(model, plan, inputs)


def _plan(**parallel):
    return moefx.Plan.from_dict({"moe": {"experts": [4, 8], "every": 2, "residual": True, "drop_tokens": False},
                                 "parallel": parallel})


def _collectives(gm):
    """Collective nodes per group, counted from the graph (the targets are moefx's collective ops)."""
    from moefx.nn.collectives import OPS

    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in OPS:
            assert n.meta.get(M.ROLE) == "collective"
            out[n.meta[M.GROUP]] = out.get(n.meta[M.GROUP], 0) + 1
    return out


def test_flat_ep_counts(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=4, ep=4), rank=2)
    # per MoE layer: count all-gather + dispatch all-to-all + combine all-to-all on the ep4 group
    assert _collectives(gm) == {"ep4": 6}
    assert not any(isinstance(v, torch.distributed.ProcessGroup) for m in gm.modules() for v in vars(m).values())
    assert collective_counts(gm) == {"ep4": 6}
    assert [m.experts.num_experts for m in (gm.moe0, gm.moe1)] == [1, 2]
    assert gm.moe1.experts.first_expert == 4
    gm.graph.lint()


def test_hierarchical_counts(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=2, devices_per_node=2, ep=4, hierarchical_a2a=True), rank=3)
    # per layer: the ep4 count all-gather (it gives every split); 2 a2a inside nodes, 2 across
    assert _collectives(gm) == {"ep4": 2, "intra_node": 4, "ep4_inter": 4}
    assert facts(gm).hierarchical_layers == (0, 1)
    flat = moefx.partitioned_view(converted, _plan(nodes=2, devices_per_node=2, ep=4, hierarchical_a2a=False),
                                  rank=3)
    assert _collectives(flat) == {"ep4": 6}


def test_tensor_parallel_counts_and_shards(converted):
    from moefx.facts import placements

    gm = moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=4, tp=2, ep=2), rank=1)
    # 4 dense FFNs (2 dense blocks + 2 residual MLPs) and 4 attentions: tp_copy + tp_reduce each (16);
    # coordinated dispatch: each MoE layer splits its rows over the TP pair and gathers them back (4)
    assert _collectives(gm) == {"ep2": 6, "tp": 20}
    assert facts(gm).tp_replicated == ()
    shards = {n: p for n, p in placements(gm).items() if p.sharded_over == ("tp",)}
    # FFN: up weight, up bias, down weight (its bias is added after the reduce); attention: the fused
    # c_attn weight and bias in 3 chunks (q, k, v heads of this rank) and the c_proj weight
    assert len(shards) == 4 * 3 + 4 * 7
    q = shards["tp_shard_transformer_h_0_attn_c_attn_weight_chunk1"]
    assert (q.global_name, q.shards, q.shard_dims, q.offsets, q.global_shape) == (
        "transformer.h.0.attn.c_attn.weight", (Shard("tp", 1),), (1,), (0, 48), (32, 96))
    fc = shards["tp_shard_transformer_h_0_mlp_c_fc_weight"]
    assert (fc.global_name, fc.offsets, fc.global_shape, fc.replicated_over, fc.copies) == (
        "transformer.h.0.mlp.c_fc.weight", (0, 64), (32, 128), "dp", 2)
    assert gm.get_parameter("tp_shard_transformer_h_0_mlp_c_fc_weight").shape == (32, 64)
    names = dict(gm.named_parameters())
    assert "transformer.h.0.mlp.c_fc.weight" not in names  # the full-size original is gone
    assert "transformer.h.0.attn.c_attn.weight" not in names
    sharded = sum(p.numel() for n, p in names.items() if n.startswith("tp_shard_"))
    full = {p.global_name: math.prod(p.global_shape) for p in shards.values()}
    assert sharded * 2 == sum(full.values())  # tp = 2: each rank holds half of every split tensor
    assert set(placements(gm)) == set(gm.state_dict())  # one record per tensor


def test_expert_slicing_shards_inner_dim(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=2, devices_per_node=4, ep=8), rank=5)
    # layer 0: 4 experts on 8 ranks -> rank 5 holds half of expert 2
    assert gm.moe0.experts.num_experts == 1 and gm.moe0.experts.first_expert == 2
    assert gm.moe0.experts.f == converted.moe0.experts.f // 2 and gm.moe0.experts.bias_scale == 0.0
    assert gm.moe1.experts.first_expert == 5 and gm.moe1.experts.f == converted.moe1.experts.f
    from moefx.facts import placements

    up = placements(gm)["moe0.experts.up_weight.0"]
    # one mesh dimension per split: the expert dim over the EP group, the inner dim over the 2 ranks
    # that share expert 2
    assert (up.offsets, up.shards, up.replicated_over) == ((2, 0, 64), (Shard("ep8", 0), Shard("slice2", 2)), "edp8")
    assert (up.shard_dims, up.sharded_over) == ((0, 2), ("ep8", "slice2"))
    bias = placements(gm)["moe0.experts.down_bias"]
    assert bias.shard_dims == (0,) and not bias.counts      # whole on every slice; slice 0's copy counts


def test_a_partitioned_view_cannot_run_without_groups(converted):
    from moefx.nn.collectives import GroupNotBound

    gm = moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=2, ep=2), rank=0)
    model, inputs = load_model("gpt2-tiny")
    with pytest.raises(GroupNotBound, match="no group of that name is bound"):
        gm(*inputs)


def test_bad_parallel_plans_fail_before_work(converted):
    with pytest.raises(PlanError, match="nodes \\* devices_per_node != world_size: 1 \\* 4 != 3"):
        moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=4), rank=0, world_size=3)
    with pytest.raises(PlanError, match="4 experts, not divisible by its ep = 3"):
        moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=6, ep=3), rank=0)
    with pytest.raises(PlanError, match="needs expert slicing, but this layer's FFN is not elementwise"):
        norm_ffn = _normformer_converted()
        moefx.partitioned_view(norm_ffn, moefx.Plan.from_dict({"moe": {"experts": 2, "every": 1},
                                                               "parallel": {"nodes": 1, "devices_per_node": 4,
                                                                            "ep": 4}}), rank=0)
    with pytest.raises(PlanError, match="outside the world"):
        moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=2), rank=5)


def test_partitioned_dump_shows_groups(converted, tmp_path):
    from moefx.cli import main

    plan = tmp_path / "p.toml"
    plan.write_text('[moe]\nexperts = [4, 8]\nevery = 2\nresidual = true\ndrop_tokens = false\n'
                    '[parallel]\nnodes = 2\ndevices_per_node = 2\nep = 4\nhierarchical_a2a = true\n')
    out = tmp_path / "g.dot"
    assert main(["dump", "gpt2-tiny", "--plan", str(plan), "--stage", "partitioned", "--rank", "1",
                 "--format", "dot", "-o", str(out)]) == 0
    text = out.read_text()
    assert "<intra_node>" in text and "<ep4_inter>" in text


class _NormFormerFFN(torch.nn.Module):
    """Blocks whose FFN has a LayerNorm over the inner width f (NormFormer) or a softmax over it."""

    def __init__(self, d=16, f=32, blocks=2, mid="norm"):
        super().__init__()
        self.emb = torch.nn.Embedding(32, d)
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(blocks))
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, f) for _ in range(blocks))
        self.mid = torch.nn.ModuleList(torch.nn.LayerNorm(f) for _ in range(blocks)) if mid == "norm" else None
        self.down = torch.nn.ModuleList(torch.nn.Linear(f, d) for _ in range(blocks))

    def forward(self, ids):
        h = self.emb(ids)
        for i in range(len(self.up)):
            u = torch.nn.functional.gelu(self.up[i](self.ln[i](h)))
            u = self.mid[i](u) if self.mid is not None else torch.softmax(u, dim=-1)
            h = h + self.down[i](u)
        return h


def _normformer_converted(mid="norm"):
    model = _NormFormerFFN(mid=mid)
    return moefx.convert(model, {"moe": {"experts": 2, "every": 1, "drop_tokens": False}},
                         (torch.randint(0, 32, (2, 5)),))


@pytest.mark.parametrize("mid", ["norm", "softmax"])
def test_tp_keeps_ffns_with_a_norm_or_softmax_over_f_whole(mid):
    gm = _normformer_converted(mid)
    ffns = moefx.find_ffns(gm)
    assert ffns == [] or not any(f.elementwise for f in ffns)
    dense = _NormFormerFFN(mid=mid)
    cap = moefx.capture(dense, (torch.randint(0, 32, (2, 5)),))
    assert [f.elementwise for f in moefx.find_ffns(cap)] == [False, False]
    plan = moefx.Plan.from_dict({"parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2}})
    with pytest.warns(UserWarning, match="keeps these layers replicated: FFN of block 0: its middle is not elementwise"):
        view = moefx.partitioned_view(cap, plan, rank=0)
    assert not any(n.startswith("tp_shard_") for n, _ in view.named_parameters())
