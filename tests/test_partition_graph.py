"""Partitioned graphs without processes: collectives counted per group, shards, dumps."""
import math

import pytest

import moefx
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
    out = {}
    for n in gm.graph.nodes:
        if n.meta.get(M.ROLE) == "collective" and n.op == "call_module":
            out[n.meta[M.GROUP]] = out.get(n.meta[M.GROUP], 0) + 1
    return out


def test_flat_ep_counts(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=4, ep=4), rank=2)
    # per MoE layer: count exchange + dispatch all-to-all + combine all-to-all on the ep4 group
    assert _collectives(gm) == {"ep4": 6}
    assert gm.meta["moefx_collectives"] == {"ep4": 6}
    assert [m.experts.num_experts for m in (gm.moe0, gm.moe1)] == [1, 2]
    assert gm.moe1.experts.first_expert == 4
    gm.graph.lint()


def test_hierarchical_counts(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=2, devices_per_node=2, ep=4, hierarchical_a2a=True), rank=3)
    # per layer: ep4 count exchange; intra-node: split exchange + 2 a2a; inter-node: 2 a2a
    assert _collectives(gm) == {"ep4": 2, "intra_node": 6, "ep4_inter": 4}
    assert gm.meta["moefx_hierarchical_layers"] == [0, 1]
    flat = moefx.partitioned_view(converted, _plan(nodes=2, devices_per_node=2, ep=4, hierarchical_a2a=False),
                                  rank=3)
    assert _collectives(flat) == {"ep4": 6}


def test_tensor_parallel_counts_and_shards(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=4, tp=2, ep=2), rank=1)
    # 4 dense FFNs (2 dense blocks + 2 residual MLPs) and 4 attentions: tp_copy + tp_reduce each
    assert _collectives(gm) == {"ep2": 6, "tp": 16}
    assert gm.meta["moefx_tp_replicated_attention"] == []
    shards = gm.meta["moefx_shards"]
    # FFN: up weight, up bias, down weight (its bias is added after the reduce); attention: the fused
    # c_attn weight and bias in 3 chunks (q, k, v heads of this rank) and the c_proj weight
    assert len(shards) == 4 * 3 + 4 * 7
    assert shards["tp_shard_transformer_h_0_attn_c_attn_weight_chunk1"][:4] == (
        "transformer.h.0.attn.c_attn.weight", 1, 48, 64)
    assert shards["tp_shard_transformer_h_0_mlp_c_fc_weight"] == ("transformer.h.0.mlp.c_fc.weight", 1, 64, 128,
                                                                  (32, 128))
    assert gm.get_parameter("tp_shard_transformer_h_0_mlp_c_fc_weight").shape == (32, 64)
    names = dict(gm.named_parameters())
    assert "transformer.h.0.mlp.c_fc.weight" not in names  # the full-size original is gone
    assert "transformer.h.0.attn.c_attn.weight" not in names
    sharded = sum(p.numel() for n, p in names.items() if n.startswith("tp_shard_"))
    full = {target: math.prod(shape) for target, _, _, _, shape in shards.values()}
    assert sharded * 2 == sum(full.values())  # tp = 2: each rank holds half of every split tensor


def test_expert_slicing_shards_inner_dim(converted):
    gm = moefx.partitioned_view(converted, _plan(nodes=2, devices_per_node=4, ep=8), rank=5)
    # layer 0: 4 experts on 8 ranks -> rank 5 holds half of expert 2
    assert gm.moe0.experts.num_experts == 1 and gm.moe0.experts.first_expert == 2
    assert gm.moe0.experts.f == converted.moe0.experts.f // 2 and gm.moe0.experts.bias_scale == 0.0
    assert gm.moe1.experts.first_expert == 5 and gm.moe1.experts.f == converted.moe1.experts.f


def test_bad_parallel_plans_fail_before_work(converted):
    with pytest.raises(PlanError, match="nodes \\* devices_per_node != world_size: 1 \\* 4 != 3"):
        moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=4), rank=0, world_size=3)
    with pytest.raises(PlanError, match="4 experts, not divisible by its ep = 3"):
        moefx.partitioned_view(converted, _plan(nodes=1, devices_per_node=6, ep=3), rank=0)
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
