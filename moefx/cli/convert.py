"""`moefx convert` and `moefx dump`: convert a model, print what it became, render its graph."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..capture import capture
from ..convert import convert
from ..count import count_params
from ..distribute import partitioned_view
from ..dump import dump, layer_table
from ..errors import MoefxError
from ..facts import facts
from ..fileio import write_atomic
from ..origin import example_inputs as rebuild_inputs
from ..origin import rebuild_model
from ..outputs import main_tensor
from ..passes.base import TARGETS
from ..plan import Plan
from ..runtime.build import dense_model
from ..runtime.run_model import spec_and_plan
from ..saving import WEIGHTS
from ..saving import read as read_saved
from .common import check_device, load_plan, model_args


def dense_and_plan(args) -> tuple:
    """(dense model, example inputs, plan) the options name: MODEL or --weights DIR with --plan; or
    what --load records (a training checkpoint's model spec and plan, a saved folder's origin and
    plan; --plan overrides the plan). The model is built on --device with its own weights."""
    device = check_device(args.device)
    load = getattr(args, "load", None)
    if load and (Path(load) / WEIGHTS).exists():                  # a folder written by moefx.save
        if args.model not in (None, "-") or args.weights:
            raise MoefxError(f"--load {load} rebuilds the model saved there: give no MODEL or --weights")
        origin = read_saved(load)["origin"]
        plan = load_plan(args.plan) if args.plan else Plan.from_dict(origin["plan"])
        return rebuild_model(origin, device), rebuild_inputs(origin, device), plan
    if args.model is None and not args.weights and not load:
        args.model = args.default_model
    spec, plan = spec_and_plan(args)
    model, inputs = dense_model(spec, device)
    return model, inputs, plan


def cmd_convert(args) -> int:
    """Convert MODEL with the plan, print the layer table and counts, compare with the dense model."""
    model, inputs, plan = dense_and_plan(args)
    print("plan:\n  " + plan.describe().replace("\n", "\n  ") + "\n")
    t0 = time.perf_counter()
    gm = convert(model, plan, inputs, dump_dir=args.dump_dir, target=args.target)
    seconds = time.perf_counter() - t0
    capture_s = facts(gm).capture_seconds or 0.0
    print(f"moefx convert {args.model or args.weights or args.load}: {list(facts(gm).passes)} in {seconds:.2f} s "
          f"(capture {capture_s:.2f} s)\n")
    print(layer_table(gm))
    print(f"dense model: {count_params(model)}")
    if args.device == "meta":
        return 0
    with torch.no_grad():
        ref, out = main_tensor(model(*inputs)), main_tensor(gm(*inputs))
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"\nmax |converted - dense| = {diff:.3g} (output scale {scale:.3g})")
    if plan.moe is None and plan.student is None:
        print("nothing converted: the plan has no [moe] or [student] section (pass no --plan for the default "
              "PR-MoE, or add a [moe] section)")
        return 1
    reasons = plan.moe.inexact_reasons() if plan.moe is not None else []
    if not reasons:
        ok = diff <= 1e-5 * max(scale, 1.0)
        print("function preserved: " + ("yes" if ok else "NO"))
        return 0 if ok else 1
    print("outputs are expected to differ: " + "; ".join(reasons))
    return 0




def cmd_dump(args) -> int:
    """Write a view of MODEL's graph at a stage (captured / converted / partitioned); dot / svg
    collapse dense blocks unless --expand."""
    model, inputs, plan = dense_and_plan(args)
    if args.stage == "captured":
        gm = capture(model, inputs)
    else:
        gm = convert(model, plan, inputs, copy_weights=False, target=args.target)
        if args.stage == "partitioned":
            gm = partitioned_view(gm, plan, rank=args.rank)
    text = dump(gm, args.format, expand=args.expand)
    if args.output:
        write_atomic(args.output, text)
        print(f"wrote {args.output}")
    elif isinstance(text, bytes):
        sys.stdout.buffer.write(text)
    else:
        print(text)
    return 0




def _target_arg(p) -> None:
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="device type the graph is lowered for (Triton gating on cuda; decidable without a GPU); "
                        "default: --device's (meta: cpu)")


def add_parsers(sub) -> None:
    c = sub.add_parser("convert", help="convert a model and check it against the dense one")
    model_args(c, default="gpt2-tiny")
    c.add_argument("--dump-dir", help="write the code after every pass into this folder")
    _target_arg(c)
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("dump", help="print a graph as code, table, dot, svg or json")
    model_args(d, load=True)
    d.add_argument("--format", default="code", choices=["code", "table", "dot", "svg", "json"], help="what to write")
    d.add_argument("--stage", default="converted", choices=["captured", "converted", "partitioned"],
                   help="which graph")
    d.add_argument("--rank", type=int, default=0, help="rank to show with --stage partitioned")
    _target_arg(d)
    d.add_argument("--expand", action="store_true", help="dot / svg: show the inside of dense blocks too")
    d.add_argument("--output", "-o", help="write to this file (atomically) instead of stdout")
    d.set_defaults(func=cmd_dump)
