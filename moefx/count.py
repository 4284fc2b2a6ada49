"""Parameter counts: total, and active per token (what one token's forward touches)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .nn.moe import MoELayer


@dataclass(frozen=True)
class ParamCount:
    """total: every parameter; active: parameters used per token (top-k experts of E per MoE layer);
    expert: parameters inside experts."""

    total: int
    active: int
    expert: int

    def __str__(self) -> str:
        return f"total {human(self.total)}, active/token {human(self.active)}, experts {human(self.expert)}"


def count_params(model: nn.Module) -> ParamCount:
    """Count the parameters of a (converted) model; works on the meta device."""
    total = sum(p.numel() for p in model.parameters())
    expert = active_expert = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            n = sum(p.numel() for p in layer.experts.parameters())
            expert += n
            active_expert += n * min(layer.gate.top_k, layer.num_experts) // layer.num_experts
    return ParamCount(total=total, active=total - expert + active_expert, expert=expert)


def human(n: int) -> str:
    """A parameter count for people: 4.12B, 456.03M, 8.35K."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
