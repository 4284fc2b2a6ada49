"""`moefx.convert`: capture a dense model and run the passes its plan asks for (stage "convert")."""
from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path

from torch import fx, nn

from . import origin
from .capture import capture
from .errors import InexactConversionWarning, MoefxError
from .passes import pipeline
from .passes.base import PassContext
from .plan import Plan


def as_plan(plan: Plan | dict | None) -> Plan:
    """A Plan from a Plan, its dict form, or None (Plan.default())."""
    if plan is None:
        return Plan.default()
    return Plan.from_dict(plan) if isinstance(plan, dict) else plan


def convert(model: nn.Module, plan: Plan | dict | None = None, example_inputs: tuple = (),
            example_kwargs: dict | None = None, *, copy_weights: bool = True,
            dump_dir: str | Path | None = None, target: str | None = None, **capture_options) -> fx.GraphModule:
    """Turn a dense Transformer into a (PR-)MoE GraphModule as `plan` describes.

    Takes a module (or a GraphModule from moefx.capture / torch.export), a Plan (or its dict
    form; None = Plan.default()) and example inputs. Returns a GraphModule that runs for any
    batch size / sequence length the model allows; `moefx.aux_loss(gm)` gives its load-balancing
    loss after a forward. copy_weights=False shares the dense weights with `model` (saves memory;
    training the result then also changes `model`). dump_dir: write the code after every pass.
    target: the device type the result will run on ("cpu" / "cuda"), which device-dependent
    lowering decides for (Triton gating on CUDA); default: the model's device. capture_options go
    to `moefx.capture` (dynamic_shapes, train). Works on the meta device (no memory allocated). The
    plan is checked before any work (PlanError names the fix).
    """
    plan = as_plan(plan)
    ctx = PassContext(plan, target=target)
    pipeline.check(ctx, model if isinstance(model, fx.GraphModule) else None)
    moe = plan.moe
    if moe is not None and moe.init == "upcycle" and moe.inexact_reasons():
        warnings.warn("the converted model only approximates the dense one at initialisation: "
                      + "; ".join(moe.inexact_reasons()), InexactConversionWarning, stacklevel=2)
    if moe is None and plan.student is None:
        warnings.warn("the plan has no [moe] or [student] section: nothing is converted (the result is the "
                      "captured dense graph); add a [moe] section, or pass no plan for Plan.default()", stacklevel=2)
    if copy_weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree spec deprecation noise from deepcopy
            model = copy.deepcopy(model)
    gm = capture(model, example_inputs, example_kwargs, **capture_options)
    gm = pipeline.run(gm, ctx, "convert", dump_dir=dump_dir)
    if not isinstance(model, fx.GraphModule):
        origin.record(gm, model, plan, example_inputs if not example_kwargs else (None,), capture_options)
    gm.register_forward_pre_hook(refuse_uncaptured_inputs, with_kwargs=True)
    return gm


def refuse_uncaptured_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None):
    """Forward pre-hook of a converted graph: a keyword input the capture did not see (e.g. an
    attention_mask when only input_ids were captured) is a MoefxError naming how to capture it,
    instead of Python's bare "unexpected keyword argument". (A module copied from the graph may
    keep the hook without its with_kwargs flag: then it is called without kwargs and checks nothing.)"""
    if not kwargs:
        return None
    known = inspect.signature(gm.forward).parameters
    extra = sorted(k for k in kwargs if k not in known)
    if extra:
        inputs = [p for p in known if p != "self"]
        wanted = ", ".join(repr(k) + ": ..." for k in extra)
        raise MoefxError(f"this converted model takes the inputs it was captured with ({', '.join(inputs)}), not "
                         f"{', '.join(extra)}: convert it with example_kwargs={{{wanted}}} (example values of those "
                         "inputs) so the graph has them")
    return None
