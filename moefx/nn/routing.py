"""Token routing with DeepSpeed's deterministic semantics, as an index mapping table.

`route(logits, ...)` decides for every token s and choice j an expert `expert[s, j]`, a slot
`slot[s, j]` inside that expert's capacity buffer (-1 when the token is dropped) and a combine
weight `weight[s, j]` (0 when dropped). `dispatch` moves each token once into an `[E, C, d]`
buffer from that table and `combine` scatters expert outputs back, weighted: no one-hot einsum.
The table conventions and the PyTorch reference live in `moefx.nn.table`; the custom ops the
graph calls in `moefx.nn.gating_ops`; the Triton kernels in `moefx.kernels.gating`.

Semantics (DeepSpeed `top1gating` with use_rts=False, `top2gating` with second-expert sampling
off, `topkgating` with drop_policy="position"), bit for bit unless noted:
- capacity = ceil(S / E * capacity_factor * k), at least min_capacity, evaluated in float32 like
  DeepSpeed (`expert_capacity`); with drop_tokens=False it is the largest per-expert load of this
  rank's tokens, no min_capacity (distributed dropless layers send exactly the routed tokens, so
  no capacity is agreed between ranks).
- top-1: expert = argmax of the probabilities (not the logits: two logits whose probabilities
  round to the same float32 tie, and the lower index wins); slots in token order; weight = p.
  Tokens past capacity are dropped. Deviation: DeepSpeed picks the survivors of an overfull
  expert with torch.topk over a 0/1 mask, whose order among ties is unspecified (CPU keeps e.g.
  tokens 3 and 5 of 6, not 0 and 1); moefx keeps the first `capacity` tokens, like DeepSpeed's
  top-2 / top-k, deterministic on every device and in the Triton kernel. Survivors get slots in
  token order in both. (`_special_table(top1_keep="topk")` reproduces DeepSpeed's choice.)
- top-2: first = argmax of the probabilities, second = argmax of the logits with the first masked
  out; second choices take slots after all first choices of that expert (counted before drops);
  weights p / (p1 + p2) over the kept choices (clamped at eps).
- top-k (k > 2): the k largest probabilities (ties to the lowest index; torch.topk's tie order is
  unspecified); slots in token order over all choices; weights renormalised over the kept
  choices, the denominator summed over all E columns like DeepSpeed.
- l_aux = E * sum_e mean_s(p)_e * mean_s(first_choice)_e, with DeepSpeed's float ops (top-2:
  mean * E * E; top-k: mean * E * E / k with the mask of all k choices).
- counts = kept choices per expert (DeepSpeed's exp_counts counts them before dropping).
- use_rts and noisy_gate="rsample" only apply to top-1 (as in DeepSpeed); they run eagerly (a
  PyTorch path outside the custom ops).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BackendError
from . import gating_ops
from .table import Routing, claim_order, expert_capacity, gate_choices, rank_within_groups, unflatten_claims

__all__ = ["Routing", "route", "route_choices", "dispatch", "combine", "gather_combine", "expert_capacity",
           "resolve_impl", "z_loss", "IMPLS"]

IMPLS = ("auto", "torch", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Pick "torch" or "triton" for `impl` on `device`; raise BackendError when Triton cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "triton" and device.type != "cuda" and not _interpreting():
        raise BackendError(
            f"impl='triton' needs a CUDA device, but the tensors are on {device}; use impl='torch' (or "
            "lowering.gating = 'torch' / 'auto' in the plan), or set TRITON_INTERPRET=1 to run the kernels "
            "in Triton's CPU interpreter")
    if impl == "triton" and not _triton_available():
        raise BackendError("impl='triton' but triton is not installed: pip install triton, or use impl='torch'")
    return impl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def route(logits: Tensor, *, top_k: int = 1, capacity_factor: float = 1.0, min_capacity: int = 4,
          drop_tokens: bool = True, unit_top1: bool = False, use_rts: bool = False,
          noisy_gate: str | None = None, impl: str = "auto") -> Routing:
    """Route tokens: logits [S, E] -> Routing (see the module docstring for the semantics).

    unit_top1: top-1 weight p / p.detach() (value 1, gradient of p) instead of p.
    use_rts: DeepSpeed's random token selection for top-1 (which tokens survive capacity); like
        DeepSpeed, it has no effect for top_k > 1.
    noisy_gate: "rsample" adds Gumbel noise to the logits used to pick the top-1 expert; like
        DeepSpeed's noisy_gate_policy="RSample", it has no effect for top_k > 1.
    """
    if logits.dim() != 2:
        raise ValueError(f"route expects logits of shape [S, E], got {tuple(logits.shape)}")
    S, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k = {top_k} must be in [1, E = {E}]")
    if noisy_gate is not None and noisy_gate.lower() != "rsample":
        raise ValueError(f"noisy_gate must be None or 'rsample', got {noisy_gate!r} (DeepSpeed's 'Jitter' "
                         "multiplies the router input, not the logits: see moefx.nn.moe.Router)")
    logits = logits.float()
    which = resolve_impl(impl, logits.device)
    probs = F.softmax(logits, dim=1)
    noisy = noisy_gate is not None and top_k == 1
    rts = use_rts and top_k == 1 and drop_tokens
    if rts or noisy:
        expert, slot, capacity, counts = _special_table(logits, top_k, capacity_factor, min_capacity, drop_tokens,
                                                        rts, "rsample" if noisy else None, probs=probs.detach())
    else:
        capacity = expert_capacity(S, E, top_k, capacity_factor, min_capacity) if drop_tokens else -1
        expert, slot, counts = gating_ops.gate_table(logits.detach(), top_k, capacity, which)
        if not drop_tokens:
            # data-dependent: an unbacked SymInt when traced. At least 2 rows: a compiler that picks
            # a matrix-vector kernel for one row would otherwise guard on the value (Eq(u, 1)),
            # which it cannot for a data-dependent size; an empty row costs nothing.
            capacity = torch.sym_max(counts.max().item(), 2) if S > 0 else 0
            torch._check(capacity >= 0)
    weight = _combine_weights(probs, expert, slot, top_k, unit_top1)
    return Routing(expert, slot, weight, capacity, counts, _aux_loss(probs, expert, top_k))


def route_choices(logits: Tensor, *, top_k: int = 1, unit_top1: bool = False, aux: bool = True) -> Routing:
    """Routing without a slot table, for the gather path when no choice can be dropped: logits
    [S, E] -> Routing with route()'s experts and weights (the same ops, bit for bit), slot 0 for
    every choice (all kept), capacity -1 (no limit), counts None (nothing reads them: the gather path
    has no buffer) and the aux loss, or None with aux=False (an inference step: nothing trains on it).
    A decode step at batch 1 runs one gate per MoE layer, where each of route()'s extra ops costs
    about as much as a kernel, so this one skips them.
    """
    if logits.dim() != 2:
        raise ValueError(f"route_choices expects logits of shape [S, E], got {tuple(logits.shape)}")
    logits = logits.float()
    probs = F.softmax(logits, dim=1)
    expert = gate_choices(logits.detach(), top_k, probs.detach())
    slot = torch.zeros_like(expert)
    if unit_top1 and top_k == 1 and not (torch.is_grad_enabled() and logits.requires_grad):
        weight = torch.ones_like(expert, dtype=probs.dtype)   # p / p: exactly 1 (p >= 1 / E for the argmax)
    else:
        weight = _combine_weights(probs, expert, slot, top_k, unit_top1)
    return Routing(expert, slot, weight, -1, None,
                   _aux_loss(probs, expert, top_k) if aux else None)


def _special_table(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
                   use_rts: bool, noisy_gate: str | None, probs: Tensor | None = None,
                   top1_keep: str = "position") -> tuple[Tensor, Tensor, int, Tensor]:
    """The table with DeepSpeed's randomised options (eager PyTorch; no custom op).

    use_rts: random token selection (which top-1 tokens survive capacity); noisy_gate="rsample":
    top-1 choice from logits + Gumbel noise. top1_keep="topk" reproduces, for top-1 without RTS,
    DeepSpeed's literal choice of which tokens of an overfull expert survive (`torch.topk` over a
    0/1 mask, whose tie order is an implementation detail of the device's topk); the default
    "position" keeps the first `capacity` tokens, like DeepSpeed's top-2 and top-k.
    """
    S, E = logits.shape
    with torch.no_grad():
        if probs is None:
            probs = F.softmax(logits.float(), dim=1)
        if k == 1 and noisy_gate == "rsample":
            expert = (logits + _gumbel(logits)).argmax(dim=1, keepdim=True)
        else:
            expert = gate_choices(logits, k, probs)
        flat = claim_order(expert)
        if use_rts and drop_tokens and k == 1:
            order = torch.argsort(torch.rand(S, device=logits.device), stable=True)  # random token selection
            rank_in_expert = torch.empty_like(flat)
            rank_in_expert[order] = rank_within_groups(flat[order], E)
        else:
            rank_in_expert = rank_within_groups(flat, E)
        if drop_tokens:
            capacity = expert_capacity(S, E, k, capacity_factor, min_capacity)
        else:
            capacity = int(torch.bincount(flat, minlength=E).max()) if S > 0 else 0
        if k == 1 and drop_tokens and not use_rts and top1_keep == "topk":
            keep = _top1_keep_like_topk(expert[:, 0], E, capacity)
        else:
            keep = rank_in_expert < capacity
        slot = unflatten_claims(torch.where(keep, rank_in_expert, torch.full_like(rank_in_expert, -1)), S, k)
        counts = torch.bincount(flat[keep], minlength=E)
        if (use_rts or top1_keep == "topk") and drop_tokens and k == 1:
            slot = _renumber_slots_in_token_order(expert, slot, E)
    return expert, slot, capacity, counts


def _top1_keep_like_topk(expert: Tensor, E: int, capacity: int) -> Tensor:
    """DeepSpeed top-1's survivors: torch.topk(one_hot(expert), min(capacity, S), dim=0)."""
    S = expert.shape[0]
    mask = F.one_hot(expert, num_classes=E)
    top = torch.topk(mask, k=min(capacity, S), dim=0).indices
    chosen = torch.zeros_like(mask).scatter_(0, top, 1)
    return (mask * chosen).sum(dim=1) > 0


