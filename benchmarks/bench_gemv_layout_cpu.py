"""Batch-1 decode reads every weight matrix once: how fast does this CPU stream a matrix through a
matrix-vector product, by layout, against a plain memory copy? A script, not a test.

For an FFN of width d and inner size f, each variant multiplies one row vector by 24 distinct
fp32 matrices (96 MB, far more than the caches hold, so every read comes from memory) and reports
the read rate (matrix bytes / time) and its ratio to the copy rate measured in the same rounds
(dst.copy_(src) on 512 MB, counted as read + write):

    up   [f, d] nn.Linear       F.linear(x [1, d], W [f, d])      (rows of d floats)
    up   [d, f] stacked expert  torch.mm(x [1, d], W [d, f])      (rows of f floats)
    down [d, f] nn.Linear       F.linear(h [1, f], W [d, f])      (rows of f floats)
    down [f, d] stacked expert  torch.mm(h [1, f], W [f, d])      (rows of d floats)
    up / down nn.Linear         compiled linear_by_reduction       (moefx.nn.products: one
                                 torch.compile'd call for all 24 matrices, inductor's loops)

The variants run interleaved (A B C D E, several rounds), one thread. The decode benchmark's bound
(bench_generate.py) divides the bytes a step must read by the copy rate; a layout that reads at
half that rate puts even the dense model's step at about 2x its bound.

A second table gives, by rows per product M, the time of nn.Linear's layout over the long-rows
layout (the weight stored with its longer dimension contiguous, moefx.gen.weight_layout); a third,
the faster of those two over a compiled reduction (moefx.nn.products.linear_by_reduction under
torch.compile, inductor) on nn.Linear's layout: where the compiled decode step's products change.
The compiled variants make one call for all the matrices while the MKL ones make one Python call per
matrix (a few microseconds each, as an eager decode step does), which favours the reductions a little.

    python benchmarks/bench_gemv_layout_cpu.py            # writes results/gemv_layout_cpu.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _timing import load_note, table  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
from moefx.nn.products import linear_by_reduction  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--f", type=int, default=2048)
    ap.add_argument("--mats", type=int, default=24, help="distinct matrices per variant (cold reads)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--copy-mb", type=int, default=512)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "gemv_layout_cpu.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d, f, n = args.d, args.f, args.mats
    x, h = torch.randn(1, d), torch.randn(1, f)
    variants = {
        "up [f, d] nn.Linear: F.linear(x, W)": (lambda w: F.linear(x, w), [torch.randn(f, d) for _ in range(n)]),
        "up [d, f] stacked expert: mm(x, W)": (lambda w: torch.mm(x, w), [torch.randn(d, f) for _ in range(n)]),
        "down [d, f] nn.Linear: F.linear(h, W)": (lambda w: F.linear(h, w), [torch.randn(d, f) for _ in range(n)]),
        "down [f, d] stacked expert: mm(h, W)": (lambda w: torch.mm(h, w), [torch.randn(f, d) for _ in range(n)]),
    }
    reduce_up = torch.compile(_all_by_reduction, fullgraph=True, dynamic=False)
    reduce_down = torch.compile(_all_by_reduction, fullgraph=True, dynamic=False)
    variants["up [f, d] nn.Linear: compiled linear_by_reduction(x, W)"] = (
        lambda ws: reduce_up(x, *ws), [[torch.randn(f, d) for _ in range(n)]])
    variants["down [d, f] nn.Linear: compiled linear_by_reduction(h, W)"] = (
        lambda ws: reduce_down(h, *ws), [[torch.randn(d, f) for _ in range(n)]])
    with torch.no_grad():
        for fn, mats in list(variants.values())[-2:]:
            fn(mats[0])                                  # compile before timing
    numel = args.copy_mb * 2**20 // 4
    src, dst = torch.randn(numel), torch.empty(numel)
    times: dict[str, list[float]] = {k: [] for k in variants}
    times["copy"] = []
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (fn, mats) in variants.items():
                t0 = time.perf_counter()
                for w in mats:
                    fn(w)
                times[name].append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            dst.copy_(src)
            times["copy"].append(time.perf_counter() - t0)
    copy_gbs = 2 * numel * 4 / statistics.median(times["copy"]) / 1e9
    by_rows, by_rows_reduction = _rows_table(d, f, n, args.rounds)
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        gbs = d * f * 4 / t / 1e9
        rows.append({"variant": name, "us / matrix": t * 1e6, "read GB/s": gbs, "vs copy rate": gbs / copy_gbs})
    text = "\n".join([
        "# Matrix-vector products by weight layout vs a memory copy (CPU, one thread)", "",
        f"Command: `python benchmarks/bench_gemv_layout_cpu.py` (d {d}, f {f}, {n} distinct fp32 matrices per "
        f"variant, median of {args.rounds} interleaved rounds).", "",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} logical CPUs; "
        + load_note(), f"- copy rate: {copy_gbs:.1f} GB/s (read + write of {args.copy_mb} MB)", "",
        table(rows, list(rows[0])), "",
        "By rows per product (what moefx.gen.weight_layout's \"auto\" rule rests on): F.linear(x [M, in], W) "
        "time with W stored [out, in] (nn.Linear) divided by the time with the same W stored [in, out] "
        "(the longer dimension contiguous, `long_rows`); > 1: long rows faster. Interleaved, median of "
        f"{args.rounds} rounds.", "",
        table(by_rows, list(by_rows[0])), "",
        "By rows per product, compiled reductions (what `Generator.compile(products=\"auto\")` and "
        "`moefx.passes.reduce_products.REDUCE_MAX_ROWS` rest on): the faster of F.linear's two layouts divided by "
        "`torch.compile(moefx.nn.products.linear_by_reduction)` on the nn.Linear layout (the summed dimension "
        "contiguous), one compiled call for all the matrices (as a decode step makes one call for all its "
        "products); > 1: the reduction faster.", "",
        table(by_rows_reduction, list(by_rows_reduction[0])), ""])
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


def _all_by_reduction(x, *weights):
    return [linear_by_reduction(x, w) for w in weights]


def _rows_table(d: int, f: int, n: int, rounds: int) -> tuple[list[dict], list[dict]]:
    """By rows M of the input, for [out, in] = [f, d] (an up projection) and [8 f, d] (an LM head),
    interleaved per M: (row-major / long-rows time ratio of F.linear, best-of-both-layouts F.linear
    time / compiled `linear_by_reduction` time on row-major weights)."""
    layout, reduction = [], []
    for o, i, label in ((f, d, f"up [{f}, {d}]"), (8 * f, d, f"head [{8 * f}, {d}]")):
        count = max(2, n * f // o)
        row_major = [torch.randn(o, i) for _ in range(count)]
        long_rows = [torch.randn(i, o).t() for _ in range(count)]
        row, red = {"matrix (nn.Linear [out, in])": label}, {"matrix (nn.Linear [out, in])": label}
        for M in (1, 2, 4, 8, 16, 32):
            x = torch.randn(M, i)
            t = {"r": [], "l": [], "c": []}
            torch._dynamo.reset()        # one static graph per shape, as a decode step has
            # one compiled call for all the matrices, as a decode step makes one for all its products
            compiled = torch.compile(_all_by_reduction, fullgraph=True, dynamic=False)
            with torch.no_grad():
                compiled(x, *row_major)                  # compile before timing
                for _ in range(rounds):
                    for key, mats in (("r", row_major), ("l", long_rows)):
                        t0 = time.perf_counter()
                        for w in mats:
                            F.linear(x, w)
                        t[key].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    compiled(x, *row_major)
                    t["c"].append(time.perf_counter() - t0)
            r, l, c = (statistics.median(t[k]) for k in "rlc")
            row[f"M={M}"] = r / l
            red[f"M={M}"] = min(r, l) / c
        layout.append(row)
        reduction.append(red)
    return layout, reduction


if __name__ == "__main__":
    main()
