"""Token routing with DeepSpeed's deterministic semantics, as an index mapping table.

`route(logits, ...)` decides for every token s and choice j an expert `expert[s, j]`, a slot
`slot[s, j]` inside that expert's capacity buffer (-1 when the token is dropped) and a combine
weight `weight[s, j]` (0 when dropped). `dispatch` moves each token once into an `[E, C, d]`
buffer from that table and `combine` scatters expert outputs back, weighted: no one-hot einsum.

Semantics (DeepSpeed `top1gating` with use_rts=False, `top2gating` with second-expert sampling
off, `topkgating` with drop_policy="position"), bit for bit unless noted:
- capacity = ceil(S / E * capacity_factor * k), at least min_capacity, evaluated in float32 like
  DeepSpeed (`expert_capacity`); with drop_tokens=False it is the largest per-expert load
  (all-reduced MAX over `ep_group` when given), no min_capacity.
- top-1: expert = argmax of the probabilities (not the logits: two logits whose probabilities
  round to the same float32 tie, and the lower index wins); slots in token order; weight = p.
  Tokens past capacity are dropped. Deviation: DeepSpeed picks the survivors of an overfull
  expert with torch.topk over a 0/1 mask, whose order among ties is unspecified (CPU keeps e.g.
  tokens 3 and 5 of 6, not 0 and 1); moefx keeps the first `capacity` tokens, like DeepSpeed's
  top-2 / top-k, deterministic on every device and in the Triton kernel. Survivors get slots in
  token order in both. (`_gate_table_torch(top1_keep="topk")` reproduces DeepSpeed's choice.)
- top-2: first = argmax of the probabilities, second = argmax of the logits with the first masked
  out; second choices take slots after all first choices of that expert (counted before drops);
  weights p / (p1 + p2) over the kept choices (clamped at eps).
- top-k (k > 2): the k largest probabilities (ties to the lowest index; torch.topk's tie order is
  unspecified); slots in token order over all choices; weights renormalised over the kept
  choices, the denominator summed over all E columns like DeepSpeed.
- l_aux = E * sum_e mean_s(p)_e * mean_s(first_choice)_e, with DeepSpeed's float ops (top-2:
  mean * E * E; top-k: mean * E * E / k with the mask of all k choices).
- counts = kept choices per expert (DeepSpeed's exp_counts counts them before dropping).
- use_rts and noisy_gate="rsample" only apply to top-1 (as in DeepSpeed).
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BackendError

IMPLS = ("auto", "torch", "triton")


class Routing(NamedTuple):
    """The mapping table of one routing decision.

    expert [S, k] int64, slot [S, k] int64 (-1 = dropped), weight [S, k] float (0 = dropped),
    capacity int (C of the [E, C, d] buffer), counts [E] int64 (kept tokens per expert),
    aux_loss scalar (load-balancing loss, differentiable w.r.t. the logits).
    """

    expert: Tensor
    slot: Tensor
    weight: Tensor
    capacity: int
    counts: Tensor
    aux_loss: Tensor


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's capacity: ceil(S / E * (capacity_factor * k)), at least min_capacity.

    DeepSpeed evaluates the product with torch tensors of the default dtype (float32), so
    `S / E` and `capacity_factor * k` are rounded to float32 and multiplied in float32 before
    the ceil: e.g. S=10, E=3, capacity_factor=1.1, k=3 gives 11 (float64 arithmetic gives 12).
    This function reproduces that bit for bit. With a symbolic token count (dynamic shapes
    under torch.export) it falls back to float64 arithmetic.
    """
    if isinstance(num_tokens, int) and torch.get_default_dtype() != torch.float64:
        product = _f32(_f32(num_tokens / num_experts) * _f32(capacity_factor * top_k))
        return max(math.ceil(product), min_capacity)
    return max(math.ceil((num_tokens / num_experts) * (capacity_factor * top_k)), min_capacity)


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 (round-half-even), as torch does."""
    return struct.unpack("f", struct.pack("f", x))[0]


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
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def route(logits: Tensor, *, top_k: int = 1, capacity_factor: float = 1.0, min_capacity: int = 4,
          drop_tokens: bool = True, unit_top1: bool = False, use_rts: bool = False,
          noisy_gate: str | None = None, ep_group=None, impl: str = "auto") -> Routing:
    """Route tokens: logits [S, E] -> Routing (see the module docstring for the semantics).

    unit_top1: top-1 weight p / p.detach() (value 1, gradient of p) instead of p.
    use_rts: DeepSpeed's random token selection for top-1 (which tokens survive capacity); like
        DeepSpeed, it has no effect for top_k > 1.
    noisy_gate: "rsample" adds Gumbel noise to the logits used to pick the top-1 expert; like
        DeepSpeed's noisy_gate_policy="RSample", it has no effect for top_k > 1.
    ep_group: process group over which a dropless capacity is all-reduced (MAX).
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
    if which == "triton" and not (rts or noisy):
        from ..kernels import gating as kernels

        expert, slot, capacity, counts = kernels.gate_table(logits, top_k, capacity_factor, min_capacity,
                                                            drop_tokens, ep_group)
    else:
        expert, slot, capacity, counts = _gate_table_torch(logits, top_k, capacity_factor, min_capacity,
                                                          drop_tokens, rts, "rsample" if noisy else None,
                                                          ep_group, probs=probs.detach())
    weight = _combine_weights(probs, expert, slot, top_k, unit_top1)
    aux = _aux_loss(probs, expert, top_k)
    return Routing(expert, slot, weight, capacity, counts, aux)


