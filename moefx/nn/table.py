"""The routing table and the one PyTorch reference of gate / dispatch / combine (a leaf module).

Conventions shared by every implementation (these references, the Triton kernels in
`moefx.kernels.gating`, the public `moefx.route` / `dispatch` / `combine`):

- expert [S, k] int64: the chosen expert of token s, choice j;
- slot [S, k] int64: its position in that expert's buffer, -1 when the choice is dropped;
- weight [S, k] float: its combine weight, 0 when dropped;
- counts [E] int64: kept choices per expert; the kept slots of expert e are 0 .. counts[e] - 1;
- the expert buffer is [E, C, d] and row r = expert * C + slot of its flat [E * C, d] view.

Everything here is plain tensor ops on any device, with no autograd of its own; the Triton
custom ops fall back to these functions where Triton does not run, and the kernel tests compare
against them.
"""
from __future__ import annotations

import math
import struct
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Routing(NamedTuple):
    """The mapping table of one routing decision.

    expert [S, k] int64, slot [S, k] int64 (-1 = dropped), weight [S, k] float (0 = dropped),
    capacity int (C of the [E, C, d] buffer), counts [E] int64 (kept tokens per expert),
    aux_loss scalar (load-balancing loss, plus the router z-loss when asked; differentiable
    w.r.t. the logits). The gather path's table-free routing (`moefx.nn.routing.route_choices`)
    has capacity -1 and counts None, and aux_loss None in inference.
    """

    expert: Tensor
    slot: Tensor
    weight: Tensor
    capacity: int
    counts: Tensor | None
    aux_loss: Tensor | None


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's capacity: ceil(S / E * (capacity_factor * k)), at least min_capacity.

    DeepSpeed evaluates the product with torch tensors of the default dtype (float32), so
    `S / E` and `capacity_factor * k` are rounded to float32 and multiplied in float32 before
    the ceil: e.g. S=10, E=3, capacity_factor=1.1, k=3 gives 11 (float64 arithmetic gives 12).
    This function reproduces that bit for bit. With a symbolic token count (dynamic shapes under
    torch.export) and under torch.compile it uses exact integer arithmetic on the rational
    capacity_factor * k instead (it can differ from the float32 result only where that product
    lands within float32 rounding of an integer).
    """
    symbolic = isinstance(num_tokens, torch.SymInt) or torch.compiler.is_compiling()
    if isinstance(num_tokens, int) and not symbolic:
        if torch.get_default_dtype() != torch.float64:
            product = _f32(_f32(num_tokens / num_experts) * _f32(capacity_factor * top_k))
            return max(math.ceil(product), min_capacity)
        return max(math.ceil((num_tokens / num_experts) * (capacity_factor * top_k)), min_capacity)
    ratio = Fraction(capacity_factor * top_k).limit_denominator(1 << 20)
    den = num_experts * ratio.denominator
    return torch.sym_max((num_tokens * ratio.numerator + den - 1) // den, min_capacity)


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 (round-half-even), as torch does."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ------------------------------------------------------------------------------------ choices


def topk_lowest_index(probs: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row, largest first, ties to the lowest index.

    Same set as torch.topk when there are no ties; unlike torch.topk, whose order among equal
    values is unspecified (CPU returns e.g. [8, 6, 7] for topk(ones(10), 3)), the result is
    deterministic and matches the Triton kernel.
    """
    work = probs.clone()
    picks = []
    for _ in range(k):
        idx = work.argmax(dim=1, keepdim=True)
        picks.append(idx)
        work.scatter_(1, idx, -1.0)  # probabilities are >= 0
    return torch.cat(picks, dim=1)


def gate_choices(logits: Tensor, k: int, probs: Tensor | None = None) -> Tensor:
    """DeepSpeed's expert choices [S, k] (ties to the lowest index).

    k = 1: argmax of softmax(logits); k = 2: that, then argmax of the logits with the first
    masked out; k > 2: the k largest probabilities, largest first.
    """
    probs = F.softmax(logits.float(), dim=1) if probs is None else probs
    if k == 1:
        return probs.argmax(dim=1, keepdim=True)
    if k == 2:
        first = probs.argmax(dim=1)
        second = logits.float().scatter(1, first[:, None], float("-inf")).argmax(dim=1)
        return torch.stack([first, second], dim=1)
    return topk_lowest_index(probs, k)


def claim_order(expert: Tensor) -> Tensor:
    """The choices flattened in the order they claim slots: top-2 puts all second choices after all
    first ones (choice-major, as DeepSpeed's top2gating); top-1 and top-k go in token order."""
    return expert.t().reshape(-1) if expert.shape[1] == 2 else expert.reshape(-1)


def unflatten_claims(flat: Tensor, S: int, k: int) -> Tensor:
    """Inverse of `claim_order` for a per-choice tensor: flat [S * k] -> [S, k]."""
    return flat.reshape(k, S).t().contiguous() if k == 2 else flat.reshape(S, k)


def rank_within_groups(groups: Tensor, num_groups: int) -> Tensor:
    """For each element, how many earlier elements share its group (a stable counting sort)."""
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    ranks = torch.empty_like(groups)
    ranks[order] = torch.arange(groups.numel(), device=groups.device) - starts[groups[order]]
    return ranks


