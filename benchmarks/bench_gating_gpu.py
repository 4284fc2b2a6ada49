"""Gate + dispatch + combine on a CUDA GPU: Triton kernels vs the torch path vs the one-hot einsum.

For each (E, k) at S tokens of width d: times (CUDA events, median) of
  gate      route(): Triton = fused softmax/top-k/position kernels; torch = the torch path;
            einsum = the one-hot [S, E, C] gate of DeepSpeed-MoE's paper
  dispatch  tokens [S, d] -> [E, C, d]
  combine   [E, C, d] -> [S, d], weighted
and the achieved bandwidth of the Triton dispatch / combine (bytes they must read and write,
divided by their time) as a fraction of the card's copy bandwidth, measured in the same run by
a device-to-device copy of the same number of bytes.

Writes benchmarks/results/gating_gpu_<card>.md (and .csv) and prints the table.

    python benchmarks/bench_gating_gpu.py                  # S=16384, d=4096, E in {8, 64}, k in {1, 2}, bf16
    python benchmarks/bench_gating_gpu.py --dry-run        # tiny sizes, CPU, TRITON_INTERPRET=1 (logic check)
"""
from __future__ import annotations

import sys

import os

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench_gating_cpu import einsum_combine, einsum_dispatch, onehot_gate  # noqa: E402

