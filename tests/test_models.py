"""Built-in model zoo: every builtin exports with dynamic shapes and matches eager."""

import sys

import pytest
import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from moefx.models import (
    BUILTIN_MODELS,
    ModelError,
    NanoGPT,
    NanoGPTConfig,
    load_model,
    num_blocks,
)


TINY = [n for n in BUILTIN_MODELS if n != "gpt2-medium-24"]

# (input index, dim) pairs that torch.export specialises; every other input dim stays dynamic.
STATIC_DIMS = {"vit-tiny": {(0, 1), (0, 2), (0, 3)}}  # channels, height, width


def main_tensor(out):
    """The main output tensor: logits / last_hidden_state / a plain tensor / out[0]."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return out[0]


def auto_dynamic_shapes(inputs):
    return tuple({d: Dim.AUTO for d in range(x.dim())} for x in inputs)


@pytest.mark.parametrize("name", TINY)
def test_builtin_exports_dynamic_and_matches_eager(name):
    model, inputs = load_model(name)
    assert not model.training
    ep = torch.export.export(model, inputs, dynamic_shapes=auto_dynamic_shapes(inputs),
                             strict=False)
    user_inputs = set(ep.graph_signature.user_inputs)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    static = {
        (i, d)
        for i, node in enumerate(placeholders)
        for d, size in enumerate(node.meta["val"].shape)
        if is_concrete_int(size)
    }
    assert static == STATIC_DIMS.get(name, set())

    gm = ep.module()
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(gm(*inputs)), main_tensor(model(*inputs)),
                                   atol=1e-5, rtol=1e-5)
        _, inputs2 = load_model(name, seed=1, batch=3, seq=5)
        out2 = main_tensor(gm(*inputs2))
        torch.testing.assert_close(out2, main_tensor(model(*inputs2)), atol=1e-5, rtol=1e-5)
    assert out2.shape[0] == 3


@pytest.mark.parametrize("name", TINY)
def test_builtin_builds_on_meta(name):
    model, inputs = load_model(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(x.device.type == "meta" for x in inputs)
    assert num_blocks(name) == 4


def test_gpt2_medium_on_meta_is_355m():
    model, (ids,) = load_model("gpt2-medium-24", device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == 354_823_168
    assert ids.device.type == "meta" and ids.shape == (2, 8)
    assert num_blocks("gpt2-medium-24") == 24


def test_seed_controls_weights_and_inputs():
    m0, x0 = load_model("nanogpt-tiny", seed=0)
    m0b, x0b = load_model("nanogpt-tiny", seed=0)
    m1, x1 = load_model("nanogpt-tiny", seed=1)
    w = lambda m: m.transformer.h[0].mlp.c_fc.weight  # noqa: E731
    assert torch.equal(w(m0), w(m0b)) and torch.equal(x0[0], x0b[0])
    assert not torch.equal(w(m0), w(m1))


def test_nanogpt_is_causal_tied_and_trains():
    torch.manual_seed(0)
    model = NanoGPT(NanoGPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 64, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (2, 9, 64) and loss.ndim == 0
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert model.generate(idx[:, :3], max_new_tokens=4, top_k=5).shape == (2, 7)
    with pytest.raises(Exception, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_load_model_from_function(tmp_path, monkeypatch):
    (tmp_path / "zoo_user_mod.py").write_text(
        "import torch\n"
        "def good():\n"
        "    return torch.nn.Linear(4, 2), (torch.randn(3, 4),)\n"
        "def bare_tensor():\n"
        "    return torch.nn.Linear(4, 2), torch.randn(3, 4)\n"
        "def wrong():\n"
        "    return torch.nn.Linear(4, 2)\n"
        "def not_module():\n"
        "    return 'model', (torch.randn(3, 4),)\n"
        "VALUE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "zoo_user_mod", raising=False)
    model, inputs = load_model("zoo_user_mod:good")
    assert isinstance(model, torch.nn.Linear) and not model.training
    assert model(*inputs).shape == (3, 2)
    model, inputs = load_model("zoo_user_mod:good", device="meta")
    assert model.weight.device.type == "meta" and inputs[0].device.type == "meta"
    assert load_model("zoo_user_mod:bare_tensor")[1][0].shape == (3, 4)
    with pytest.raises(ModelError, match=r"returned Linear, not \(model, example_inputs\)"):
        load_model("zoo_user_mod:wrong")
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        load_model("zoo_user_mod:not_module")
    with pytest.raises(ModelError, match="no function 'VALUE'"):
        load_model("zoo_user_mod:VALUE")
    with pytest.raises(ModelError, match="cannot import module 'no_such_mod_xyz'"):
        load_model("no_such_mod_xyz:f")


def test_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match="not a builtin model") as info:
        load_model("gpt5-huge")
    for name in BUILTIN_MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="gpt2-tiny"):
        num_blocks("nope")
