"""The `moefx` command line: a thin wrapper over the library functions.

    moefx convert [MODEL] [--plan plan.toml]     convert, print the layer table, check vs dense
    moefx dump MODEL --plan plan.toml --format {code,table,dot,svg,json} [--stage ...] [--output F]
    moefx distill [MODEL] --plan plan.toml --steps N --kd-stop K   staged-KD MoS student (needs [student])
    moefx launch --nproc-per-node G --plan plan.toml MODEL [--check]   distributed run under torchrun
    moefx launch --nnodes N --nproc-per-node G --plan plan.toml MODEL [--check] [--compile] [--steps N]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .errors import MoefxError
from .fileio import write_atomic
from .outputs import main_tensor


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
        ref, out = main_tensor(model(*inputs)), main_tensor(gm(*inputs))
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


def cmd_launch(args) -> int:
    """Run `python -m moefx.runtime.run_model MODEL ...` on this node's ranks under torchrun."""
    from .runtime.launch import launch
    from .runtime.run_model import worker_argv

    plan = _load_plan(args.plan)
    world = args.nnodes * args.nproc_per_node
    pp = plan.parallel
    if pp is None:
        raise MoefxError(f"moefx launch needs a plan with a [parallel] section (nodes, devices_per_node, tp, ep); "
                         f"{args.plan} has none")
    if pp.world_size != world:
        raise MoefxError(f"the plan's [parallel] section describes nodes * devices_per_node = {pp.nodes} * "
                         f"{pp.devices_per_node} = {pp.world_size} ranks but this launch starts nnodes * "
                         f"nproc_per_node = {args.nnodes} * {args.nproc_per_node} = {world}")
    extra = ["--iters", str(args.iters)] if args.iters is not None else []
    if args.fail_rank is not None:
        extra += ["--fail-rank", str(args.fail_rank)]
    for flag, value in (("--load", args.load), ("--save", args.save)):
        if value:
            extra += [flag, value]
    target = worker_argv(args.model, args.plan, compile=args.compile, check=args.check, steps=args.steps,
                         batch=args.batch, seq=args.seq, seed=args.seed, extra=extra)
    try:
        result = launch(target, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                        master_addr=args.master_addr, master_port=args.master_port, timeout=args.timeout,
                        capture=not args.stream)
    except ValueError as e:
        raise MoefxError(str(e)) from None
    if result.output:
        sys.stdout.write(result.output)
    node = f"node {args.node_rank}/{args.nnodes}: " if args.nnodes > 1 else ""
    if result.ok:
        print(f"moefx launch: {node}{args.nproc_per_node} rank(s) {result.summary()}", flush=True)
        return 0
    print(f"moefx launch: {node}FAILED, {result.summary()}", file=sys.stderr, flush=True)
    return 124 if result.timed_out else (result.returncode if result.returncode > 0 else 1)