from moefx.nn.routing import combine, dispatch, expert_capacity, route  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timer(device: str, warmup: int, reps: int):
    """Returns f(fn) -> median ms of fn() (CUDA events on a GPU, perf_counter on the CPU)."""
    def run(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def throughput_ms(fn, device: str, n: int = 20) -> float:
    """Mean time per call of n back-to-back calls (launch latency hidden behind the GPU's work)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def copy_ms(nbytes: int, device: str, t) -> float:
    """Time of a device-to-device copy that reads nbytes and writes nbytes."""
    n = max(nbytes // 4, 1)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return t(lambda: dst.copy_(src))


def run_point(S, E, k, d, dtype, cf, device, t, einsum_mem_gb):
    g = torch.Generator(device="cpu").manual_seed(S + E + k)
    logits = torch.randn(S, E, generator=g).to(device)
    tokens = torch.randn(S, d, generator=g).to(device=device, dtype=dtype)
    C = expert_capacity(S, E, k, cf, 4)
    esz = tokens.element_size()
    row = {"E": E, "k": k, "C": C}

    rt = route(logits, top_k=k, capacity_factor=cf, min_capacity=4, impl="triton")
    rp = route(logits, top_k=k, capacity_factor=cf, min_capacity=4, impl="torch")
    same = (rt.capacity == rp.capacity and torch.equal(rt.expert, rp.expert) and torch.equal(rt.slot, rp.slot)
            and torch.equal(rt.weight, rp.weight))
    buf_t = dispatch(tokens, rt, E, impl="triton")
    buf_p = dispatch(tokens, rp, E, impl="torch")
    out_t = combine(buf_t, rt, impl="triton")
    out_p = combine(buf_p, rp, impl="torch")
    same = same and torch.equal(buf_t, buf_p) and torch.allclose(out_t.float(), out_p.float(), rtol=1e-2, atol=1e-2)
    row["triton == torch"] = "yes" if same else "NO"

    for impl in ("triton", "torch"):
        r = rt if impl == "triton" else rp
        buf = buf_t if impl == "triton" else buf_p
        row[f"{impl} gate"] = t(lambda: route(logits, top_k=k, capacity_factor=cf, min_capacity=4, impl=impl))
        row[f"{impl} dispatch"] = t(lambda: dispatch(tokens, r, E, impl=impl))
        row[f"{impl} combine"] = t(lambda: combine(buf, r, impl=impl))

    kept = int((rt.slot >= 0).sum())
    disp_bytes = (S + E * C) * d * esz  # read every token row once, write every buffer row
    comb_bytes = (kept + S) * d * esz  # read the kept expert rows, write every token row
    row["dispatch back-to-back"] = throughput_ms(lambda: dispatch(tokens, rt, E, impl="triton"), device)
    row["combine back-to-back"] = throughput_ms(lambda: combine(buf_t, rt, impl="triton"), device)
    row["dispatch GB/s"] = disp_bytes / row["dispatch back-to-back"] / 1e6
    row["combine GB/s"] = comb_bytes / row["combine back-to-back"] / 1e6
    # a copy that reads and writes the same total bytes: half of them each way
    row["copy ms (disp bytes)"] = copy_ms(disp_bytes // 2, device, t)
    row["copy ms (comb bytes)"] = copy_ms(comb_bytes // 2, device, t)
    row["dispatch % copy"] = 100 * row["copy ms (disp bytes)"] / row["dispatch back-to-back"]
    row["combine % copy"] = 100 * row["copy ms (comb bytes)"] / row["combine back-to-back"]

    if 3 * S * E * C * esz > einsum_mem_gb * 2**30:
        row["einsum gate"] = row["einsum dispatch"] = row["einsum combine"] = "skipped (memory)"
    else:
        cw, mask = onehot_gate(logits, k, cf, 4)
        cw, ebuf = cw.to(dtype), None
        row["einsum gate"] = t(lambda: onehot_gate(logits, k, cf, 4))
        row["einsum dispatch"] = t(lambda: einsum_dispatch(mask, tokens))
        row["einsum combine"] = t(lambda: einsum_combine(cw, buf_t))
        del cw, mask, ebuf
    tri = row["triton gate"] + row["triton dispatch"] + row["triton combine"]
    row["triton total"] = tri
    row["torch total / triton"] = (row["torch gate"] + row["torch dispatch"] + row["torch combine"]) / tri
    if isinstance(row["einsum gate"], float):
        row["einsum total / triton"] = (row["einsum gate"] + row["einsum dispatch"] + row["einsum combine"]) / tri
    return row


COLS = ["E", "k", "C", "triton == torch", "triton gate", "torch gate", "einsum gate", "triton dispatch",
        "torch dispatch", "einsum dispatch", "triton combine", "torch combine", "einsum combine", "triton total",
        "torch total / triton", "einsum total / triton", "dispatch back-to-back", "dispatch GB/s", "dispatch % copy",
        "combine back-to-back", "combine GB/s",
        "combine % copy", "copy ms (disp bytes)", "copy ms (comb bytes)"]


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--E", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--k", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--einsum-mem-gb", type=float, default=24.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for gating_gpu_<card>.md/.csv")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on the CPU with TRITON_INTERPRET=1, to check the script's logic")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, card = "cpu", "dryrun-cpu-interpreter"
        args.S, args.d, args.warmup, args.reps = 256, 64, 1, 2
        if args.out == os.path.join(HERE, "results"):
            args.out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "moefx_bench_dryrun")
        dtype = torch.float32 if args.dtype == "bf16" else DTYPES[args.dtype]  # numpy has no bf16
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run to check the logic on the CPU", file=sys.stderr)
            return 2
        device, card = "cuda", torch.cuda.get_device_name()
        dtype = DTYPES[args.dtype]
    t = timer(device, args.warmup, args.reps)
    big = copy_ms(1 << 30, device, t) if device == "cuda" else copy_ms(1 << 24, device, t)
    nbig = (1 << 30) if device == "cuda" else (1 << 24)
    copy_bw = 2 * nbig / big / 1e6  # GB/s, counting bytes read and written
    print(f"# {card}: S={args.S}, d={args.d}, {args.dtype}, capacity_factor={args.capacity_factor}; "
          f"times in ms (median of {args.reps}); copy bandwidth {copy_bw:.0f} GB/s (read + write)", flush=True)

    rows = []
    for E in args.E:
        for k in args.k:
            row = run_point(args.S, E, k, args.d, dtype, args.capacity_factor, device, t, args.einsum_mem_gb)
            rows.append(row)
            print("  ", {c: fmt(row.get(c, "")) for c in COLS if c in row}, flush=True)

    timing = "CUDA events" if device == "cuda" else "perf_counter, Triton interpreter: not a measurement"
    header = (f"# Gating kernels on {card}\n\nS={args.S}, d={args.d}, dtype={str(dtype).replace('torch.', '')}, "
              f"capacity_factor={args.capacity_factor}, torch {torch.__version__}. Times in ms (median of "
              f"{args.reps} after {args.warmup} warm-ups, {timing}) of one call each, launch latency included; "
              f"'back-to-back' = mean time per call of 20 consecutive calls. Bandwidth = bytes the op must read "
              f"and write / its back-to-back time; '% copy' = time of a device-to-device copy of the same bytes / "
              f"that time "
              f"(large-copy bandwidth on this card: {copy_bw:.0f} GB/s counting read + write).\n\n")
    lines = ["| " + " | ".join(COLS) + " |", "|" + "|".join("---" for _ in COLS) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLS) + " |" for r in rows]
    md = header + "\n".join(lines) + "\n"
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    path = os.path.join(args.out, f"gating_gpu_{slug}")
    with open(path + ".md", "w") as f:
        f.write(md)
    with open(path + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLS})
    print(f"wrote {path}.md and {path}.csv")
    return 0 if all(r["triton == torch"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
