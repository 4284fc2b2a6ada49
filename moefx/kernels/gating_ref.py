"""Plain PyTorch references of the gating kernels in `moefx.kernels.gating`.

Each function computes exactly what the matching Triton kernel (custom op) computes, on any
device, with ordinary tensor ops; the custom ops fall back to them on CPU when Triton's
interpreter is off, and the kernel tests compare against them.

Conventions (shared with `moefx.nn.routing`): expert [S, k] int64, slot [S, k] int64 (-1 =
dropped), the expert buffer is [E, C, d] with row r = expert * C + slot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.routing import _rank_within_groups, _topk_lowest_index


def gate_choices_ref(logits: Tensor, k: int) -> Tensor:
    """DeepSpeed's expert choices [S, k] (ties to the lowest index).

    k = 1: argmax of softmax(logits); k = 2: that, then argmax of the logits with the first
    masked out; k > 2: the k largest probabilities, largest first.
    """
    probs = F.softmax(logits.float(), dim=1)
    if k == 1:
        return probs.argmax(dim=1, keepdim=True)
    if k == 2:
        first = probs.argmax(dim=1)
        second = logits.float().scatter(1, first[:, None], float("-inf")).argmax(dim=1)
        return torch.stack([first, second], dim=1)
    return _topk_lowest_index(probs, k)


def gate_table_ref(logits: Tensor, k: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """(expert [S, k], slot [S, k], counts [E]) for a given capacity (-1: no limit).

    Slots: top-2 ranks all first choices of an expert before its second choices; top-1 and
    top-k rank in token order. A choice whose rank is >= capacity is dropped (slot -1). counts
    is the number of kept choices per expert.
    """
    S, E = logits.shape
    expert = gate_choices_ref(logits, k)
    flat = expert.t().reshape(-1) if k == 2 else expert.reshape(-1)
    rank = _rank_within_groups(flat, E)
    keep = rank < capacity if capacity >= 0 else torch.ones_like(rank, dtype=torch.bool)
    slot_flat = torch.where(keep, rank, torch.full_like(rank, -1))
    slot = slot_flat.reshape(k, S).t().contiguous() if k == 2 else slot_flat.reshape(S, k)
    counts = torch.bincount(flat[keep], minlength=E)
    return expert, slot, counts


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def dispatch_ref(tokens: Tensor, expert: Tensor, slot: Tensor, scale: Tensor | None, num_experts: int,
                 capacity: int) -> Tensor:
    """buf [E, C, d]: buf[expert[s, j], slot[s, j]] = scale[s, j] * tokens[s] (scale None: 1); zeros elsewhere."""
    S, d = tokens.shape
    buf = tokens.new_zeros(num_experts * capacity, d)
    kept = slot >= 0
    rows = (expert * capacity + slot)[kept]
    token = torch.arange(S, device=tokens.device)[:, None].expand_as(slot)[kept]
    vals = tokens.index_select(0, token)
    if scale is not None:
        acc = _acc_dtype(tokens.dtype, scale.dtype)
        vals = (vals.to(acc) * scale[kept].to(acc)[:, None]).to(tokens.dtype)
    buf[rows] = vals
    return buf.view(num_experts, capacity, d)


def combine_ref(expert_out: Tensor, expert: Tensor, slot: Tensor, weight: Tensor | None) -> Tensor:
    """out [S, d]: out[s] = sum_j weight[s, j] * expert_out[expert[s, j], slot[s, j]] over kept j.

    Accumulates in float32 (or the promoted dtype of the inputs, if wider), returns expert_out's dtype.
    """
    E, C, d = expert_out.shape
    S = slot.shape[0]
    acc = _acc_dtype(expert_out.dtype, *(() if weight is None else (weight.dtype,)))
    out = torch.zeros(S, d, dtype=acc, device=expert_out.device)
    kept = slot >= 0
    rows = (expert * C + slot)[kept]
    token = torch.arange(S, device=slot.device)[:, None].expand_as(slot)[kept]
    vals = expert_out.reshape(E * C, d).index_select(0, rows).to(acc)
    if weight is not None:
        vals = vals * weight[kept].to(acc)[:, None]
    return out.index_add_(0, token, vals).to(expert_out.dtype)


def route_dot_ref(a: Tensor, b: Tensor, expert: Tensor, slot: Tensor) -> Tensor:
    """out [S, k]: out[s, j] = <a[s], b[expert[s, j], slot[s, j]]> (0 when dropped), float32 or wider."""
    E, C, d = b.shape
    acc = _acc_dtype(a.dtype, b.dtype)
    kept = slot >= 0
    rows = torch.where(kept, expert * C + slot, torch.zeros_like(slot))
    if E * C == 0:
        return torch.zeros(slot.shape, dtype=acc, device=a.device)
    rows_b = b.reshape(E * C, d).index_select(0, rows.reshape(-1)).view(*slot.shape, d).to(acc)
    dots = (a.to(acc)[:, None, :] * rows_b).sum(dim=-1)
    return torch.where(kept, dots, torch.zeros_like(dots))