def gate_table(logits: Tensor, k: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """(expert [S, k], slot [S, k], counts [E]) for a given capacity (-1: no limit).

    A choice whose rank among the choices of its expert (in claim order) is >= capacity is
    dropped (slot -1). counts is the number of kept choices per expert.
    """
    S, E = logits.shape
    expert = gate_choices(logits, k)
    flat = claim_order(expert)
    rank = rank_within_groups(flat, E)
    keep = rank < capacity if capacity >= 0 else torch.ones_like(rank, dtype=torch.bool)
    slot = unflatten_claims(torch.where(keep, rank, torch.full_like(rank, -1)), S, k)
    counts = torch.bincount(flat[keep], minlength=E)
    return expert, slot, counts


# ------------------------------------------------------------------------------------ moving rows


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or the widest of `dtypes` if wider: what the row-moving ops accumulate in."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def buffer_rows(expert: Tensor, slot: Tensor, capacity: int) -> Tensor:
    """Row of each choice in the flat [E * C, d] buffer (0 for dropped choices; mask with slot >= 0)."""
    return torch.where(slot >= 0, expert * capacity + slot, torch.zeros_like(slot))


def dispatch(tokens: Tensor, expert: Tensor, slot: Tensor, num_experts: int, capacity: int,
             scale: Tensor | None = None) -> Tensor:
    """buf [E, C, d]: buf[expert[s, j], slot[s, j]] = scale[s, j] * tokens[s] (scale None: 1); zeros elsewhere.

    One gather through the inverse map (buffer row -> choice): every buffer row is written once and
    no zero-filled buffer is scattered into; the empty rows are zeroed afterwards. The output is
    always computed from `tokens` (even with no kept choice), so autograd reaches every input.
    """
    S, d = tokens.shape[0], tokens.shape[-1]
    k = slot.shape[1]
    rows = num_experts * capacity
    kept = slot >= 0
    choice = torch.arange(S * k, device=slot.device).view(S, k)
    source = torch.full((rows,), -1, dtype=torch.long, device=slot.device)
    source = source.index_put_(((expert * capacity + slot)[kept],), choice[kept])
    if S == 0:
        return tokens.new_zeros(num_experts, capacity, d) + tokens.sum() * 0
    picked = source.clamp(min=0)
    buf = tokens.index_select(0, torch.div(picked, k, rounding_mode="floor"))
    if scale is not None:
        acc = acc_dtype(tokens.dtype, scale.dtype)
        buf = (buf.to(acc) * scale.reshape(-1).index_select(0, picked).to(acc)[:, None]).to(tokens.dtype)
    empty = (source < 0).nonzero().squeeze(1)
    buf = buf.index_fill(0, empty, 0) if buf.requires_grad else buf.index_fill_(0, empty, 0)
    return buf.view(num_experts, capacity, d)


def combine(expert_out: Tensor, expert: Tensor, slot: Tensor, weight: Tensor | None = None) -> Tensor:
    """out [S, d]: out[s] = sum_j weight[s, j] * expert_out[expert[s, j], slot[s, j]] over the kept j.

    Products and the sum over choices are computed in float32 (or the promoted dtype of the
    inputs, if wider; DeepSpeed accumulates float32 weights in float32), then cast to
    expert_out's dtype. The output is always computed from `expert_out`, so autograd reaches it
    even when S == 0.
    """
    E, C, d = expert_out.shape
    S, k = slot.shape
    flat = expert_out.reshape(E * C, d)
    if S == 0 or E * C == 0:
        return expert_out.new_zeros(S, d) + expert_out.sum() * 0
    kept = slot >= 0
    rows = buffer_rows(expert, slot, C)
    w = kept.to(expert_out.dtype) if weight is None else torch.where(kept, weight, torch.zeros_like(weight))
    acc = acc_dtype(expert_out.dtype, w.dtype)
    if expert_out.dtype == acc and w.dtype in (torch.float32, acc):
        # one fused gather-scale-sum pass with a single output allocation (several times faster
        # on CPU than gather + multiply); dropped choices read row 0 with weight 0
        return F.embedding_bag(rows, flat, mode="sum", per_sample_weights=w.to(acc))
    out = flat.index_select(0, rows[:, 0]).to(acc) * w[:, 0:1].to(acc)
    for j in range(1, k):
        out = out.addcmul_(flat.index_select(0, rows[:, j]).to(acc), w[:, j:j + 1].to(acc))
    return out.to(expert_out.dtype)


def route_dot(a: Tensor, b: Tensor, expert: Tensor, slot: Tensor) -> Tensor:
    """out [S, k]: out[s, j] = <a[s], b[expert[s, j], slot[s, j]]> (0 when dropped), float32 or wider.

    The gradient of a combine weight (a = output gradient, b = expert outputs) and of a dispatch
    scale (a = tokens, b = buffer gradient)."""
    E, C, d = b.shape
    acc = acc_dtype(a.dtype, b.dtype)
    kept = slot >= 0
    if E * C == 0:
        return torch.zeros(slot.shape, dtype=acc, device=a.device)
    rows_b = b.reshape(E * C, d).index_select(0, buffer_rows(expert, slot, C).reshape(-1)).view(*slot.shape, d)
    dots = (a.to(acc)[:, None, :] * rows_b.to(acc)).sum(dim=-1)
    return torch.where(kept, dots, torch.zeros_like(dots))
