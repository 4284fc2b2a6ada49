"""Token routing with DeepSpeed's deterministic semantics, as an index mapping table.

`route(logits, ...)` decides for every token s and choice j an expert `expert[s, j]`, a slot
`slot[s, j]` inside that expert's capacity buffer (-1 when the token is dropped) and a combine
weight `weight[s, j]` (0 when dropped). `dispatch` moves each token once into an `[E, C, d]`
buffer from that table and `combine` scatters expert outputs back, weighted: no one-hot einsum.

Semantics (DeepSpeed `top1gating` with use_rts=False, `top2gating` with second-expert sampling
off, `topkgating` with drop_policy="position"):
- capacity = ceil(S / E * capacity_factor * k), at least min_capacity; with drop_tokens=False it is
  the largest per-expert load (all-reduced MAX over `ep_group` when given).
- top-1: expert = argmax; slots in token order; tokens past capacity dropped; weight = p.
- top-2: second expert = argmax with the first masked out; second choices take slots after all
  first choices of that expert; weights renormalised over the kept choices.
- top-k (k > 2): slots in token order over all choices; weights renormalised over kept choices.
- l_aux = E * sum_e mean_s(p)_e * mean_s(first_choice)_e (top-k: E * sum(me * ce) / k with ce over all
  k choices).
"""
from __future__ import annotations

import math
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
    """DeepSpeed's capacity: ceil(S / E * capacity_factor * k), at least min_capacity."""
    return max(math.ceil((num_tokens / num_experts) * (capacity_factor * top_k)), min_capacity)


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
    use_rts: DeepSpeed's random token selection for top-1 (which tokens survive capacity).
    noisy_gate: "rsample" adds Gumbel noise to the logits used to pick the top-1 expert.
    ep_group: process group over which a dropless capacity is all-reduced (MAX).
    """
    if logits.dim() != 2:
        raise ValueError(f"route expects logits of shape [S, E], got {tuple(logits.shape)}")
    S, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k = {top_k} must be in [1, E = {E}]")
    logits = logits.float()
    which = resolve_impl(impl, logits.device)
    if which == "triton" and not (use_rts or noisy_gate):
        from ..kernels import gating as kernels

        expert, slot, capacity, counts = kernels.gate_table(logits, top_k, capacity_factor, min_capacity,
                                                            drop_tokens, ep_group)
    else:
        expert, slot, capacity, counts = _gate_table_torch(logits, top_k, capacity_factor, min_capacity,
                                                          drop_tokens, use_rts, noisy_gate, ep_group)
    probs = F.softmax(logits, dim=1)
    weight = _combine_weights(probs, expert, slot, top_k, unit_top1)
    aux = _aux_loss(probs, expert, top_k)
    return Routing(expert, slot, weight, capacity, counts, aux)


def _gate_table_torch(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
                      use_rts: bool, noisy_gate: str | None, ep_group) -> tuple[Tensor, Tensor, int, Tensor]:
    """Expert choice, slot and capacity without autograd: the part a Triton kernel fuses."""
    S, E = logits.shape
    with torch.no_grad():
        if k == 1:
            pick = logits + _gumbel(logits) if noisy_gate == "rsample" else logits
            expert = pick.argmax(dim=1, keepdim=True)
        elif k == 2:
            first = logits.argmax(dim=1)
            second = logits.scatter(1, first[:, None], float("-inf")).argmax(dim=1)
            expert = torch.stack([first, second], dim=1)
        else:
            expert = torch.topk(logits, k, dim=1).indices
        # Order in which choices claim slots: top-2 puts all second choices after all first ones
        # (choice-major); top-1 and top-k go in token order (token-major).
        flat = expert.t().reshape(-1) if k == 2 else expert.reshape(-1)
        if use_rts and drop_tokens:
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
        keep = rank_in_expert < capacity
        slot_flat = torch.where(keep, rank_in_expert, torch.full_like(rank_in_expert, -1))
        slot = slot_flat.reshape(k, S).t().contiguous() if k == 2 else slot_flat.reshape(S, k)
        counts = torch.bincount(flat[keep], minlength=E)
        if use_rts and drop_tokens:
            slot = _renumber_slots_in_token_order(expert, slot, E)
    return expert, slot, capacity, counts


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
    kept = (slot >= 0).to(probs.dtype)
    gathered = probs.gather(1, expert) * kept
    if k == 1:
        return gathered / gathered.detach().clamp_min(1e-30) * kept if unit_top1 else gathered
    denom = gathered.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).eps)
    return gathered / denom


def _aux_loss(probs: Tensor, expert: Tensor, k: int) -> Tensor:
    S, E = probs.shape
    if S == 0:
        return probs.sum() * 0.0
    me = probs.mean(dim=0)
    chosen = expert[:, :1] if k <= 2 else expert
    ce = torch.bincount(chosen.reshape(-1), minlength=E).to(probs.dtype) / S
    aux = (me * ce).sum() * E
    return aux / k if k > 2 else aux


def _flat_index(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """(token index, buffer row = expert * C + slot, mask position) of every kept (s, j)."""
    kept = routing.slot >= 0
    token = torch.arange(routing.slot.shape[0], device=routing.slot.device)[:, None].expand_as(routing.slot)
    row = routing.expert * routing.capacity + routing.slot
    return token[kept], row[kept], kept


def dispatch(tokens: Tensor, routing: Routing, num_experts: int, *, impl: str = "auto") -> Tensor:
    """Gather tokens [S, d] into the expert buffer [E, C, d] (zeros in empty slots)."""
    which = resolve_impl(impl, tokens.device)
    if which == "triton":
        from ..kernels import gating as kernels

        return kernels.dispatch(tokens, routing, num_experts)
    E, C, d = num_experts, routing.capacity, tokens.shape[-1]
    token, row, _ = _flat_index(routing)
    buf = tokens.new_zeros(E * C, d).index_copy(0, row, tokens.index_select(0, token))
    return buf.view(E, C, d)


def combine(expert_out: Tensor, routing: Routing, *, impl: str = "auto") -> Tensor:
    """Scatter expert outputs [E, C, d] back to tokens [S, d], weighted by routing.weight."""
    which = resolve_impl(impl, expert_out.device)
    if which == "triton":
        from ..kernels import gating as kernels

        return kernels.combine(expert_out, routing)
    S, d = routing.slot.shape[0], expert_out.shape[-1]
    token, row, kept = _flat_index(routing)
    rows = expert_out.reshape(-1, d).index_select(0, row)
    w = routing.weight[kept].to(rows.dtype)
    return expert_out.new_zeros(S, d).index_add(0, token, rows * w[:, None])
