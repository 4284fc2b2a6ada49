"""Where each MoE layer leaves its load-balancing loss during a forward, and how to sum them."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import MoefxError
from .routing import z_loss


class AuxLossSink(nn.Module):
    """Holds the weighted auxiliary loss of one MoE layer from the latest forward:
    coef * l_aux (DeepSpeed's load-balancing loss) + z_coef * z-loss(router logits).

    A rewritten graph calls it as a `call_module` node right after routing; it is marked impure
    so dead-code elimination keeps it. `coef` is the plan's aux_loss_coef, `z_coef` its z_loss_coef.
    """

    _is_impure = True

    def __init__(self, coef: float, z_coef: float = 0.0):
        super().__init__()
        self.coef = float(coef)
        self.z_coef = float(z_coef)
        self.value: torch.Tensor | None = None
        self.ran = False             # whether a forward has reached this layer (aux_loss refuses to guess)

    def forward(self, l_aux: torch.Tensor | None, logits: torch.Tensor | None = None) -> None:
        self.ran = True
        if l_aux is None:  # the gather path's gate in inference computes none (moefx.nn.routing.route_choices)
            self.value = None
            return None
        value = l_aux * self.coef
        if self.z_coef and logits is not None:
            value = value + z_loss(logits) * self.z_coef
        self.value = value
        return None


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted auxiliary losses (aux_loss_coef * l_aux + z_loss_coef * z-loss) over all
    MoE layers of `model`, from its latest forward.

    Takes any module containing moefx MoE layers; returns a scalar tensor, differentiable with
    respect to the router weights (0 for a model without MoE layers, and after an inference-mode
    forward, which computes no aux loss). MoefxError when the model has MoE layers but none has
    run a forward yet: there is no latest forward to take the loss of.
    """
    sinks = [m for m in model.modules() if isinstance(m, AuxLossSink)]
    if sinks and not any(s.ran for s in sinks):
        raise MoefxError("moefx.aux_loss(model) before any forward of the model: it sums the load-balancing "
                         "losses of the latest forward, so call the model first (loss = task_loss(model(x)) + "
                         "moefx.aux_loss(model))")
    total = None
    for sink in sinks:
        if sink.value is not None:
            total = sink.value if total is None else total + sink.value
    if total is None:
        return torch.zeros(())
    return total