def _gate_table_torch(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
                      use_rts: bool, noisy_gate: str | None, ep_group, probs: Tensor | None = None,
                      top1_keep: str = "position") -> tuple[Tensor, Tensor, int, Tensor]:
    """Expert choice, slot and capacity without autograd: the part a Triton kernel fuses.

    Choices (as DeepSpeed): top-1 = argmax of the probabilities (or of logits + Gumbel noise with
    noisy_gate="rsample"); top-2 = argmax of the probabilities, then argmax of the logits with the
    first masked out; top-k = the k largest probabilities. Ties go to the lowest expert index.

    top1_keep="topk" reproduces, for top-1 without RTS, DeepSpeed's literal choice of which tokens
    of an overfull expert survive (`torch.topk` over a 0/1 mask, whose tie order is an
    implementation detail of the device's topk); the default "position" keeps the first
    `capacity` tokens, like DeepSpeed's top-2 and top-k (drop_policy="position").
    """
    S, E = logits.shape
    with torch.no_grad():
        if probs is None:
            probs = F.softmax(logits.float(), dim=1)
        if k == 1:
            pick = logits + _gumbel(logits) if noisy_gate == "rsample" else probs
            expert = pick.argmax(dim=1, keepdim=True)
        elif k == 2:
            first = probs.argmax(dim=1)
            second = logits.scatter(1, first[:, None], float("-inf")).argmax(dim=1)
            expert = torch.stack([first, second], dim=1)
        else:
            expert = _topk_lowest_index(probs, k)
        # Order in which choices claim slots: top-2 puts all second choices after all first ones
        # (choice-major); top-1 and top-k go in token order (token-major).
        flat = expert.t().reshape(-1) if k == 2 else expert.reshape(-1)
        if use_rts and drop_tokens and k == 1:
            priority = torch.rand(S, device=logits.device)  # random token selection
            order = torch.argsort(priority, stable=True)
            rank_in_expert = torch.empty_like(flat)
            rank_in_expert[order] = _rank_within_groups(flat[order], E)
        else:
            rank_in_expert = _rank_within_groups(flat, E)
        loads = torch.bincount(flat, minlength=E)
        if drop_tokens:
            capacity = expert_capacity(S, E, k, capacity_factor, min_capacity)
        else:
            cap_t = loads.max() if S > 0 else loads.new_zeros(())
            if ep_group is not None:
                import torch.distributed as dist

                dist.all_reduce(cap_t, op=dist.ReduceOp.MAX, group=ep_group)
            capacity = int(cap_t)
        if k == 1 and drop_tokens and not use_rts and top1_keep == "topk":
            keep = _top1_keep_like_topk(expert[:, 0], E, capacity)
        else:
            keep = rank_in_expert < capacity
        slot_flat = torch.where(keep, rank_in_expert, torch.full_like(rank_in_expert, -1))
        slot = slot_flat.reshape(k, S).t().contiguous() if k == 2 else slot_flat.reshape(S, k)
        counts = torch.bincount(flat[keep], minlength=E)
        if (use_rts or top1_keep == "topk") and drop_tokens and k == 1:
            slot = _renumber_slots_in_token_order(expert, slot, E)
    return expert, slot, capacity, counts


