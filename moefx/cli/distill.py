"""`moefx distill`: staged KD from a PR-MoE teacher into its Mixture-of-Students, in one process.

    moefx distill gpt2-tiny --plan examples/plans/tiny_pr_mos.toml --steps 100 --save student/
    moefx distill --plan mos.toml --teacher-load ckpt/step0000300 --steps 100   (a trained teacher)
    moefx generate --load student/ --prompt-ids 1,2,3                           (the student it wrote)

The same job as `moefx launch --distill` (`moefx.runtime.jobs.train` with KD), without a process
group: the plan's [student] section makes the student, the plan without it the teacher; data,
optimizer, schedule, checkpoints and metrics are the training job's. --save (and every
--checkpoint-dir step) writes a sharded checkpoint that records the model and the plan.
"""
from __future__ import annotations

from ..errors import MoefxError
from ..runtime.jobs.train import add_distill_args, add_training_args
from ..runtime.run_model import add_model_args, spec_and_plan
from .train import run_in_process


def cmd_distill(args) -> int:
    """Check the plan has a student, run the distillation job in this process, print its summary line."""
    _, plan = spec_and_plan(args)
    if plan.student is None:
        raise MoefxError(f"moefx distill needs a plan with a [student] section (layers, depth or keep); "
                         f"{args.plan or 'the default plan'} has none")
    return run_in_process(args)


def add_parsers(sub) -> None:
    ds = sub.add_parser("distill", help="shrink a PR-MoE teacher into a MoS student and train it with staged KD "
                                        "(one process; `moefx launch --distill` runs the same job on every rank)")
    add_model_args(ds, single=True)
    add_training_args(ds)
    add_distill_args(ds)
    ds.set_defaults(func=cmd_distill, model="gpt2-tiny")
