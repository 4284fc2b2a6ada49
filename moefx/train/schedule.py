"""Learning-rate schedules as `torch.optim.lr_scheduler.LambdaLR` factors: linear warmup, then cosine decay."""
from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "scheduler"]

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
    """A LambdaLR stepping once per optimizer step with `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps=steps, warmup=warmup, schedule=schedule, min_ratio=min_ratio))
