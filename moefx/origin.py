"""Where a converted graph came from, recorded so it can be rebuilt later (`moefx.save` / `moefx.load`).

`convert` stores in `facts(gm).origin`:

    model    {"name": "llama-tiny"} (a built-in or package.module:function, tagged by load_model)
             or {"transformers_class": "LlamaForCausalLM", "config": {...}} (a Hugging Face model)
             or None (another module: it cannot be rebuilt without its code)
    plan     the plan as a dict
    inputs   [[shape, dtype], ...] of the positional example inputs (None when not all are tensors)
    capture  the capture options that can be replayed (dynamic_shapes "auto" / None, train)
    dtype    the dtype of the model's floating parameters

`rebuild_model(origin, device)` builds the dense model again (on meta: no memory).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import MoefxError
from .facts import record_facts
from .models import load_model

__all__ = ["model_origin", "record", "rebuild_model", "example_inputs"]


def model_origin(model: nn.Module) -> dict | None:
    """How to build `model` again: its built-in name, or its transformers class and config; None if unknown."""
    name = getattr(model, "moefx_name", None)
    if isinstance(name, str):
        return {"name": name}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        return {"transformers_class": type(model).__name__, "config": config.to_dict()}
    return None


def _dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def record(gm, model: nn.Module, plan, example_inputs: tuple = (), capture_options: dict | None = None,
           **extra) -> None:
    """Record the origin of `gm` (see the module docstring) in its facts; extra keys are added as they are."""
    options = dict(capture_options or {})
    dynamic = options.get("dynamic_shapes", "auto")
    tensors = all(isinstance(x, torch.Tensor) for x in example_inputs)
    record_facts(gm, origin={
        "model": model_origin(model),
        "plan": plan.to_dict(),
        "inputs": [[list(x.shape), str(x.dtype).removeprefix("torch.")] for x in example_inputs] if tensors else None,
        "capture": {"dynamic_shapes": dynamic if dynamic in ("auto", None) else "unsupported",
                    "train": bool(options.get("train", False))},
        "dtype": _dtype(model),
        **extra,
    })


def rebuild_model(origin: dict, device="meta") -> nn.Module:
    """The dense model `origin["model"]` describes, built on `device` in eval mode, in the recorded dtype."""
    what = origin.get("model")
    if what is None:
        raise MoefxError("this graph was converted from a model moefx cannot rebuild (not a built-in, a "
                         "package.module:function, nor a transformers model): load it with its own code and "
                         "moefx.convert, then load the weights")
    if "name" in what:
        model, _ = load_model(what["name"], device=device)
    else:
        import transformers

        cls = getattr(transformers, what["transformers_class"], None)
        if cls is None:
            raise MoefxError(f"transformers {transformers.__version__} has no class {what['transformers_class']}")
        config = cls.config_class.from_dict(what["config"])
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = cls(config)
    return model.to(getattr(torch, origin.get("dtype", "float32"))).eval()


def example_inputs(origin: dict, device="meta") -> tuple:
    """Example inputs of the recorded shapes and dtypes (zeros) on `device`."""
    if origin.get("inputs") is None:
        raise MoefxError("the graph was converted with inputs that are not all tensors: moefx cannot replay its "
                         "capture")
    return tuple(torch.zeros(shape, dtype=getattr(torch, dtype), device=device) for shape, dtype in origin["inputs"])
