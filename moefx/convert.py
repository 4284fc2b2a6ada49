"""`moefx.convert`: capture a dense model and run the passes its plan asks for."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

from torch import fx, nn

from .capture import capture
from .passes.infra import run_pipeline
from .passes.lower_gating import lower_gating
from .passes.pr_moe import pr_moe
from .plan import Plan


def pipeline(plan: Plan) -> list:
    """The ordered passes `convert` runs for `plan` (each can be switched off via plan.disable)."""
    passes = []
    if plan.moe is not None:
        passes.append(pr_moe)
    if plan.student is not None:
        from .passes.shrink import shrink_pass

        passes.append(shrink_pass)
    passes.append(lower_gating)
    return passes


def convert(model: nn.Module, plan: Plan | dict | None = None, example_inputs: tuple = (),
            example_kwargs: dict | None = None, *, copy_weights: bool = True,
            dump_dir: str | Path | None = None) -> fx.GraphModule:
    """Turn a dense Transformer into a (PR-)MoE GraphModule as `plan` describes.

    Takes a module (or a GraphModule from moefx.capture / torch.export), a Plan (or its dict
    form; None = Plan.default()) and example inputs. Returns a GraphModule that runs for any
    batch size / sequence length the model allows; `moefx.aux_loss(gm)` gives its load-balancing
    loss after a forward. copy_weights=False shares the dense weights with `model` (saves memory;
    training the result then also changes `model`). dump_dir: write the code after every pass.
    Works on the meta device (no memory allocated).
    """
    plan = Plan.default() if plan is None else plan
    plan = Plan.from_dict(plan) if isinstance(plan, dict) else plan
    moe = plan.moe
    if moe is not None and moe.init == "upcycle" and moe.drop_tokens:
        warnings.warn("this plan drops tokens over capacity (drop_tokens=True): the converted model only "
                      "approximates the dense one at initialisation; set drop_tokens = false for exact "
                      "function preservation", stacklevel=2)
    if copy_weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree spec deprecation noise from deepcopy
            model = copy.deepcopy(model)
    gm = capture(model, example_inputs, example_kwargs)
    return run_pipeline(gm, plan, pipeline(plan), dump_dir=dump_dir)
