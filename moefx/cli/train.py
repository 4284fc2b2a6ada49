"""`moefx train`: train a converted model in one process (the same job `moefx launch --train` runs per rank)."""
from __future__ import annotations

import warnings

from ..errors import InexactConversionWarning
from ..runtime.jobs.train import add_training_args, run
from ..runtime.run_model import add_model_args
from .common import check_device


def cmd_train(args) -> int:
    """Run the training job without a process group; print its summary line."""
    return run_in_process(args)


def run_in_process(args) -> int:
    """Run the training job (distillation with args.distill) without a process group; print its
    summary line."""
    check_device(args.device or "cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=InexactConversionWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        print(run(args, distributed=False))
    return 0


def add_parsers(sub) -> None:

    t = sub.add_parser("train", help="train a converted model in one process (AdamW, warmup + cosine, checkpoints, "
                                     "metrics); `moefx launch --train` runs the same job on every rank")
    add_model_args(t, single=True)
    add_training_args(t)
    t.set_defaults(func=cmd_train)
