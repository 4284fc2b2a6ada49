"""Capture: a model and example inputs -> an ATen-level torch.fx GraphModule.

The path is `torch.export.export(strict=False)`, unlifted with `ep.module()` and re-wrapped as a
plain `fx.GraphModule` (so `.train()` / `.eval()` work). Every node carries `meta["val"]` (a fake
tensor), which the analysis reads.

Dynamic dimensions: by default only the batch and sequence dimensions are dynamic, by input kind
(integer [B, T] inputs: token ids, masks -> B and T; [B, T, d] -> B and T; images [B, C, H, W]
and everything else -> B), because marking every dimension dynamic makes export of vision
models with shape-dependent padding take minutes. Pass `dynamic_shapes` (torch.export's form)
to choose yourself. Export specialises sizes 0 and 1, so an example whose dynamic dimension has
size 1 (a batch-1 prompt) is repeated to size 2 for the capture: the graph then accepts any size.
A call that breaks a remaining guard raises `InputError` naming the input and dimension.

Mode: `train=False` (the default) captures in eval mode (dropout recorded as a no-op, with a
warning when the model was in train mode); `train=True` captures in train mode, so dropout runs in
the graph. Hugging Face models are captured with `use_cache=False` (set on their config for the
duration). A GraphModule already produced by `capture` / `torch.export` is accepted as-is; any
other GraphModule (e.g. from `symbolic_trace`) is re-captured, which needs example inputs.
The captured graph checks on every call that its inputs live on its parameters' device.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import time
import traceback
import warnings

import torch
from torch import fx, nn
from torch.export import Dim

from .errors import CaptureError, MoefxError
from .facts import record_facts

__all__ = ["capture", "graph_module", "is_captured", "mark_captured", "InputError", "default_dynamic_dims"]

_CAPTURED = "_moefx_captured"


class InputError(MoefxError, ValueError):
    """Inputs a captured graph cannot take (a dimension fixed at capture, another device)."""


def capture(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
            *, dynamic_shapes="auto", train: bool = False) -> fx.GraphModule:
    """Capture `model(*example_inputs, **example_kwargs)` into an ATen GraphModule.

    Takes a module (HF, torch, hand-written) or a GraphModule. dynamic_shapes: "auto" (batch /
    sequence dims by input kind, see the module docstring), None (every size static) or
    torch.export's dynamic_shapes;
    train: capture in train mode (dropout active). Returns a GraphModule whose nodes carry shape
    metadata; `facts(gm).capture_seconds` is how long export took. Raises CaptureError
    naming the failing op/line and what to try.
    """
    if is_captured(model):
        return model
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        raise CaptureError(f"capturing {type(model).__name__} needs example inputs: pass example_inputs=(x,) "
                           "with tensors of the shapes the model takes")
    _check_devices_match(model, example_inputs, example_kwargs)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        example_inputs, example_kwargs, dynamic_shapes = _default_shapes(model, example_inputs, example_kwargs)
    was_training = model.training
    if was_training and not train:
        warnings.warn(f"{type(model).__name__} is in train mode but is captured in eval mode: dropout is left out "
                      "of the graph; pass train=True to keep it", stacklevel=3)
    t0 = time.perf_counter()
    try:
        with _hf_no_cache(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*0/1 specialized.*")
            model.train(train)
            ep = torch.export.export(model, example_inputs, example_kwargs or None,
                                     dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; turn them into one clear message
        raise CaptureError(_explain(model, e)) from e
    finally:
        model.train(was_training)
    return graph_module(ep, type(model).__name__, train=train, seconds=time.perf_counter() - t0)


def graph_module(ep: torch.export.ExportedProgram, name: str, *, train: bool = False,
                 seconds: float = 0.0) -> fx.GraphModule:
    """An exported program as the GraphModule the passes take: unlifted, guards that name the input
    they check, the input device check, train / eval mode set, marked captured."""
    gm = ep.module()
    _drop_dtype_asserts(gm)
    out = fx.GraphModule(gm, gm.graph, class_name=name + "Graph")
    if hasattr(out, "_guards_fn"):
        out._guards_fn = _NamedGuards(out._guards_fn)
    out.train(train)
    out.meta = {}
    record_facts(out, capture_seconds=seconds, train_capture=train)
    out.register_forward_pre_hook(_device_check)
    setattr(out, _CAPTURED, True)
    return out


def _drop_dtype_asserts(gm: fx.GraphModule) -> None:
    """Remove export's `_assert_tensor_metadata` checks (in place, nested graphs too). They pin each
    `.to()` input to the dtype it had at capture, so a graph run under autocast (bf16 activations
    where capture saw fp32) fails them; the conversions themselves stay in the graph."""
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        asserts = [n for n in module.graph.nodes if n.op == "call_function"
                   and n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users]
        for n in asserts:
            module.graph.erase_node(n)
        if asserts:
            module.recompile()


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


# ----------------------------------------------------------------------------------- shapes


def default_dynamic_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dims of an example input kept dynamic by default: batch and sequence by input kind."""
    if x.dim() == 0:
        return ()
    if x.dim() in (2, 3) and (not x.is_floating_point() or x.dim() == 3):
        return (0, 1)            # [B, T] token ids / masks, [B, T, d] embeddings
    return (0,)                  # images [B, C, H, W], [B, d] features, ...


