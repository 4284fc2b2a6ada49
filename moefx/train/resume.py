"""Training checkpoints that resume exactly, at the same or another world size / plan.

A checkpoint is a `moefx.dist.checkpoint` DCP folder (atomic, checksummed, reshardable)
holding the model's global tensors and, as extra tensors placed like their parameters, AdamW's
state of each parameter (`optim/<global name>/exp_avg`, `.../exp_avg_sq`, `.../step`): a rank
saves and loads only the pieces it holds, and DCP reshards them for another layout. The side-car
info holds the optimizer step, the LR scheduler's state, the skipped-step count, the validation
history and the hyper-parameters. The data cursor and every RNG draw are pure functions of
(seed, step) (`moefx.train.tokens`, `moefx.train.trainer.micro_seed`), so the step is all a
resumed run needs to continue bit for bit.

Folders: `<checkpoint_dir>/step0000200`; `latest(dir)` is the highest step in a directory, so
`--resume ckpt` takes the checkpoint directory or one step folder.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from ..dist.checkpoint import load_sharded, save_sharded
from ..errors import CheckpointError
from ..facts import placements
from ..placement import whole
from .schedule import set_length

__all__ = ["save", "load", "latest", "optimizer_tensors"]

_STEP = re.compile(r"step(\d+)")


def latest(path: str) -> Path:
    """`path` itself when it is a checkpoint, else its highest stepNNN sub-folder (CheckpointError if none)."""
    p = Path(path)
    if (p / ".metadata").exists() or (p / "moefx.json").exists():
        return p
    steps = sorted((int(m.group(1)), c) for c in p.glob("step*") if (m := _STEP.fullmatch(c.name)) and c.is_dir())
    if not steps:
        raise CheckpointError(f"--resume {path}: neither a checkpoint nor a folder of stepNNN checkpoints")
    return steps[-1][1]


def _init_state(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Give every trainable parameter its AdamW state (zeros, step 0) if it has none yet, so every
    rank and every world size saves / loads the same set of tensors."""
    for p in model.parameters():
        if p.requires_grad and not opt.state.get(p):
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """{extra name: (tensor, Placement)} of the optimizer state, placed like each parameter."""
    _init_state(model, opt)
    recs = placements(model)
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rec = recs.get(name) or whole(name, tuple(p.shape))
        for key, t in opt.state[p].items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() == 0:
                piece = whole(f"optim/{rec.global_name}/{key}", ())
            else:
                piece = dataclasses.replace(rec, global_name=f"optim/{rec.global_name}/{key}")
            out[f"optim/{name}/{key}"] = (t, piece)
    return out


def save(path: str, model: nn.Module, opt, sched, config, step: int, skipped: int, evals: list,
         micro_batches: int, record: dict | None = None) -> Path:
    """Write the training checkpoint of this rank (collective under a process group); micro_batches:
    per optimizer step over all replicas (the global batch, in micro-batches); record: what the job
    was (model spec, plan, versions), kept in the side-car."""
    info = {"step": step, "skipped": skipped, "evals": [list(e) for e in evals], "scheduler": sched.state_dict(),
            "schedule_steps": sched.total_steps, "steps": config.steps,
            "config": {**config.hyper(), "micro_batches_per_step": micro_batches}}
    return save_sharded(model, path, extra=optimizer_tensors(model, opt), info=info, record=record)


def _changes(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k, v) != v]


def load(path: str, model: nn.Module, opt, sched, config, micro_batches: int) -> tuple[int, int, list, list[str]]:
    """Load a checkpoint into the model, the optimizer and the scheduler (collective under a process
    group). Returns (step, skipped steps, validation history, changed hyper-parameters)."""
    folder = latest(path)
    info = load_sharded(model, folder, extra=optimizer_tensors(model, opt), strict=True)
    if "step" not in info:
        raise CheckpointError(f"{folder} holds model weights only (no training state): load it with --load to start "
                              "a new run from these weights")
    base = list(sched.base_lrs)                 # this run's lr (a changed --lr takes effect, with a note)
    lambdas = sched.lr_lambdas
    sched.load_state_dict(info["scheduler"])
    sched.base_lrs, sched.lr_lambdas = base, lambdas
    changed = []
    # The schedule keeps the length the run started with, so the lr goes on smoothly: another --steps
    # ends the run elsewhere (past the schedule's end, at the floor lr), it does not re-stretch the decay.
    length = int(info.get("schedule_steps", config.steps))
    if length != config.steps:
        set_length(sched, length)
        after = f"the floor lr from step {length}" if config.steps > length else "the run stops before its decay ends"
        changed.append(f"steps {info.get('steps', length)} -> {config.steps} (the lr schedule keeps its length of "
                       f"{length} steps: {after})")
    lrs = [b * sched.lr_lambdas[0](sched.last_epoch) for b in base]
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    now = {**config.hyper(), "micro_batches_per_step": micro_batches}
    return (int(info["step"]), int(info.get("skipped", 0)), info.get("evals", []),
            changed + _changes(info.get("config", {}), now))