def _topk_lowest_index(probs: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row, largest first, ties to the lowest index.

    Same set as DeepSpeed's torch.topk when there are no ties; unlike torch.topk, whose order
    among equal values is unspecified (CPU returns e.g. [8, 6, 7] for topk(ones(10), 3)), the
    result is deterministic and matches the Triton kernel.
    """
    work = probs.clone()
    picks = []
    for _ in range(k):
        idx = work.argmax(dim=1, keepdim=True)
        picks.append(idx)
        work.scatter_(1, idx, -1.0)  # probabilities are >= 0
    return torch.cat(picks, dim=1)


def _top1_keep_like_topk(expert: Tensor, E: int, capacity: int) -> Tensor:
    """DeepSpeed top-1's survivors: torch.topk(one_hot(expert), min(capacity, S), dim=0)."""
    S = expert.shape[0]
    mask = F.one_hot(expert, num_classes=E)
    top = torch.topk(mask, k=min(capacity, S), dim=0).indices
    chosen = torch.zeros_like(mask).scatter_(0, top, 1)
    return (mask * chosen).sum(dim=1) > 0


def _rank_within_groups(groups: Tensor, num_groups: int) -> Tensor:
    """For each element, how many earlier elements share its group (a stable counting sort)."""
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    ranks = torch.empty_like(groups)
    ranks[order] = torch.arange(groups.numel(), device=groups.device) - starts[groups[order]]
    return ranks


def _renumber_slots_in_token_order(expert: Tensor, slot: Tensor, E: int) -> Tensor:
    """After RTS picked which tokens survive, DeepSpeed gives the survivors slots in token order."""
    kept = slot >= 0
    flat_e = torch.where(kept, expert, torch.full_like(expert, E)).reshape(-1)
    ranks = _rank_within_groups(flat_e, E + 1).reshape(slot.shape)
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
    chosen = expert[:, :1] if k <= 2 else expert
    # per-expert counts without bincount, which synchronises with a GPU to size its output
    hits = chosen.reshape(-1, 1) == torch.arange(E, device=chosen.device)
    ce = hits.sum(dim=0).to(probs.dtype) / S
    if k == 1:
        return torch.sum(me * ce) * E
    if k == 2:
        return torch.mean(me * ce) * E * E
    return torch.mean(me * ce) * E * E / k


def dispatch(tokens: Tensor, routing: Routing, num_experts: int, *, impl: str = "auto") -> Tensor:
    """Gather tokens [S, d] into the expert buffer [E, C, d] (zeros in empty slots)."""
    which = resolve_impl(impl, tokens.device)
    if which == "triton":
        from ..kernels import gating as kernels

        return kernels.dispatch(tokens, routing, num_experts)
    return _dispatch_torch(tokens, routing.expert, routing.slot, num_experts, routing.capacity)


def combine(expert_out: Tensor, routing: Routing, *, impl: str = "auto") -> Tensor:
    """Scatter expert outputs [E, C, d] back to tokens [S, d], weighted by routing.weight."""
    which = resolve_impl(impl, expert_out.device)
    if which == "triton":
        from ..kernels import gating as kernels

        return kernels.combine(expert_out, routing)
    return _combine_torch(expert_out, routing.expert, routing.slot, routing.weight)


def _dispatch_torch(tokens: Tensor, expert: Tensor, slot: Tensor, num_experts: int, capacity: int) -> Tensor:
    """buf[e, c] = tokens[s] for the kept (s, j) with expert e and slot c; zeros elsewhere.

    One gather through the inverse map (buffer row -> token): every buffer row is written once and
    no zero-filled buffer is scattered into; the (few) empty rows are zeroed afterwards.
    """
    S, d = tokens.shape[0], tokens.shape[-1]
    E, C = num_experts, capacity
    if S == 0 or E * C == 0:
        return tokens.new_zeros(E, C, d)
    kept = slot >= 0
    source = _inverse_map(expert, slot, kept, C, E * C)
    buf = tokens.index_select(0, source.clamp(min=0))
    empty = (source < 0).nonzero().squeeze(1)
    if empty.numel():
        buf = buf.index_fill(0, empty, 0) if buf.requires_grad else buf.index_fill_(0, empty, 0)
    return buf.view(E, C, d)


def _inverse_map(expert: Tensor, slot: Tensor, kept: Tensor, capacity: int, rows: int) -> Tensor:
    """source[r] = the token in buffer row r = expert * C + slot, -1 when the row is empty."""
    S = slot.shape[0]
    token = torch.arange(S, device=slot.device)[:, None].expand_as(slot)
    source = torch.full((rows,), -1, dtype=torch.long, device=slot.device)
    return source.index_put_((expert[kept] * capacity + slot[kept],), token[kept])


def _combine_torch(expert_out: Tensor, expert: Tensor, slot: Tensor, weight: Tensor) -> Tensor:
    """out[s] = sum_j weight[s, j] * expert_out[expert[s, j], slot[s, j]] over the kept j.

    Products and the sum over choices are computed in the promoted dtype of expert_out and
    weight (float32 weights: float32 accumulation, as DeepSpeed), then cast to expert_out's dtype.
    """
    E, C, d = expert_out.shape
    S, k = slot.shape
    if S == 0 or E * C == 0:
        return expert_out.new_zeros(S, d)
    kept = slot >= 0
    rows = torch.where(kept, expert * C + slot, torch.zeros_like(slot))
    w = torch.where(kept, weight, torch.zeros_like(weight))
    flat = expert_out.reshape(E * C, d)
    if expert_out.dtype in (torch.float32, torch.float64) and weight.dtype in (torch.float32, expert_out.dtype):
        # one fused gather-scale-sum pass with a single output allocation (several times faster
        # on CPU than gather + multiply); dropped choices read row 0 with weight 0
        return F.embedding_bag(rows, flat, mode="sum", per_sample_weights=w.to(expert_out.dtype))
    out = flat.index_select(0, rows[:, 0]) * w[:, 0:1]
    for j in range(1, k):
        out = out.addcmul_(flat.index_select(0, rows[:, j]), w[:, j:j + 1])
    return out.to(expert_out.dtype)