def _default_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """(args, kwargs, dynamic_shapes): batch / sequence dims Dim.AUTO, size-1 examples repeated to 2."""

    def one(x):
        if isinstance(x, torch.Tensor):
            dims = default_dynamic_dims(x)
            for d in dims:
                if x.shape[d] < 2 and x.device.type != "meta":
                    x = x.repeat_interleave(2 // max(x.shape[d], 1), dim=d) if x.shape[d] == 1 else x
            return x, ({d: Dim.AUTO for d in dims} if dims else None)
        if isinstance(x, (list, tuple)):
            pairs = [one(v) for v in x]
            return type(x)(p[0] for p in pairs), type(x)(p[1] for p in pairs)
        if isinstance(x, dict):
            pairs = {k: one(v) for k, v in x.items()}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        return x, None

    if not kwargs:
        pairs = [one(a) for a in args]
        return tuple(p[0] for p in pairs), kwargs, tuple(p[1] for p in pairs)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    new_args, new_kwargs, spec = [], {}, {}
    for name, value in bound.arguments.items():
        v, s = one(value)
        spec[name] = s
        if name in kwargs:
            new_kwargs[name] = v
        else:
            new_args.append(v)
    return tuple(new_args), new_kwargs, spec


class _NamedGuards(nn.Module):
    """The exported module's input guards, with a failure reported as an InputError naming the input."""

    def __init__(self, guards: nn.Module):
        super().__init__()
        self.guards = guards

    def forward(self, *args, **kwargs):
        try:
            return self.guards(*args, **kwargs)
        except AssertionError as e:
            raise InputError(_guard_message(str(e))) from None


def _guard_message(text: str) -> str:
    m = re.search(r"(\w+)\.size\(\)\[(\d+)\]\s*(==|<=|>=|<|>)\s*(\d+)", text)
    if m:
        name, dim, op, value = m.groups()
        return (f"input {name!r}: dimension {dim} must be {op} {value} for this graph (it was fixed when the model "
                f"was captured: {text.strip()}); capture with an example of another size or pass dynamic_shapes "
                "to moefx.capture / moefx.convert")
    return f"the inputs break a shape guard of the captured graph ({text.strip()}); recapture with other examples"


# ----------------------------------------------------------------------------------- devices


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _check_devices_match(model: nn.Module, args, kwargs) -> None:
    device = _model_device(model)
    if device is None:
        return
    for t in _tensors((args, kwargs)):
        if t.device.type != device.type:
            raise CaptureError(f"{type(model).__name__}'s parameters are on {device} but an example input is on "
                               f"{t.device}: move the inputs (or the model) to one device before converting")


def _device_check(module: nn.Module, args) -> None:
    """Forward pre-hook of a captured graph: inputs on the parameters' device, and real tensors for a
    real model (meta inputs would give garbage), real parameters for real inputs."""
    device = _model_device(module)
    if device is None or torch.compiler.is_compiling():
        return
    for t in _tensors(args):
        if t.device.type == device.type:
            continue
        if device.type == "meta":
            raise InputError("this model's parameters are on the meta device (it was converted without weights): "
                             "it cannot run on real inputs; materialise it (moefx.weights.materialize / moefx "
                             "launch) or convert a model with weights")
        raise InputError(f"the model's parameters are on {device} but an input is on {t.device}: move the inputs "
                         f"to {device} (or the model to {t.device})")


# ----------------------------------------------------------------------------------- HF and errors


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
