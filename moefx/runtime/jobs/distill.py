"""The distillation job: `moefx launch --distill` (every rank) — staged KD from a partitioned PR-MoE
teacher into its partitioned Mixture-of-Students student.

    moefx launch --nproc-per-node 4 --plan mos.toml llama-tiny --distill --teacher-load teacher_ckpt \\
        --kd-stop 1200 --steps 2000 ...

The plan's [student] section makes the student; the same plan without it is the teacher. Both are
built per rank on meta and partitioned by the plan's [parallel] section; the teacher is frozen and
runs under no_grad in eval mode. --teacher-load DIR loads a sharded checkpoint of the teacher (e.g.
`--save` of a `--train` job) into the teacher and into the student's kept blocks (MoS initialises
the student from its teacher). Loss = task + aux + kd_alpha * T^2 * KL while step < --kd-stop
(default 60% of --steps, -1: every step), then task + aux (staged KD). Everything else (data,
optimizer, schedule, checkpoints, metrics with a `kd` column, --check) is the training job's.
"""
from __future__ import annotations

import argparse
import sys

from ..run_model import DefaultsFormatter, add_model_args, job_main
from .train import add_distill_args, add_training_args, run

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moefx.runtime.jobs.distill",
                                formatter_class=DefaultsFormatter,
                                description="one rank of distributed staged-KD distillation (`moefx launch --distill`)")
    add_model_args(p)
    add_training_args(p)
    add_distill_args(p)
    return p


main = job_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
