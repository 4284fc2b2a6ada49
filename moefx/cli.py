"""The `moefx` command line: a thin wrapper over the library functions.

    moefx convert [MODEL] [--plan plan.toml]     convert, print the layer table, check vs dense
    moefx dump MODEL --plan plan.toml --format {code,table,dot,svg,json} [--stage ...] [--output F]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .errors import MoefxError
from .fileio import write_atomic


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    raise TypeError(f"cannot find a tensor in a {type(out).__name__} output")


def _load_plan(path: str | None):
    from .plan import Plan

    return Plan.from_file(path) if path else Plan.default()


def cmd_convert(args) -> int:
    """Convert MODEL with the plan, print the layer table and counts, compare with the dense model."""
    from .convert import convert
    from .count import count_params
    from .dump import layer_table
    from .models import load_model

    plan = _load_plan(args.plan)
    model, inputs = load_model(args.model, device=args.device, seed=args.seed)
    t0 = time.perf_counter()
    gm = convert(model, plan, inputs, dump_dir=args.dump_dir)
    seconds = time.perf_counter() - t0
    print(f"moefx convert {args.model}: {gm.meta.get('moefx_passes', [])} in {seconds:.2f} s\n")
    print(layer_table(gm))
    print(f"dense model: {count_params(model)}")
    if args.device == "meta":
        return 0
    with torch.no_grad():
        ref, out = _first_tensor(model(*inputs)), _first_tensor(gm(*inputs))
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    moe = plan.moe
    exact = moe is None or (moe.init == "upcycle" and not moe.drop_tokens and moe.init_noise == 0)
    print(f"\nmax |converted - dense| = {diff:.3g} (output scale {scale:.3g})")
    if exact:
        ok = diff <= 1e-5 * max(scale, 1.0)
        print("function preserved: " + ("yes" if ok else "NO"))
        return 0 if ok else 1
    print("(this plan drops tokens or re-initialises experts: outputs are expected to differ)")
    return 0


def cmd_dump(args) -> int:
    """Write a view of MODEL's graph at a stage (captured / converted / partitioned)."""
    from .capture import capture
    from .convert import convert
    from .dump import dump
    from .models import load_model

    plan = _load_plan(args.plan)
    model, inputs = load_model(args.model, device=args.device, seed=args.seed)
    if args.stage == "captured":
        gm = capture(model, inputs)
    else:
        gm = convert(model, plan, inputs, copy_weights=False)
        if args.stage == "partitioned":
            from .distribute import partitioned_view

            gm = partitioned_view(gm, plan, rank=args.rank)
    text = dump(gm, args.format)
    if args.output:
        write_atomic(args.output, text)
        print(f"wrote {args.output}")
    elif isinstance(text, bytes):
        sys.stdout.buffer.write(text)
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moefx", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, default=None):
        sp.add_argument("model", nargs="?" if default else None, default=default,
                        help="built-in name (gpt2-tiny, llama-tiny, bert-tiny, ...) or module:function")
        sp.add_argument("--plan", help="plan file (.toml / .json); default: moefx.Plan.default()")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or meta (meta: no memory, no numerics)")
        sp.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("convert", help="convert a model and check it against the dense one")
    model_args(c, default="gpt2-tiny")
    c.add_argument("--dump-dir", help="write the code after every pass into this folder")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("dump", help="print a graph as code, table, dot, svg or json")
    model_args(d)
    d.add_argument("--format", default="code", choices=["code", "table", "dot", "svg", "json"])
    d.add_argument("--stage", default="converted", choices=["captured", "converted", "partitioned"])
    d.add_argument("--rank", type=int, default=0, help="rank to show with --stage partitioned")
    d.add_argument("--output", "-o", help="write to this file (atomically) instead of stdout")
    d.set_defaults(func=cmd_dump)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moefx` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoefxError as e:
        print(f"moefx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
