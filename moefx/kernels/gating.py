"""Gating lowered to Triton: fused gate -> mapping table, dispatch and combine by table.

Kernels (every program handles a block of many rows):

- gate (two passes, deterministic): `_gate_kernel` computes, per block of BLOCK_S tokens, the
  softmax, the top-k expert choices, each choice's rank among the block's earlier choices of the
  same expert (an exclusive `tl.cumsum` over a one-hot) and the block's per-expert histogram;
  an exclusive scan of the [groups * blocks, E] histograms gives each block
  its starting position per expert (`_slot_kernel` sums the histograms of the earlier blocks
  itself, then adds them to the in-block ranks and applies the capacity). Positions
  are therefore exactly DeepSpeed's token-order ones (top-2: all first choices, then all second
  choices), never an atomic's arrival order.
- dispatch: `_dispatch_kernel`, one launch: token programs read each token row once and write
  its k buffer rows; the other programs zero each expert's empty rows (the suffix past
  counts[e]), so every buffer row is written exactly once and no memset is needed.
- combine: `_combine_kernel` gathers the k expert rows of each token and sums them weighted,
  accumulating in float32.
- route_dot: `_route_dot_kernel`, out[s, j] = <a[s], b[row(s, j)]> (gradient of a weight).

The launchers (`gate_table_triton`, `dispatch_triton`, `combine_triton`, `route_dot_triton`) take
and return the tensors of the table conventions in `moefx.nn.table`, whose functions are their
PyTorch references; the custom ops the graph calls (`moefx.nn.gating_ops`) run them when a node's
implementation is "triton". CUDA tensors run compiled kernels; with TRITON_INTERPRET=1 (read at
launch time, so setting it after import works) any tensors run in Triton's CPU interpreter.
`LAUNCHES` counts the launches per kernel (tests use it to prove the Triton path ran).
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Kernels (plain functions; `_kernel` turns them into JIT or interpreted Triton functions)
# --------------------------------------------------------------------------------------------


def _gate_kernel(logits_ptr, expert_ptr, rank_ptr, hist_ptr, S, E, NB, stride_s,
                 K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < S
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :], mask=m2,
                other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))  # rows past S read zeros: finite, masked below
    mx = tl.max(x, axis=1)
    ex = tl.where(cmask[None, :], tl.exp(x - mx[:, None]), 0.0)
    p = ex / tl.sum(ex, axis=1)[:, None]
    p = tl.where(cmask[None, :], p, -1.0)  # padding columns below every probability
    col2 = cols[None, :] + tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int32)
    rows64 = rows.to(tl.int64)
    if K == 2:
        # first choice: argmax of the probabilities; second: argmax of the logits without it.
        e0 = tl.argmax(p, axis=1, tie_break_left=True)
        x1 = tl.where(col2 == e0[:, None], float("-inf"), x)
        e1 = tl.argmax(x1, axis=1, tie_break_left=True)
        # group 0 = first choices, group 1 = second choices (ranked after all of group 0)
        oh0 = ((col2 == e0[:, None]) & rmask[:, None]).to(tl.int32)
        before0 = tl.cumsum(oh0, axis=0) - oh0
        tl.store(expert_ptr + rows64 * 2, e0.to(tl.int64), mask=rmask)
        tl.store(rank_ptr + rows64 * 2, tl.sum(tl.where(oh0 > 0, before0, 0), axis=1), mask=rmask)
        tl.store(hist_ptr + pid * E + cols, tl.sum(oh0, axis=0), mask=cmask)
        oh1 = ((col2 == e1[:, None]) & rmask[:, None]).to(tl.int32)
        before1 = tl.cumsum(oh1, axis=0) - oh1
        tl.store(expert_ptr + rows64 * 2 + 1, e1.to(tl.int64), mask=rmask)
        tl.store(rank_ptr + rows64 * 2 + 1, tl.sum(tl.where(oh1 > 0, before1, 0), axis=1), mask=rmask)
        tl.store(hist_ptr + (NB + pid) * E + cols, tl.sum(oh1, axis=0), mask=cmask)
    else:
        # top-1 / top-k: the k largest probabilities (ties to the lowest index); slots in token order
        which = tl.full([BLOCK_S, BLOCK_E], -1, dtype=tl.int32)  # choice index j of each taken cell
        for j in tl.static_range(K):
            e = tl.argmax(p, axis=1, tie_break_left=True)
            hit = col2 == e[:, None]
            which = tl.where(hit, j, which)
            p = tl.where(hit, -1.0, p)
            tl.store(expert_ptr + rows64 * K + j, e.to(tl.int64), mask=rmask)
        taken = ((which >= 0) & rmask[:, None]).to(tl.int32)
        before = tl.cumsum(taken, axis=0) - taken
        for j in tl.static_range(K):
            rank = tl.sum(tl.where(which == j, before, 0), axis=1)
            tl.store(rank_ptr + rows64 * K + j, rank, mask=rmask)
        tl.store(hist_ptr + pid * E + cols, tl.sum(taken, axis=0), mask=cmask)


def _slot_kernel(expert_ptr, rank_ptr, hist_ptr, slot_ptr, counts_ptr, S, E, NB, capacity,
                 K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    # exclusive scan of the block histograms, per expert: tokens of earlier blocks come first
    before0 = tl.zeros([BLOCK_E], dtype=tl.int32)
    total0 = tl.zeros([BLOCK_E], dtype=tl.int32)
    before1 = tl.zeros([BLOCK_E], dtype=tl.int32)
    total1 = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        m = (bs < NB)[:, None] & cmask[None, :]
        earlier = (bs < pid)[:, None]
        h0 = tl.load(hist_ptr + bs[:, None] * E + cols[None, :], mask=m, other=0)
        total0 += tl.sum(h0, axis=0)
        before0 += tl.sum(tl.where(earlier, h0, 0), axis=0)
        if K == 2:
            h1 = tl.load(hist_ptr + (NB + bs)[:, None] * E + cols[None, :], mask=m, other=0)
            total1 += tl.sum(h1, axis=0)
            before1 += tl.sum(tl.where(earlier, h1, 0), axis=0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < S
    rows64 = rows.to(tl.int64)
    for j in tl.static_range(K):
        e = tl.load(expert_ptr + rows64 * K + j, mask=rmask, other=0)
        r = tl.load(rank_ptr + rows64 * K + j, mask=rmask, other=0)
        start_e = before0
        if K == 2:
            if j == 1:
                start_e = total0 + before1  # second choices queue behind all first choices
        oh = cols[None, :] == e[:, None].to(tl.int32)
        pos = (r + tl.sum(tl.where(oh, start_e[None, :], 0), axis=1)).to(tl.int64)
        keep = (pos < capacity) | (capacity < 0)
        tl.store(slot_ptr + rows64 * K + j, tl.where(keep, pos, -1), mask=rmask)
    if pid == 0:
        total = (total0 + total1).to(tl.int64)
        if capacity >= 0:
            total = tl.minimum(total, capacity)
        tl.store(counts_ptr + cols, total, mask=cmask)


def _dispatch_kernel(x_ptr, expert_ptr, slot_ptr, scale_ptr, counts_ptr, out_ptr, S, D, C, NTB, NCH,
                     K: tl.constexpr, HAS_SCALE: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Programs [0, NTB): copy a block of tokens to their k buffer rows (each token read once).
    Programs [NTB, NTB + E * NCH): zero the empty rows of one chunk of one expert's buffer
    (kept slots of expert e are exactly 0 .. counts[e] - 1, so empty rows are a suffix)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if pid < NTB:
        rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        rmask = rows < S
        rows64 = rows.to(tl.int64)
        v = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        for j in tl.static_range(K):
            e = tl.load(expert_ptr + rows64 * K + j, mask=rmask, other=0)
            sl = tl.load(slot_ptr + rows64 * K + j, mask=rmask, other=-1)
            kept = rmask & (sl >= 0)
            r = tl.where(kept, e * C + sl, 0)
            if HAS_SCALE:
                acc_t = tl.float64 if ACC_F64 else tl.float32
                sc = tl.load(scale_ptr + rows64 * K + j, mask=kept, other=0.0).to(acc_t)
                val = (v.to(acc_t) * sc[:, None]).to(out_ptr.dtype.element_ty)
            else:
                val = v.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + r[:, None] * D + cols[None, :], val, mask=kept[:, None] & cmask[None, :])
    else:
        z = pid - NTB
        ez = z // NCH
        cz = (z % NCH) * BLOCK_S + tl.arange(0, BLOCK_S)
        cnt = tl.load(counts_ptr + ez)
        empty = (cz < C) & (cz >= cnt)
        rz = ez.to(tl.int64) * C + cz
        zero = tl.zeros([BLOCK_S, BLOCK_D], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + rz[:, None] * D + cols[None, :], zero, mask=empty[:, None] & cmask[None, :])


def _combine_kernel(y_ptr, expert_ptr, slot_ptr, w_ptr, out_ptr, S, D, C,
                    K: tl.constexpr, HAS_W: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < S
    cmask = cols < D
    rows64 = rows.to(tl.int64)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=acc_t)
    for j in tl.static_range(K):
        e = tl.load(expert_ptr + rows64 * K + j, mask=rmask, other=0)
        sl = tl.load(slot_ptr + rows64 * K + j, mask=rmask, other=-1)
        kept = rmask & (sl >= 0)
        r = tl.where(kept, e * C + sl, 0)
        v = tl.load(y_ptr + r[:, None] * D + cols[None, :], mask=kept[:, None] & cmask[None, :], other=0.0)
        v = v.to(acc_t)
        if HAS_W:
            w = tl.load(w_ptr + rows64 * K + j, mask=kept, other=0.0).to(acc_t)
            v = v * w[:, None]
        acc += v
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _route_dot_kernel(a_ptr, b_ptr, expert_ptr, slot_ptr, out_ptr, S, D, C,
                      K: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < S
    rows64 = rows.to(tl.int64)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    for j in tl.static_range(K):
        e = tl.load(expert_ptr + rows64 * K + j, mask=rmask, other=0)
        sl = tl.load(slot_ptr + rows64 * K + j, mask=rmask, other=-1)
        kept = rmask & (sl >= 0)
        r = tl.where(kept, e * C + sl, 0)
        acc = tl.zeros([BLOCK_S], dtype=acc_t)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = kept[:, None] & (cols < D)[None, :]
            av = tl.load(a_ptr + rows64[:, None] * D + cols[None, :], mask=m, other=0.0).to(acc_t)
            bv = tl.load(b_ptr + r[:, None] * D + cols[None, :], mask=m, other=0.0).to(acc_t)
            acc += tl.sum(av * bv, axis=1)
        tl.store(out_ptr + rows64 * K + j, acc.to(out_ptr.dtype.element_ty), mask=rmask)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------

_BUILT: dict = {}
LAUNCHES: collections.Counter = collections.Counter()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel(fn):
    """`fn` as a Triton kernel: interpreted when TRITON_INTERPRET=1 (checked now), else JIT-compiled."""
    key = (fn.__name__, _interpreting())
    kern = _BUILT.get(key)
    if kern is None:
        if key[1]:
            from triton.runtime.interpreter import InterpretedFunction

            kern = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            kern = JITFunction(fn)
        _BUILT[key] = kern
    return kern


_INTERPRETED_STD: dict = {}


@contextlib.contextmanager
def _interpretable_language():
    """Make triton.language's own @jit helpers (tl.max, tl.cumsum, ...) runnable by the interpreter.

    Triton decides at import time whether those helpers are JIT or interpreted functions; when
    it was imported before TRITON_INTERPRET=1 was set (e.g. by another test in the same
    process), an interpreted kernel calling tl.max would fail with "Cannot call @triton.jit'd
    outside of the scope of a kernel". While a kernel is interpreted, swap them for interpreted
    twins (one per helper, so the interpreter's identity checks on combine functions hold).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = []
    for mod in (tl, tl.standard, tl.random):
        for name, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                twin = _INTERPRETED_STD.get(id(val))
                if twin is None:
                    twin = _INTERPRETED_STD[id(val)] = (val, InterpretedFunction(val.fn))
                saved.append((mod, name, val))
                setattr(mod, name, twin[1])
    try:
        yield
    finally:
        for mod, name, val in reversed(saved):
            setattr(mod, name, val)


def _launch(fn, grid, *args, **kwargs):
    """Run kernel `fn` on `grid` (compiled, or interpreted when TRITON_INTERPRET=1)."""
    LAUNCHES[fn.__name__] += 1
    if _interpreting():
        with _interpretable_language():
            _kernel(fn)[grid](*args, **kwargs)
    else:
        _kernel(fn)[grid](*args, **kwargs)


def can_run(t: Tensor) -> bool:
    """Whether the kernels can run on `t`'s device here (CUDA, or any device when interpreting)."""
    return t.device.type == "cuda" or _interpreting()


def _gate_block(E: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(max(E, 1))
    block_s = max(16, min(128, 8192 // block_e))
    return block_s, block_e


def _rows_blocks(D: int) -> tuple[int, int]:
    """(rows per program, columns per program) of the row-moving kernels."""
    if _interpreting():  # every program costs ~ms in the interpreter: few, large programs
        return 64, triton.next_power_of_2(max(D, 1))
    block_d = min(triton.next_power_of_2(max(D, 1)), 1024)
    return max(1, 8192 // block_d), block_d


def _acc_f64(*tensors: Optional[Tensor]) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def gate_table_triton(logits: Tensor, k: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    S, E = logits.shape
    dev = logits.device
    expert = torch.empty(S, k, dtype=torch.int64, device=dev)
    slot = torch.empty(S, k, dtype=torch.int64, device=dev)
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    if S == 0:
        return expert, slot, counts.zero_()
    logits = logits.contiguous()
    block_s, block_e = _gate_block(E)
    nb = triton.cdiv(S, block_s)
    rank = torch.empty(S, k, dtype=torch.int32, device=dev)
    hist = torch.empty((2 if k == 2 else 1) * nb, E, dtype=torch.int32, device=dev)
    _launch(_gate_kernel, (nb,), logits, expert, rank, hist, S, E, nb, logits.stride(0),
            K=k, BLOCK_S=block_s, BLOCK_E=block_e)
    block_b = max(1, min(triton.next_power_of_2(nb), 4096 // block_e))
    _launch(_slot_kernel, (nb,), expert, rank, hist, slot, counts, S, E, nb, capacity,
            K=k, BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_B=block_b)
    return expert, slot, counts


def dispatch_triton(tokens: Tensor, expert: Tensor, slot: Tensor, counts: Tensor, scale: Optional[Tensor],
                     E: int, C: int) -> Tensor:
    S, D = tokens.shape
    k = slot.shape[1]
    out = torch.empty(E, C, D, dtype=tokens.dtype, device=tokens.device)
    if E * C == 0 or D == 0:
        return out
    block_r, block_d = _rows_blocks(D)
    ntb, nch = triton.cdiv(S, block_r), triton.cdiv(C, block_r)
    grid = (ntb + E * nch, triton.cdiv(D, block_d))
    sc = scale.contiguous() if scale is not None else counts  # dummy pointer when unused
    _launch(_dispatch_kernel, grid, tokens.contiguous(), expert.contiguous(), slot.contiguous(), sc,
            counts.contiguous(), out, S, D, C, ntb, nch, K=k, HAS_SCALE=scale is not None,
            ACC_F64=_acc_f64(tokens, scale), BLOCK_S=block_r, BLOCK_D=block_d)
    return out


def combine_triton(expert_out: Tensor, expert: Tensor, slot: Tensor, weight: Optional[Tensor]) -> Tensor:
    E, C, D = expert_out.shape
    S, k = slot.shape
    out = torch.empty(S, D, dtype=expert_out.dtype, device=expert_out.device)
    if S == 0 or D == 0:
        return out
    block_r, block_d = _rows_blocks(D)
    grid = (triton.cdiv(S, block_r), triton.cdiv(D, block_d))
    w = weight.contiguous() if weight is not None else slot  # dummy pointer when unused
    _launch(_combine_kernel, grid, expert_out.contiguous(), expert.contiguous(), slot.contiguous(), w, out, S, D, C,
            K=k, HAS_W=weight is not None, ACC_F64=_acc_f64(expert_out, weight), BLOCK_S=block_r, BLOCK_D=block_d)
    return out


def route_dot_triton(a: Tensor, b: Tensor, expert: Tensor, slot: Tensor) -> Tensor:
    E, C, D = b.shape
    S, k = slot.shape
    out = torch.empty(S, k, dtype=_dot_dtype(a, b), device=a.device)
    if S == 0:
        return out
    if D == 0:
        return out.zero_()
    block_s = 64 if not _interpreting() else 256
    block_d = min(triton.next_power_of_2(D), 128 if not _interpreting() else 1024)
    _launch(_route_dot_kernel, (triton.cdiv(S, block_s),), a.contiguous(), b.contiguous(), expert.contiguous(),
            slot.contiguous(), out, S, D, C, K=k, ACC_F64=_acc_f64(a, b), BLOCK_S=block_s, BLOCK_D=block_d)
    return out


def _dot_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
