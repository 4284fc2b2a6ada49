"""Models to convert: the built-in zoo and `package.module:function` plugins.

``load_model(name)`` returns ``(model, example_inputs)``: the model in eval mode and a tuple of
positional inputs for ``model(*example_inputs)``. ``name`` is a builtin (see
``BUILTIN_MODELS``) or ``"package.module:function"``, a function taking no arguments that
returns ``(model, example_inputs)``. Nothing is ever downloaded.

    nanogpt  a self-contained nanoGPT-style causal LM (`NanoGPT`, `NanoGPTConfig`)
    zoo      the builtins: HF configs (GPT-2, LLaMA, Mistral, Qwen2, BERT, ViT, T5), nn.TransformerEncoder
    plugin   the `package.module:function` loader
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .nanogpt import NanoGPT, NanoGPTConfig
from .plugin import ModelError, load_function, unknown
from .zoo import REGISTRY

__all__ = ["BUILTIN_MODELS", "ModelError", "NanoGPT", "NanoGPTConfig", "load_model", "num_blocks"]

#: builtin name -> one-line description
BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in REGISTRY.items()}


def num_blocks(name: str) -> int:
    """Number of Transformer blocks of a builtin (T5: encoder + decoder blocks)."""
    if name not in REGISTRY:
        raise unknown(name, "not a builtin model")
    return REGISTRY[name].blocks


def load_model(
    name: str, *, device: str | torch.device = "cpu", seed: int = 0, batch: int = 2,
    seq: int = 8,
) -> tuple[nn.Module, tuple]:
    """Build a model and example inputs: ``(model.eval(), positional_inputs)``.

    ``name`` is a key of ``BUILTIN_MODELS`` or ``"package.module:function"``. Weights are drawn
    after ``torch.manual_seed(seed)``; example inputs come from a generator seeded with ``seed``.
    With ``device="meta"`` the model is built under ``torch.device("meta")`` (no memory) and the
    inputs are meta tensors. ``batch``/``seq`` size the builtin inputs (ViT ignores ``seq``);
    a ``package.module:function`` model is built under the device context, moved to ``device``,
    and its inputs are used as returned.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    if name not in REGISTRY:
        if ":" in name:
            model, inputs = load_function(name, device)
            model.moefx_name = name
            return model, inputs
        raise unknown(name, "not a builtin model")
    spec = REGISTRY[name]
    with device:
        model = spec.build()
    model.moefx_name = name                 # what `moefx.save` records to rebuild the graph
    if device.type == "meta":                # shapes only: a huge --batch costs no memory
        with device:
            inputs = spec.inputs(batch, seq, torch.Generator().manual_seed(seed))
    else:
        inputs = spec.inputs(batch, seq, torch.Generator().manual_seed(seed))
    return model.eval(), tuple(x.to(device) for x in inputs)

