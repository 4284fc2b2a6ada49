"""find_blocks: blocks, stacks, pre/post-LN outputs and MoE layers from the dataflow."""
import functools
import warnings

import pytest
import torch
from torch import nn

import moefx
from moefx import meta as M
from moefx.analysis.blocks import find_blocks, is_norm_of, stacks, strip
from moefx.errors import AnalysisError
from moefx.models import load_model, num_blocks

# name -> (post-LN, residual adds per block by stack, module path of block 0)
ARCHS = {
    "gpt2-tiny": (False, [[2] * 4], "transformer.h.0"),
    "llama-tiny": (False, [[2] * 4], "model.layers.0"),
    "bert-tiny": (True, [[2] * 4], "bert.encoder.layer.0"),
    "t5-tiny": (False, [[2, 2], [3, 3]], "encoder.block.0"),
    "encoder-tiny": (True, [[2] * 4], "encoder.layers.0"),
}
PLANS = {"residual": {"moe": {"experts": [4, 8], "every": 2, "residual": True, "drop_tokens": False}},
         "top1": {"moe": {"experts": 4, "every": 2, "residual": False, "drop_tokens": False}},
         "all-moe": {"moe": {"experts": 2, "every": 1, "top_k": 2, "residual": False, "drop_tokens": False}}}


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    """Static shapes (faster to export); the shrink tests run the analysis on dynamic graphs."""
    model, inputs = load_model(name)
    return moefx.capture(model, inputs, dynamic_shapes=None)


@functools.lru_cache(maxsize=None)
def _converted(name: str, plan: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moefx.convert(_captured(name), PLANS[plan])


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_dense_blocks_chain_along_the_stream(name):
    post_norm, adds, path0 = ARCHS[name]
    gm = _captured(name)
    blocks = find_blocks(gm)
    nodes = _nodes(gm)
    assert len(blocks) == num_blocks(name)
    assert [b.index for b in blocks] == [b.origin for b in blocks] == list(range(len(blocks)))
    grouped = stacks(blocks)
    assert [[len(b.residual_adds) for b in s] for s in grouped] == adds
    for s, group in enumerate(grouped):
        assert [b.position for b in group] == list(range(len(group))) and {b.stack for b in group} == {s}
        for prev, nxt in zip(group, group[1:]):  # a stack is a chain: block k+1 reads block k's output
            assert nxt.input == prev.output
    assert blocks[0].module_path == path0
    assert [b.module_path.rsplit(".", 1)[1] for b in grouped[0]] == [str(i) for i in range(len(grouped[0]))]

    ffns = moefx.find_ffns(gm)
    for b, f in zip(blocks, ffns):
        assert b.ffn == f and b.ffn_output == f.output and not b.is_moe and b.num_experts is None
        assert b.post_norm is post_norm
        out = nodes[b.output]
        if post_norm:  # the stream leaves through the LayerNorm after the FFN's residual add
            assert out.target is torch.ops.aten.layer_norm.default and strip(out.args[0]).name == b.residual_adds[-1]
            assert is_norm_of(out, nodes[b.residual_adds[-1]])
        else:
            assert b.output == b.residual_adds[-1]
        region = set(b.nodes)
        assert b.output in region and b.input not in region and set(f.nodes) <= region
        assert set(b.residual_adds) <= region
    for a, c in zip(blocks, blocks[1:]):  # blocks do not share nodes
        assert not set(a.nodes) & set(c.nodes)


def test_t5_encoder_and_decoder_are_separate_stacks():
    gm = _captured("t5-tiny")
    enc, dec = stacks(find_blocks(gm))
    nodes = _nodes(gm)
    assert [b.index for b in enc] == [0, 1] and [b.index for b in dec] == [2, 3]
    assert nodes[enc[0].input].target is torch.ops.aten.embedding.default
    assert nodes[dec[0].input].target is torch.ops.aten.embedding.default and dec[0].input != enc[0].input
    assert all(b.module_path.startswith("decoder.block.") for b in dec)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_converted_blocks_carry_their_moe_layer(name, plan):
    dense = find_blocks(_captured(name))
    gm = _converted(name, plan)
    blocks = find_blocks(gm)
    nodes = _nodes(gm)
    moe = moefx.Plan.from_dict(PLANS[plan]).moe
    experts = moe.layer_experts(len(dense))
    assert len(blocks) == len(dense)
    for b, d in zip(blocks, dense):
        assert (b.input, b.output, b.residual_adds, b.post_norm) == (d.input, d.output, d.residual_adds, d.post_norm)
        assert b.num_experts == experts.get(b.index)
        if b.index not in experts:
            assert b.moe_layer is None and b.ffn == d.ffn
            continue
        assert b.moe_layer == list(experts).index(b.index) and gm.get_submodule(f"moe{b.moe_layer}").block == b.index
        assert (b.ffn is not None) == moe.residual  # the residual MLP of a PR-MoE layer stays
        tagged = {n.meta[M.BLOCK] for name_ in b.nodes if M.LAYER in (n := nodes[name_]).meta}
        assert tagged == {b.index}
        assert nodes[b.ffn_output].meta[M.LAYER] == b.moe_layer


def test_post_norm_with_a_decomposed_rms_norm():
    """A post-LN block whose norm is written out (x * rsqrt(mean(x^2) + eps) * w): the output is the
    last node of the norm, found forward from the add for the last block."""

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
            self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
            return self.norm2(x + self.down(torch.relu(self.up(x))))

    model = nn.Sequential(nn.Embedding(50, 16), Block(16), Block(16), Block(16), nn.Linear(16, 50)).eval()
    gm = moefx.capture(model, (torch.randint(0, 50, (2, 5)),))
    blocks = find_blocks(gm)
    nodes = _nodes(gm)
    assert len(blocks) == 3 and all(b.post_norm for b in blocks)
    assert [b.module_path for b in blocks] == ["1", "2", "3"]
    for b in blocks:
        out = nodes[b.output]
        assert out.target is torch.ops.aten.mul.Tensor and is_norm_of(out, nodes[b.residual_adds[-1]])
        assert list(out.meta["nn_module_stack"].values())[-1][0] == f"{b.index + 1}.norm2"
    assert [u.target for u in nodes[blocks[-1].output].users] == [torch.ops.aten.linear.default]


def test_graphs_without_a_residual_stream_have_no_blocks():
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    assert find_blocks(moefx.capture(mlp, (torch.randn(3, 8),))) == []


def test_gelu_tanh_is_not_a_residual_add():
    """GPT-2's GELU computes x + 0.044715 * x^3: an ancestor relation without a weight on the path."""
    gm = _captured("gpt2-tiny")
    adds = {a for b in find_blocks(gm) for a in b.residual_adds}
    f = moefx.find_ffns(gm)[0]
    assert not adds & set(f.middle)


def test_a_graph_without_shape_metadata_is_refused():
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(AnalysisError, match="shape metadata"):
        find_blocks(traced)
