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

The variants run interleaved (A B C D E, several rounds), one thread. The decode benchmark's bound
(bench_generate.py) divides the bytes a step must read by the copy rate; a layout that reads at
half that rate puts even the dense model's step at about 2x its bound.

A second table gives, by rows per product M, the time of nn.Linear's layout over the long-rows
layout (the weight stored with its longer dimension contiguous, moefx.gen.weight_layout).

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
    by_rows = _rows_table(d, f, n, args.rounds)
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
        table(by_rows, list(by_rows[0])), ""])
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


def _rows_table(d: int, f: int, n: int, rounds: int) -> list[dict]:
    """Row-major / long-rows time ratio of F.linear for [out, in] = [f, d] (an up projection) and
    [8 f, d] (an LM head), by rows M of the input (interleaved per M)."""
    out = []
    for o, i, label in ((f, d, f"up [{f}, {d}]"), (8 * f, d, f"head [{8 * f}, {d}]")):
        count = max(2, n * f // o)
        row_major = [torch.randn(o, i) for _ in range(count)]
        long_rows = [torch.randn(i, o).t() for _ in range(count)]
        row = {"matrix (nn.Linear [out, in])": label}
        for M in (1, 2, 4, 8, 16, 32):
            x = torch.randn(M, i)
            t = {"r": [], "l": []}
            with torch.no_grad():
                for _ in range(rounds):
                    for key, mats in (("r", row_major), ("l", long_rows)):
                        t0 = time.perf_counter()
                        for w in mats:
                            F.linear(x, w)
                        t[key].append(time.perf_counter() - t0)
            row[f"M={M}"] = statistics.median(t["r"]) / statistics.median(t["l"])
        out.append(row)
    return out


if __name__ == "__main__":
    main()
