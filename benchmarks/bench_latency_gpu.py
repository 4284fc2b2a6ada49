"""Single-GPU inference latency: converted PR-MoE vs the dense model it came from.

Builds a GPT-2 (random init, from a config) on the GPU, converts it with a PR-MoE plan (residual,
top-1, pyramid) with gating lowered to Triton and to the PyTorch path, and times forward passes
(bf16, CUDA events, median of repeats) for a few batch shapes. Prints a table of latencies and
ratios against the dense model measured in the same run, and writes it to
benchmarks/results/latency_gpu_<card>.md.

    python benchmarks/bench_latency_gpu.py [--layers 12 --d 768 --experts 16x5+32x1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import moefx
from moefx.fileio import write_atomic


def timed(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--experts", default="16x5+32x1")
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_latency_gpu needs a CUDA device")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    dev = torch.device("cuda")
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.d, n_head=args.d // 64, vocab_size=50257, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    dense = GPT2LMHeadModel(cfg).to(dev, torch.bfloat16).eval()
    dense.config.use_cache = False
    example = torch.randint(0, 50257, (2, 64), device=dev)
    plans = {}
    for impl in ("triton", "torch"):
        plan = {"moe": {"experts": args.experts, "every": 2, "top_k": 1, "residual": True, "drop_tokens": False},
                "lowering": {"gating": impl}}
        plans[impl] = moefx.convert(dense, plan, (example,), copy_weights=False)
    counts = moefx.count_params(plans["triton"])
    with torch.no_grad():  # the lowered graphs compute the same function
        ids = torch.randint(0, 50257, (4, 256), device=dev)
        a, b, ref = plans["triton"](ids).logits.float(), plans["torch"](ids).logits.float(), dense(ids).logits.float()
    check = (f"max |triton - torch| = {(a - b).abs().max().item():.3g}, "
             f"max |PR-MoE - dense| = {(a - ref).abs().max().item():.3g} (bf16, output scale "
             f"{ref.abs().max().item():.3g})")
    print(check)
    rows = []
    for batch, seq in ((1, 128), (8, 128), (8, 512), (32, 512)):
        ids = torch.randint(0, 50257, (batch, seq), device=dev)
        with torch.no_grad():
            t_dense = timed(lambda: dense(ids))
            t_tri = timed(lambda: plans["triton"](ids))
            t_torch = timed(lambda: plans["torch"](ids))
        rows.append((batch, seq, t_dense, t_tri, t_torch))
    lines = [f"# Single-GPU latency, {card}", "",
             f"GPT-2 {args.layers} layers d={args.d} dense ({moefx.count_params(dense)}) vs PR-MoE {args.experts} "
             f"every 2, residual, top-1, dropless ({counts}); bf16, median of 20 forwards", "", check, "",
             "| batch x seq | dense ms | PR-MoE triton ms | PR-MoE torch ms | triton / dense | torch / dense |",
             "|---|---:|---:|---:|---:|---:|"]
    for b, s, td, tt, tp in rows:
        lines.append(f"| {b} x {s} | {td:.2f} | {tt:.2f} | {tp:.2f} | {tt / td:.2f}x | {tp / td:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    name = "latency_gpu_" + card.replace(" ", "_").replace("/", "_") + ".md"
    write_atomic(Path(__file__).parent / "results" / name, text)
    if args.out:
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()