def _renumber_slots_in_token_order(expert: Tensor, slot: Tensor, E: int) -> Tensor:
    """After RTS picked which tokens survive, DeepSpeed gives the survivors slots in token order."""
    kept = slot >= 0
    flat_e = torch.where(kept, expert, torch.full_like(expert, E)).reshape(-1)
    ranks = rank_within_groups(flat_e, E + 1).reshape(slot.shape)
    return torch.where(kept, ranks, slot)


def _gumbel(x: Tensor) -> Tensor:
    u = torch.rand_like(x).clamp_(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


def _combine_weights(probs: Tensor, expert: Tensor, slot: Tensor, k: int, unit_top1: bool) -> Tensor:
    """DeepSpeed's combine weights, bit for bit: p (top-1) or p / sum of the kept p (top-k)."""
    kept = (slot >= 0).to(probs.dtype)
    gathered = probs.gather(1, expert) * kept
    if k == 1:
        return gathered / gathered.detach().clamp_min(1e-30) * kept if unit_top1 else gathered
    eps = torch.finfo(probs.dtype).eps
    if k == 2:
        denom = gathered.sum(dim=1, keepdim=True)  # g1 + g2, one addition, as DeepSpeed
    else:
        # DeepSpeed sums the masked probabilities over all E experts; a float32 sum over the E
        # columns is not bit-identical to a sum over the k gathered values, so do the same.
        denom = torch.zeros_like(probs).scatter(1, expert, gathered).sum(dim=1, keepdim=True)
    return gathered / denom.clamp_min(eps)


def _aux_loss(probs: Tensor, expert: Tensor, k: int) -> Tensor:
    """l_aux with DeepSpeed's exact float ops (sum * E for top-1, mean * E * E for top-2, / k for top-k)."""
    S, E = probs.shape
    if S == 0:
        return probs.sum() * 0.0
    me = probs.mean(dim=0)
    chosen = expert.narrow(1, 0, 1) if k <= 2 else expert
    # per-expert counts without bincount, which synchronises with a GPU to size its output
    hits = chosen.reshape(-1, 1) == torch.arange(E, device=chosen.device)
    ce = hits.sum(dim=0).to(probs.dtype) / S
    if k == 1:
        return torch.sum(me * ce) * E
    if k == 2:
        return torch.mean(me * ce) * E * E
    return torch.mean(me * ce) * E * E / k


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2 (0 for no tokens)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def dispatch(tokens: Tensor, routing: Routing, num_experts: int, *, impl: str = "auto") -> Tensor:
    """Gather tokens [S, d] into the expert buffer [E, C, d] (zeros in empty slots)."""
    which = resolve_impl(impl, tokens.device)
    return gating_ops.dispatch(tokens, routing.expert, routing.slot, routing.counts, num_experts, routing.capacity,
                               which)


def combine(expert_out: Tensor, routing: Routing, *, impl: str = "auto") -> Tensor:
    """Scatter expert outputs [E, C, d] back to tokens [S, d], weighted by routing.weight."""
    which = resolve_impl(impl, expert_out.device)
    return gating_ops.combine(expert_out, routing.expert, routing.slot, routing.counts, routing.weight, which)


def gather_combine(expert_out: Tensor, weight: Tensor) -> Tensor:
    """The gather path's combine: expert_out [S, k, d] (each token's k expert outputs) -> [S, d], weighted
    by weight [S, k] (0 for dropped choices), accumulated in float32 like `combine`."""
    acc = torch.promote_types(torch.float32, expert_out.dtype)
    if expert_out.shape[1] == 1:   # top-1: the sum over one choice is the product itself
        if expert_out.dtype == acc and weight.dtype == acc:   # no-op casts still cost a call each
            return expert_out[:, 0] * weight
        return (expert_out[:, 0].to(acc) * weight.to(acc)).to(expert_out.dtype)
    out = (expert_out.to(acc) * weight.to(acc).unsqueeze(-1)).sum(dim=1)
    return out.to(expert_out.dtype)
