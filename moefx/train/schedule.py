"""Learning-rate schedules as `torch.optim.lr_scheduler.LambdaLR` factors: linear warmup, then cosine decay."""
from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "scheduler", "set_length"]

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1) -> float:
    """The multiple of the base lr at optimizer step `step` (0-based): (step + 1) / warmup during the
    warmup, then cosine from 1 down to `min_ratio` at the last step ("constant": 1 after warmup)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler(optimizer: torch.optim.Optimizer, *, steps: int, warmup: int, schedule: str = "cosine",
              min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step with `lr_factor`; its `total_steps` is the
    schedule's length `steps` (a resumed run keeps the length its checkpoint records: `set_length`)."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sched.schedule_args = dict(warmup=warmup, schedule=schedule, min_ratio=min_ratio)
    set_length(sched, steps)
    return sched


def set_length(sched: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Make `sched` (from `scheduler`) a schedule of `steps` optimizer steps (warmup, then the decay
    ending at step `steps`; past it the floor lr holds)."""
    args = sched.schedule_args
    sched.total_steps = steps
    sched.lr_lambdas = [lambda s: lr_factor(s, steps=steps, **args) for _ in sched.lr_lambdas]
