"""Capture time of a windowed vision Transformer (Swin, random init): moefx's default dynamic shapes
(batch dimension only for pixel values) vs fully static shapes vs every dimension dynamic (what
`moefx.capture` did before: Dim.AUTO on every input dim). A script, not a test.

    python benchmarks/bench_capture.py                      # Swin 224 / window 7, 3 rounds
    python benchmarks/bench_capture.py --quick              # a small Swin, for a smoke run

"auto" and "static" are timed interleaved (ABAB, `--rounds` rounds, median); "all dims dynamic"
runs once in a subprocess with a time limit (`--all-dynamic-timeout`, default 600 s), since it can
take minutes. Each capture is followed by a conversion check: the converted model (top-2 MoE every
2nd block) must equal the dense one on a batch of another size. Results go to
benchmarks/results/capture_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from _timing import load_note  # noqa: E402  (the load average is taken at import)


def swin(quick: bool):
    import transformers as T

    if quick:
        cfg = T.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
                           num_labels=10)
    else:                                           # Swin-T's geometry, narrower
        cfg = T.SwinConfig(image_size=224, patch_size=4, embed_dim=48, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                           window_size=7, num_labels=10)
    torch.manual_seed(0)
    return T.SwinForImageClassification(cfg).eval(), cfg.image_size


def _all_dynamic(x: torch.Tensor):
    from torch.export import Dim

    return ({d: Dim.AUTO for d in range(x.dim())},)


def capture_once(mode: str, quick: bool) -> float:
    import moefx

    model, size = swin(quick)
    x = torch.randn(2, 3, size, size)
    shapes = {"auto": "auto", "static": None, "all-dynamic": _all_dynamic(x)}[mode]
    t0 = time.perf_counter()
    moefx.capture(model, (x,), dynamic_shapes=shapes)
    return time.perf_counter() - t0


def check_conversion(quick: bool) -> float:
    import moefx

    model, size = swin(quick)
    gm = moefx.convert(model, {"moe": {"experts": 4, "every": 2, "top_k": 2, "drop_tokens": False}},
                       (torch.randn(2, 3, size, size),))
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        return (gm(x).logits - model(x).logits).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small Swin")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of auto / static")
    p.add_argument("--all-dynamic-timeout", type=float, default=600.0, help="seconds for the all-dims run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=os.path.join(HERE, "results", "capture_cpu.md"))
    p.add_argument("--child", choices=("all-dynamic",), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.child:
        print(f"{capture_once(args.child, args.quick):.3f}")
        return
    times = {"auto": [], "static": []}
    for _ in range(args.rounds):
        for mode in times:
            times[mode].append(capture_once(mode, args.quick))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "all-dynamic", "--threads", str(args.threads)]
    cmd += ["--quick"] * args.quick
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.all_dynamic_timeout, check=True)
        all_dynamic = f"{float(out.stdout.strip().splitlines()[-1]):.1f} s"
    except subprocess.TimeoutExpired:
        all_dynamic = f"> {args.all_dynamic_timeout:.0f} s (stopped)"
    except subprocess.CalledProcessError as e:
        all_dynamic = f"failed: {(e.stderr or '').strip().splitlines()[-1:]}"
    diff = check_conversion(args.quick)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Capture time of a windowed vision Transformer (CPU)",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_capture.py', *sys.argv[1:]])}`; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads; "
        f"{'small Swin (64 px, window 4)' if args.quick else 'Swin-T geometry (224 px, window 7, depths 2-2-6-2, embed 48)'}, "
        f"random init. Auto / static interleaved, median of {args.rounds} rounds. {load_note()}",
        "",
        "| dynamic shapes | capture time | vs moefx default |",
        "|---|---|---|",
        f"| moefx default (\"auto\": batch dim of pixel values) | {med['auto']:.1f} s | 1.00 |",
        f"| static (`dynamic_shapes=None`) | {med['static']:.1f} s | {med['static'] / med['auto']:.2f} |",
        f"| every dim dynamic (moefx before) | {all_dynamic} | |",
        "",
        f"Converted (top-2 MoE every 2nd block) vs dense on a batch of 3: max |diff| = {diff:.2g}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