def cmd_distill(args) -> int:
    """Convert MODEL into the plan's PR-MoE teacher, shrink it to the plan's student, run staged KD
    on the offline stdlib corpus and save the student's state dict."""
    import torch

    from .convert import convert
    from .data import fixed_eval_batches, lm_batches, load_corpus
    from .train.distill import distill
    from .models import load_model
    from .passes.shrink import shrink

    plan = _load_plan(args.plan)
    if plan.student is None:
        raise MoefxError(f"moefx distill needs a plan with a [student] section (layers, depth or keep); "
                         f"{args.plan or 'the default plan'} has none")
    model, inputs = load_model(args.model, seed=args.seed, batch=args.batch, seq=args.seq)
    teacher_plan = type(plan)(moe=plan.moe, lowering=plan.lowering)
    teacher = convert(model, teacher_plan, inputs)
    student = shrink(teacher, plan)
    vocab = main_tensor(teacher(*inputs)).shape[-1]
    train, val = load_corpus(max_bytes=args.corpus_bytes, seed=args.seed)
    train, val = train.clamp_max(vocab - 1), val.clamp_max(vocab - 1)  # byte ids into the model's vocabulary
    batches = lm_batches(train, args.batch, args.seq, args.steps, seed=args.seed)
    evals = fixed_eval_batches(val, args.batch, args.seq, 4)
    if args.kd_stop is None:
        kd_stop = round(0.6 * args.steps)          # staged KD: on for the first 60% of the steps
    else:
        kd_stop = args.kd_stop if args.kd_stop >= 0 else None
        if kd_stop is not None and kd_stop > args.steps:
            raise MoefxError(f"--kd-stop {kd_stop} is past --steps {args.steps}: use a step <= {args.steps}, "
                             "or --kd-stop -1 to keep KD on for the whole run")
    result = distill(teacher, student, batches, steps=args.steps, kd_stop=kd_stop, kd_alpha=args.kd_alpha,
                     temperature=args.temperature, lr=args.lr, eval_batches=evals, progress=True,
                     checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, seed=args.seed)
    kept = student.meta.get("moefx_student_keep")
    print(f"student keeps teacher blocks {kept}; final eval loss {result.final_eval_loss:.4f} "
          f"(teacher {result.teacher_eval_loss if result.teacher_eval_loss is not None else float('nan'):.4f})")
    if args.output:
        import io

        buf = io.BytesIO()
        torch.save(student.state_dict(), buf)
        write_atomic(args.output, buf.getvalue())
        print(f"wrote {args.output}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Sub-command parsers show every option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moefx", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

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

    ds = sub.add_parser("distill", help="shrink a PR-MoE teacher into a MoS student and train it with staged KD")
    model_args(ds, default="gpt2-tiny")
    ds.add_argument("--steps", type=int, default=100)
    ds.add_argument("--kd-stop", type=int, default=None,
                    help="step at which KD switches off (-1: never; default: 60%% of --steps)")
    ds.add_argument("--kd-alpha", type=float, default=1.0)
    ds.add_argument("--temperature", type=float, default=1.0)
    ds.add_argument("--lr", type=float, default=3e-4)
    ds.add_argument("--batch", type=int, default=8)
    ds.add_argument("--seq", type=int, default=32)
    ds.add_argument("--corpus-bytes", type=int, default=400_000)
    ds.add_argument("--checkpoint-dir", help="write resumable checkpoints here (atomically)")
    ds.add_argument("--checkpoint-every", type=int, default=None)
    ds.add_argument("--output", "-o", help="save the student's state dict here")
    ds.set_defaults(func=cmd_distill)

    ln = sub.add_parser("launch", help="run a distributed moefx model on this node's ranks (torchrun)")
    ln.add_argument("model", help="built-in name (gpt2-tiny, llama-tiny, ...) or module:function")
    ln.add_argument("--plan", required=True, help="plan file with a [parallel] section (world = nnodes x nproc)")
    ln.add_argument("--nnodes", type=int, default=1)
    ln.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this node")
    ln.add_argument("--node-rank", type=int, default=0, help="this node's index (with --nnodes > 1)")
    ln.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    ln.add_argument("--master-port", type=int, default=None,
                    help="port on node 0 (required with --nnodes > 1; default: a free port)")
    ln.add_argument("--check", action="store_true", help="every rank compares with the single-process model")
    ln.add_argument("--compile", action="store_true", help="torch.compile each rank's graph")
    ln.add_argument("--steps", type=int, default=0, help="training steps (0: forward passes)")
    ln.add_argument("--iters", type=int, default=None, help="forward passes when --steps is 0 (default 3)")
    ln.add_argument("--batch", type=int, default=None)
    ln.add_argument("--seq", type=int, default=None)
    ln.add_argument("--seed", type=int, default=None)
    ln.add_argument("--load", help="load this sharded checkpoint folder before running")
    ln.add_argument("--save", help="save a sharded checkpoint folder at the end")
    ln.add_argument("--timeout", type=float, default=None, help="kill the launch after this many seconds")
    ln.add_argument("--stream", action="store_true",
                    help="let the workers write to the terminal live (the failure summary then cannot name "
                         "the failing rank)")
    ln.add_argument("--fail-rank", type=int, default=None, help=argparse.SUPPRESS)
    ln.set_defaults(func=cmd_launch)
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
