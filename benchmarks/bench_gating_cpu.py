"""Gate + dispatch + combine on CPU: moefx's mapping table (torch path) vs the one-hot einsum.

The baseline is the formulation of DeepSpeed-MoE's paper (GShard's algorithm): the gate builds
combine_weights [S, E, C] and dispatch_mask [S, E, C] (one-hot over experts and capacity slots),
dispatch = einsum('sec,sm->ecm', dispatch_mask, tokens), combine = einsum('sec,ecm->sm',
combine_weights, expert_out). It costs O(S * E * C * d) = O(S^2 * k * d) flops; the mapping
table moves each token once, O(S * k * d).

Both sides route with the same semantics (argmax / second argmax, token-order positions,
capacity drops) and the script checks that their combined outputs agree. Experts are the
identity (expert_out = dispatched buffer), so only gating, dispatch and combine are timed.

    python benchmarks/bench_gating_cpu.py                 # full grid (several minutes: big einsums)
    python benchmarks/bench_gating_cpu.py --S 4096 --E 64 # one point
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import interleaved_ms, table  # noqa: E402

from moefx.nn.routing import combine, dispatch, expert_capacity, route  # noqa: E402


def onehot_gate(logits: torch.Tensor, k: int, capacity_factor: float, min_capacity: int):
    """GShard / DeepSpeed-paper gating in its one-hot form: (combine_weights, dispatch_mask), both [S, E, C]."""
    S, E = logits.shape
    probs = F.softmax(logits, dim=1)
    C = expert_capacity(S, E, k, capacity_factor, min_capacity)
    first = probs.argmax(dim=1)
    masks = [F.one_hot(first, E)]
    if k == 2:
        second = logits.masked_fill(masks[0].bool(), float("-inf")).argmax(dim=1)
        masks.append(F.one_hot(second, E))
    offset = torch.zeros(1, E, dtype=torch.long, device=logits.device)
    kept, locs = [], []
    for m in masks:  # second choices queue behind all first choices of their expert
        loc = torch.cumsum(m, dim=0) - 1 + offset
        offset = offset + m.sum(dim=0, keepdim=True)
        m = m * (loc < C)
        kept.append(m)
        locs.append((loc * m).sum(dim=1))
    gates = [(probs * m).sum(dim=1) for m in kept]
    if k == 2:
        denom = (gates[0] + gates[1]).clamp_min(torch.finfo(probs.dtype).eps)
        gates = [g / denom for g in gates]
    cw = None
    for g, m, loc in zip(gates, kept, locs):
        term = (g[:, None] * m)[:, :, None] * F.one_hot(loc, C).to(probs.dtype)[:, None, :]
        cw = term if cw is None else cw + term
    return cw, cw.bool()


def einsum_dispatch(mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.einsum("sec,sm->ecm", mask.type_as(tokens), tokens)


def einsum_combine(cw: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    return torch.einsum("sec,ecm->sm", cw.type_as(expert_out), expert_out)


def run_point(S: int, E: int, k: int, d: int, cf: float, mem_gb: float, budget_s: float) -> dict:
    g = torch.Generator().manual_seed(S + E + k)
    tokens = torch.randn(S, d, generator=g)
    logits = torch.randn(S, E, generator=g)
    C = expert_capacity(S, E, k, cf, 4)
    row = {"S": S, "E": E, "k": k, "C": C}

    r = route(logits, top_k=k, capacity_factor=cf, min_capacity=4, impl="torch")
    buf = dispatch(tokens, r, E, impl="torch")
    out = combine(buf, r, impl="torch")
    variants = {"moefx gate": lambda: route(logits, top_k=k, capacity_factor=cf, min_capacity=4, impl="torch"),
                "moefx dispatch": lambda: dispatch(tokens, r, E, impl="torch"),
                "moefx combine": lambda: combine(buf, r, impl="torch")}
    peak = 13 * S * E * C  # bytes: combine_weights + float mask + construction temporaries
    if peak > mem_gb * 2**30:
        row.update(interleaved_ms(variants, budget_s=budget_s))
        row["einsum gate"] = row["einsum dispatch"] = row["einsum combine"] = "skipped (memory)"
        return row
    cw, mask = onehot_gate(logits, k, cf, 4)
    ebuf = einsum_dispatch(mask, tokens)
    eout = einsum_combine(cw, ebuf)
    row["max |diff|"] = float((eout - out).abs().max())
    del ebuf, eout
    variants.update({"einsum gate": lambda: onehot_gate(logits, k, cf, 4),
                     "einsum dispatch": lambda: einsum_dispatch(mask, tokens),
                     "einsum combine": lambda: einsum_combine(cw, buf)})
    big = S * E * C * d > 5e10  # a few seconds per einsum: fewer rounds
    kw = dict(rounds=2, reps=1) if big else dict(rounds=5, reps=3)
    # interleaved (every variant in turn, round after round): a shared machine's drift hits all alike
    row.update(interleaved_ms(variants, budget_s=budget_s, **kw))
    moefx_dc = row["moefx dispatch"] + row["moefx combine"]
    row["x disp+comb"] = (row["einsum dispatch"] + row["einsum combine"]) / moefx_dc
    row["x total"] = (row["einsum gate"] + row["einsum dispatch"] + row["einsum combine"]) / (
        row["moefx gate"] + moefx_dc)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--E", type=int, nargs="*", default=[8, 64, 128])
    ap.add_argument("--k", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-gb", type=float, default=8.0, help="skip einsum points whose buffers exceed this")
    ap.add_argument("--budget-s", type=float, default=30.0, help="time budget per measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# gate + dispatch + combine, CPU, {args.threads} threads, d={args.d}, fp32, "
          f"capacity_factor={args.capacity_factor}; times in ms (median); x = einsum time / moefx time\n")
    rows = []
    for S in args.S:
        for E in args.E:
            for k in args.k:
                row = run_point(S, E, k, args.d, args.capacity_factor, args.mem_gb, args.budget_s)
                rows.append(row)
                print("  ", {c: (round(v, 3) if isinstance(v, float) else v) for c, v in row.items()}, flush=True)
    cols = ["S", "E", "k", "C", "moefx gate", "moefx dispatch", "moefx combine", "einsum gate", "einsum dispatch",
            "einsum combine", "x disp+comb", "x total", "max |diff|"]
    print()
    print(table(rows, cols))
    target = [r for r in rows if r["S"] == 4096 and r["E"] == 64 and args.d == 1024]
    for r in target:
        x = r.get("x disp+comb")
        if isinstance(x, float):
            print(f"\ntarget (S=4096, E=64, d=1024, k={r['k']}): dispatch+combine {x:.1f}x faster than einsum "
                  f"(goal >= 20x): {'met' if x >= 20 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
