"""Capture: a model and example inputs -> an ATen-level torch.fx GraphModule.

The primary path is `torch.export.export(strict=False)` with every dimension of every tensor input
marked `Dim.AUTO` (export keeps it dynamic unless the model forces a value), unlifted with
`ep.module()` and re-wrapped as a plain `fx.GraphModule`, so the result runs for any batch size and
sequence length the model allows and supports `.train()` / `.eval()`. Every node carries
`meta["val"]` (a fake tensor), which the analysis reads.

Hugging Face models are captured with `use_cache=False` (set on their config for the duration).
The model is captured in eval mode: dropout is recorded as a no-op.
A GraphModule already produced by `capture` / `torch.export` is accepted as-is; any other
GraphModule (e.g. from `symbolic_trace`) is re-captured with `torch.export`, which needs
example inputs.
"""
from __future__ import annotations

import contextlib
import inspect
import traceback

import torch
from torch import fx, nn
from torch.export import Dim

from .errors import CaptureError

_CAPTURED = "_moefx_captured"


def capture(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
            *, dynamic: bool = True) -> fx.GraphModule:
    """Capture `model(*example_inputs, **example_kwargs)` into an ATen GraphModule.

    Takes a module (HF, torch, hand-written) or a GraphModule. Returns a GraphModule whose nodes
    carry shape metadata. Raises CaptureError naming the failing op/line and what to try.
    """
    if is_captured(model):
        return model
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        raise CaptureError(f"capturing {type(model).__name__} needs example inputs: pass example_inputs=(x,) "
                           "with tensors of the shapes the model takes")
    dynamic_shapes = _dynamic_shapes(model, example_inputs, example_kwargs) if dynamic else None
    was_training = model.training
    try:
        with _hf_no_cache(model):
            model.eval()
            ep = torch.export.export(model, example_inputs, example_kwargs or None,
                                     dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; turn them into one clear message
        raise CaptureError(_explain(model, e)) from e
    finally:
        model.train(was_training)
    gm = ep.module()
    out = fx.GraphModule(gm, gm.graph, class_name=type(model).__name__ + "Graph")
    setattr(out, _CAPTURED, True)
    return out


def is_captured(gm: nn.Module) -> bool:
    """True when `gm` is a GraphModule with ATen nodes and shape metadata (from capture/export)."""
    if not isinstance(gm, fx.GraphModule):
        return False
    if getattr(gm, _CAPTURED, False):
        return True
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return bool(calls) and all("val" in n.meta for n in calls) and \
        any(isinstance(n.target, torch._ops.OpOverload) for n in calls)


def mark_captured(gm: fx.GraphModule) -> fx.GraphModule:
    """Flag a GraphModule built by a pass from a captured one as captured (metadata is kept)."""
    setattr(gm, _CAPTURED, True)
    return gm


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """Dim.AUTO on every dim of every tensor input, keyed by forward()'s parameter names."""
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())} if x.dim() > 0 else None
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(v) for name, v in bound.arguments.items()}


@contextlib.contextmanager
def _hf_no_cache(model: nn.Module):
    """Set use_cache=False on a Hugging Face config while capturing (the KV cache is not traceable)."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None and old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and old is not None:
            config.use_cache = old


def _explain(model: nn.Module, e: Exception) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "moefx/capture.py" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"could not capture {type(model).__name__} with torch.export(strict=False){where}: "
            f"{type(e).__name__}: {first}\n"
            "Try: check the example inputs match forward()'s signature; for Hugging Face models pass "
            "use_cache=False and plain tensors; replace data-dependent Python control flow on tensor "
            "values with torch.cond / torch.where; or capture the model yourself with torch.export and "
            "pass the resulting GraphModule (ep.module()).")
