"""The generic expert path: FFNs with inner matrices, and any FFN forced through it."""
import torch
from torch import nn

import moefx
from moefx.models import load_model
from moefx.nn.experts import GenericExperts, StackedExperts
from moefx.nn.moe import MoELayer

from conftest import first_tensor


class DeepMLPModel(nn.Module):
    """Blocks whose FFN has three matrices (d -> f -> f -> d) and a LayerNorm inside."""

    def __init__(self, d=16, f=48, blocks=2, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, f), nn.LayerNorm(f),
                                                nn.ReLU(), nn.Linear(f, d)) for _ in range(blocks))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + h.cumsum(1) / 8
            h = h + mlp(norm(h))
        return self.head(h)


def test_ffn_with_inner_matrices_is_found_and_converted():
    torch.manual_seed(0)
    model = DeepMLPModel().eval()
    ids = torch.randint(0, 32, (2, 6))
    ffns = moefx.find_ffns(moefx.capture(model, (ids,)))
    assert len(ffns) == 2 and all(len(f.inner) == 1 and not f.stackable for f in ffns)
    gm = moefx.convert(model, {"moe": {"experts": 4, "every": 1, "top_k": 2, "residual": True,
                                       "drop_tokens": False}}, (ids,))
    layers = [m for m in gm.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 2 and all(isinstance(m.experts, GenericExperts) for m in layers)
    assert layers[0].experts.expert_params["mlps_0_2_weight"].shape == (4, 48, 48)
    other = torch.randint(0, 32, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(gm(other), model(other), rtol=0, atol=1e-5)
    gm(other).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[0].experts.parameters())
    # partition slices generic experts by index too
    part = layers[1].experts.select(2, 4)
    assert part.num_experts == 2 and part.first_expert == 2


def test_generic_path_equals_stacked_path():
    model, inputs = load_model("llama-tiny")
    plan = {"experts": 4, "every": 2, "top_k": 2, "drop_tokens": False}
    stacked = moefx.convert(model, {"moe": plan}, inputs)
    generic = moefx.convert(model, {"moe": {**plan, "generic_experts": True}}, inputs)
    for layer in (0, 1):
        s, g = stacked.get_submodule(f"moe{layer}.experts"), generic.get_submodule(f"moe{layer}.experts")
        assert isinstance(s, StackedExperts) and isinstance(g, GenericExperts)
        block = stacked.get_submodule(f"moe{layer}").block
        prefix = f"model_layers_{block}_mlp_"
        with torch.no_grad():  # make the experts differ, identically in both layouts
            for w in (*s.up_weight, s.down_weight):
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())) * 0.05)
            g.expert_params[prefix + "gate_proj_weight"].copy_(s.up_weight[0].transpose(1, 2))
            g.expert_params[prefix + "up_proj_weight"].copy_(s.up_weight[1].transpose(1, 2))
            g.expert_params[prefix + "down_proj_weight"].copy_(s.down_weight.transpose(1, 2))
    with torch.no_grad():
        out_s, out_g = first_tensor(stacked(*inputs)), first_tensor(generic(*inputs))
    assert (out_s - first_tensor(model(*inputs))).abs().max() > 1e-4  # the perturbation matters
    torch.testing.assert_close(out_g, out_s, rtol=1e-5, atol=1e-6)


def test_generic_gather_paths_agree_with_a_per_token_reference():
    torch.manual_seed(3)
    model = DeepMLPModel().eval()
    ids = torch.randint(0, 32, (2, 6))
    gm = moefx.convert(model, {"moe": {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False,
                                       "init": "random"}}, (ids,))
    ex = gm.moe0.experts
    assert isinstance(ex, GenericExperts)
    tokens = torch.randn(5, 16)
    expert = torch.tensor([[2, 0], [1, 3], [2, 1], [0, 2], [3, 0]])   # unsorted, repeated experts
    names = list(ex.expert_params)
    want = torch.stack([torch.stack([
        torch.func.functional_call(ex.template, {n: ex.expert_params[n][e] for n in names}, (tokens[s:s + 1],))[0]
        for e in expert[s].tolist()]) for s in range(5)])
    assert (want[:, 0] - want[:, 1]).abs().max() > 1e-3                  # the experts differ
    with torch.no_grad():
        loop = ex(tokens, expert)                                        # plain eager CPU: host-planned loop
        one = ex(tokens[:3], torch.full((3, 1), 1))                      # one expert for every row
    copies = ex(tokens.requires_grad_(), expert)                         # autograd: the index_select copies
    torch.testing.assert_close(loop, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(copies.detach(), want, rtol=1e-5, atol=1e-6)
    ref_one = torch.func.functional_call(ex.template, {n: ex.expert_params[n][1] for n in names}, (tokens[:3],))
    torch.testing.assert_close(one[:, 0], ref_one.detach(), rtol=1e-5, atol=1e-6)
