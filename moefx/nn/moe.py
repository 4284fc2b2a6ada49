"""The modules a PR-MoE graph calls: router, gate, experts, residual coefficient, aux-loss sink.

The rewritten graph calls each piece as its own node (see `moefx.passes.pr_moe`); `MoELayer` is
only the container that owns their parameters, plus a `forward` that runs the same steps in
eager mode (handy for tests and for using the layer outside a graph).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aux import AuxLossSink
from .experts import Experts
from .routing import Routing, combine, dispatch, expert_capacity, route, route_choices


class Router(nn.Module):
    """Gate projection Linear(d, E, bias=False), computed in fp32.

    jitter: in training, multiply the input by uniform noise in [1 - eps, 1 + eps] (DeepSpeed's
    "Jitter" noisy gate policy).
    """

    def __init__(self, weight: Tensor, jitter: bool = False, jitter_eps: float = 1e-2):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.jitter = jitter
        self.jitter_eps = jitter_eps

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens.float()
        if self.jitter and self.training:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return F.linear(x, self.weight.float())


class Gate(nn.Module):
    """Routing decision of one MoE layer: logits [S, E] -> Routing (moefx.route).

    Uses capacity_factor in training and eval_capacity_factor in eval, like DeepSpeed. `impl` is
    set by the lower_gating pass, and so is `table`: False on the gather path, where no buffer slot
    is read, so a call that cannot drop a choice (dropless, or S <= capacity: an expert gets at most
    one choice per token) skips the slot table (`route_choices`, same experts and weights) and, in
    eval without autograd (a decode step), the load-balancing loss (the aux sink then holds None).
    """

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float, eval_capacity_factor: float,
                 min_capacity: int, drop_tokens: bool, unit_top1: bool, use_rts: bool = False,
                 noisy_gate: str | None = None, impl: str = "auto", table: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.unit_top1 = unit_top1
        self.use_rts = use_rts
        self.noisy_gate = noisy_gate
        self.impl = impl
        self.table = table

    def forward(self, logits: Tensor) -> Routing:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if not self.table and not (self.training and (self.use_rts or self.noisy_gate == "rsample")):
            S = logits.shape[0]
            if not self.drop_tokens or S <= expert_capacity(S, self.num_experts, self.top_k, cf, self.min_capacity):
                return route_choices(logits, top_k=self.top_k, unit_top1=self.unit_top1,
                                     aux=self.training or torch.is_grad_enabled())
        return route(logits, top_k=self.top_k, capacity_factor=cf,
                     min_capacity=self.min_capacity, drop_tokens=self.drop_tokens, unit_top1=self.unit_top1,
                     use_rts=self.use_rts and self.training,
                     noisy_gate=self.noisy_gate if self.training and self.noisy_gate == "rsample" else None,
                     impl=self.impl)

    def with_options(self, **attrs) -> "Gate":
        """A copy of this gate with some settings changed (passes use it: the input graph keeps its own)."""
        new = copy.copy(self)
        for name, value in attrs.items():
            setattr(new, name, value)
        return new

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"drop_tokens={self.drop_tokens}, impl={self.impl}" + ("" if self.table else ", table=False"))


class MoELayer(nn.Module):
    """Parameter container of one (PR-)MoE layer: router, gate, experts, optional coef, aux sink."""

    _moefx_keep = True  # graph copies keep this module whole (see passes.infra.copy_graph_module)

    def __init__(self, router: Router, gate: Gate, experts: Experts, coef: nn.Linear | None,
                 aux: AuxLossSink, block: int):
        super().__init__()
        self.router = router
        self.gate = gate
        self.experts = experts
        self.coef = coef
        self.aux = aux
        self.block = block

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    def replaced(self, **children: nn.Module) -> "MoELayer":
        """A shallow copy with some submodules replaced or added (gate, experts, collectives); the
        others are shared. Passes use it so their input graph keeps its own layer."""
        new = copy.copy(self)
        new._modules = {**self._modules, **children}
        return new

    def forward(self, tokens: Tensor, mlp_out: Tensor | None = None) -> Tensor:
        """Eager equivalent of the graph nodes: tokens [S, d] (+ dense MLP output) -> [S, d]."""
        logits = self.router(tokens)
        routing = self.gate(logits)
        self.aux(routing.aux_loss, logits)
        out = combine(self.experts(dispatch(tokens, routing, self.num_experts, impl=self.gate.impl)), routing,
                      impl=self.gate.impl)
        if self.coef is None:
            return out
        c = torch.softmax(self.coef(tokens), dim=-1)
        return out * c[:, 0:1] + mlp_out * c[:, 1:2]


def moe_layers(model: nn.Module) -> list[tuple[int, MoELayer]]:
    """(layer index L, module) of every `moe{L}` MoE layer directly under `model`, in layer order."""
    found = [(int(name[3:]), m) for name, m in model.named_children()
             if isinstance(m, MoELayer) and name.startswith("moe") and name[3:].isdigit()]
    return sorted(found, key=lambda t: t[0])
