"""The training job: `moefx train` (one process) and `moefx launch --train` (every rank).

    moefx train llama-tiny --plan plan.toml --data corpus.bin --steps 2000 --lr 3e-4 --warmup 100 \\
        --batch 16 --seq 256 --checkpoint-dir ckpt --checkpoint-every 200 --metrics-csv m.csv
    moefx launch --nproc-per-node 4 --plan plan.toml llama-tiny --train --data corpus.bin ...
    moefx launch ... --train --resume ckpt       # the same or another world size / plan

Each rank builds its train-mode and eval-mode graphs on meta and materialises only its tensors
(`moefx.runtime.build.build_train_graphs`; --weights DIR streams a Hugging Face folder), then runs
`moefx.train.trainer.train` (AdamW, warmup + cosine, accumulation, global-norm clipping, aux +
z-loss, optional bf16 autocast). --batch is per data-parallel replica and micro-batch; the global
batch of a step is batch x grad-accum x dp sequences. --check trains the single-process model on
the same data (accumulating dp x grad-accum micro-batches) and fails the rank whose losses or
gradient norms differ (relative --tolerance). --save writes the trained weights as a sharded
checkpoint (`--load` of later jobs, `moefx launch --generate --load`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ...dist.checkpoint import load_full, load_sharded, save_sharded
from ...dist.worker import progress, say
from ...errors import MoefxError
from ...facts import facts
from ...fileio import check_writable
from ...outputs import output_size
from ...train.tokens import HELD_OUT, Windows, open_split
from ...train.trainer import TrainConfig, train
from ...train.world import Ranks, Single
from ..build import build_rank, build_reference, build_train_graphs, job_record
from ..run_model import (
    DefaultsFormatter,
    add_model_args,
    fail_if_asked,
    job_main,
    peak_rss_mb,
    positive_int,
    start_job,
    tensor_bytes,
)

__all__ = ["main", "build_parser", "add_training_args", "add_distill_args", "config_from", "run"]


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Data, optimizer, schedule, checkpoint and metrics options (shared by train and distill)."""
    p.add_argument("--data", metavar="FILE", help="token file: .bin (flat uint16, as nanoGPT writes; see "
                                                  "--data-dtype), .npy, or a text file (see --tokenizer); default: "
                                                  "the shipped moefx.data corpus (byte-level)")
    p.add_argument("--eval-data", metavar="FILE", help="validation tokens, same formats as --data (default: the "
                                                        "shipped corpus's validation files, or the last 5%% of --data)")
    p.add_argument("--data-dtype", default="uint16", choices=("uint16", "uint32"), help="token type of a .bin file")
    p.add_argument("--tokenizer", metavar="DIR", help="folder with a tokenizer for a text --data file (default: "
                                                      "--weights; none: byte-level)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"), help="lr after the warmup")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step per replica")
    p.add_argument("--clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward")
    p.add_argument("--nonfinite", default="stop", choices=("stop", "skip"),
                   help="on a NaN / inf loss or gradient: stop the run, or skip the update")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=4, help="fixed validation micro-batches")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write DIR/stepNNNNNNN training checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from a training checkpoint (a step folder, or the "
                                                   "checkpoint dir: its latest step)")
    p.add_argument("--metrics-csv", metavar="FILE", help="one row per step: step,loss,aux,grad_norm,lr,tokens_per_s")
    p.add_argument("--loss-svg", metavar="FILE", help="loss curve at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """The options of staged KD (`moefx distill`, `moefx launch --distill`); sets args.distill."""
    p.add_argument("--teacher-load", metavar="DIR", help="checkpoint of the teacher (also initialises the student's "
                                                         "kept blocks); default: the teacher's own init")
    p.add_argument("--kd-stop", type=int, default=None, help="the step KD ends (default: 60%% of --steps; -1: never)")
    p.add_argument("--kd-alpha", type=float, default=1.0, help="weight of the KD term")
    p.add_argument("--temperature", type=float, default=1.0, help="KD softmax temperature")
    p.set_defaults(distill=True)


def build_parser(prog: str = "python -m moefx.runtime.jobs.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=DefaultsFormatter,
                                description="train a converted model (one rank of `moefx launch --train`, or one "
                                            "process as `moefx train`)")
    add_model_args(p)
    add_training_args(p)
    return p


def config_from(args, **extra):
    """The TrainConfig of the options."""
    return TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                       min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_accum=args.grad_accum,
                       clip=args.clip or None, bf16=args.bf16, seed=args.seed, nonfinite=args.nonfinite,
                       eval_every=args.eval_every, eval_batches=args.eval_batches,
                       checkpoint_every=args.checkpoint_every, **extra)


def windows_for(args, vocab: int | None, *, rank: int = 0):
    """The data of the options as Windows of --batch x --seq with held-out validation tokens (the
    shipped corpus folded into a smaller vocabulary with `id % vocab`, said once)."""
    tokenizer = args.tokenizer or args.weights
    train, val = open_split(args.data, eval_path=args.eval_data, dtype=args.data_dtype, tokenizer=tokenizer)
    if args.data is None and vocab is not None and vocab < 256:
        if rank == 0:
            say(f"moefx train: the shipped corpus is byte-level (256 ids); folded into this model's vocabulary of "
                f"{vocab} with id % {vocab}")
        train, val = train % vocab, val % vocab
    elif args.data is not None and args.eval_data is None and rank == 0:
        say(f"moefx train: validating on the last {HELD_OUT:.0%} of {args.data} (held out of training; "
            "--eval-data FILE to give a validation file)")
    return Windows(train, args.batch, args.seq, seed=args.seed, vocab_size=vocab, eval_tokens=val)


def _compiled(model, args):
    if not args.compile:
        return model
    return torch.compile(model, fullgraph=True)


def _summary(head: str, result, args, model) -> str:
    if not result.rows:                      # resumed at (or past) --steps: nothing left to train
        text = f"{head} ok 0 steps: the checkpoint is at step {result.resumed_from} of --steps {args.steps}"
    else:
        last = result.rows[-1]
        tps = [r["tokens_per_s"] for r in result.rows[1:]] or [last["tokens_per_s"]]
        text = (f"{head} ok {len(result.rows)} steps, loss {last['loss']:.4f}, grad norm {last['grad_norm']:.3g}, "
                f"{sum(tps) / len(tps):.0f} tokens/s")
    if result.final_eval_loss is not None:
        text += f", validation loss {result.final_eval_loss:.4f}"
    if result.skipped:
        text += f", {result.skipped} step(s) skipped (non-finite)"
    return text + f", peak RSS {peak_rss_mb():.0f} MB, tensors {tensor_bytes(model) / 2**20:.1f} MB"


def compare_rows(got: list, want: list, tolerance: float) -> str | None:
    """None when every step's loss and grad norm agree within `tolerance` (relative), else what differs."""
    if len(got) != len(want):
        return f"{len(got)} steps against {len(want)}"
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm"):
            if abs(a[key] - b[key]) > tolerance * max(abs(b[key]), 1.0):
                return f"step {a['step']}: {key} {a[key]!r} != single-process {b[key]!r}"
    return None


def _teacher_plan(plan):

    if plan.student is None:
        raise MoefxError("--distill needs a plan with a [student] section (layers, depth or keep): the student is "
                         "the plan's MoS, the teacher the same plan without it")
    return dataclasses.replace(plan, student=None)


def _models(args, job, *, distributed: bool, distill: bool, with_eval: bool = True):
    """(student / model train graph, its eval graph (None without with_eval), teacher or None), weights
    loaded. Distributed, every graph runs on one mesh: the teacher's (its MoE layers include the
    student's), else the model's."""
    load = load_sharded if distributed else load_full
    tokens = args.batch * args.seq
    teacher, mesh, profile = None, None, job.profile
    if distill:
        plan = _teacher_plan(job.plan)
        if distributed:
            teacher, _ = build_rank(job.spec, plan, device=job.device, tokens_per_rank=tokens, profile=job.profile,
                                    measure=True)
            mesh, profile = teacher.moefx_mesh, facts(teacher).profile
        else:
            teacher = build_reference(job.spec, plan, device=job.device)
    model, eval_model = build_train_graphs(job.spec, job.plan, device=job.device, distributed=distributed,
                                           tokens_per_rank=tokens, profile=profile, measure=distributed,
                                           with_eval=with_eval, mesh=mesh)
    if distill and args.teacher_load:
        load(teacher, args.teacher_load)
        load(model, args.teacher_load, strict=False)         # the student starts from the teacher's kept blocks
    if args.load:
        load(model, args.load)
    return model, eval_model, teacher


def _distill_extra(args) -> dict:
    if not getattr(args, "distill", False):
        return {}
    kd_stop = round(0.6 * args.steps) if args.kd_stop is None else (args.steps if args.kd_stop < 0 else args.kd_stop)
    return {"kd_stop": kd_stop, "kd_alpha": args.kd_alpha, "temperature": args.temperature}


def run(args, *, distributed: bool = True) -> str:
    """Build, train (or distil, with args.distill), report (see the module docstring); returns this
    rank's summary line."""
    distill = bool(getattr(args, "distill", False))
    if args.check and args.resume:
        raise MoefxError("--check compares a whole run with the single-process one: run it without --resume")
    config = config_from(args, **_distill_extra(args))
    for option, path, folder in (("--metrics-csv", args.metrics_csv, False), ("--loss-svg", args.loss_svg, False),
                                 ("--checkpoint-dir", args.checkpoint_dir, True), ("--save", args.save, False)):
        if path:                                        # found out now, not after the last step
            check_writable(path, option, folder=folder)
    job = start_job(args, distributed)
    model, eval_model, teacher = _models(args, job, distributed=distributed, distill=distill)
    progress("built")
    fail_if_asked(args, job.rank)
    world = Ranks(model) if distributed else Single()
    windows = windows_for(args, output_size(model), rank=job.rank)
    record = job_record(job.spec, job.plan)          # what its checkpoints say the run was
    result = train(model, config, windows, eval_model=eval_model, teacher=teacher, world=world,
                   checkpoint_dir=args.checkpoint_dir, resume=args.resume, metrics_csv=args.metrics_csv,
                   loss_svg_path=args.loss_svg, progress=not args.no_progress, say=say,
                   forward=_compiled(model, args), record=record)
    progress("trained")
    if args.save:
        save_sharded(model, args.save, record=record)
    head = f"rank {job.rank}/{job.world}:"
    if args.check and distributed:
        error = _check(args, job, config, windows, world, result, distill)
        if error:
            say(f"{head} MISMATCH {error}")
            raise AssertionError(f"--check: {error}")
        return _summary(head, result, args, model) + ", losses equal the single-process run"
    return _summary(head, result, args, model)


def _check(args, job, config, windows, world, result, distill: bool) -> str | None:
    """Train the whole model in this process on the same data; what differs from `result`, or None."""
    ref, _, teacher = _models(args, job, distributed=False, distill=distill, with_eval=False)
    single = dataclasses.replace(config, grad_accum=config.grad_accum * world.replicas)
    want = train(ref, single, windows, teacher=teacher, world=Single())
    return compare_rows(result.rows, want.rows, args.tolerance)


main = job_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
