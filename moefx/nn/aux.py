"""Where each MoE layer leaves its load-balancing loss during a forward, and how to sum them."""
from __future__ import annotations

import torch
from torch import nn


class AuxLossSink(nn.Module):
    """Holds the l_aux of one MoE layer from the latest forward.

    A rewritten graph calls it as a `call_module` node right after routing; it is marked impure
    so dead-code elimination keeps it. `coef` is the plan's aux_loss_coef.
    """

    _is_impure = True

    def __init__(self, coef: float):
        super().__init__()
        self.coef = float(coef)
        self.value: torch.Tensor | None = None

    def forward(self, l_aux: torch.Tensor) -> None:
        self.value = l_aux
        return None


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of aux_loss_coef * l_aux over all MoE layers of `model`, from its latest forward.

    Takes any module containing moefx MoE layers; returns a scalar tensor (0 when there are
    none or no forward has run), differentiable with respect to the router weights.
    """
    total = None
    for sink in model.modules():
        if isinstance(sink, AuxLossSink) and sink.value is not None:
            term = sink.value * sink.coef
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
