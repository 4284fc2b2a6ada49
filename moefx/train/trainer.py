"""The training loop of `moefx train` / `moefx launch --train` / `--distill`: one code path for one
process and for every rank of a distributed job.

    result = train(model, TrainConfig(steps=200, lr=3e-4, warmup=20), Windows(tokens, 8, 256),
                   eval_model=eval_graph, checkpoint_dir="ckpt", metrics_csv="metrics.csv")

Each optimizer step runs `grad_accum` micro-batches per data-parallel replica (replica r at
accumulation step a reads micro-batch a * replicas + r of the step: `moefx.train.tokens`), each
`loss / grad_accum` backwarded, where loss = cross-entropy of the next token + the MoE aux loss of
that forward (`moefx.aux_loss`: coef * load balancing + z-loss, over the tokens the rank's routers
saw, as DeepSpeed computes it) [+ the KD term while step < kd_stop, with a teacher]. Then the
gradients are reduced (`world.reduce_gradients`), clipped by the global norm, and AdamW steps
with a warmup + cosine LambdaLR. One process accumulating `replicas x grad_accum` micro-batches
computes what the distributed job computes (same data, same losses, same update), which is what
the tests compare.

Dropout: before each micro-batch forward the torch RNG is seeded from (seed, step, micro-batch),
so masks are a pure function of where the run is: TP peers (same micro-batch) draw the same
masks, a resumed run draws what the uninterrupted one drew. Masks of a distributed run equal one
process's only without tensor parallelism over a dropout (head-sharded attention dropout draws
per rank-local shape): runs with dropout are compared in distribution, not bit for bit.

A NaN / inf loss or gradient norm stops the run with a TrainError naming the step (or, with
nonfinite="skip", skips the update and counts it); checkpoints (`moefx.train.resume`) refuse
non-finite weights. Rank 0 writes the metrics CSV and the loss SVG.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..dist.checkpoint import TMP_MARK
from ..errors import TrainError
from ..fileio import FolderBusy, own_folder
from ..nn.aux import aux_loss
from ..outputs import main_tensor
from . import resume as R
from .losses import distill_losses
from .metrics import COLUMNS, MetricsCSV, loss_svg
from .progress import Progress
from .schedule import SCHEDULES, scheduler
from .tokens import Windows, hash_seed, micro_index
from .world import Single

__all__ = ["TrainConfig", "TrainResult", "TrainError", "train", "micro_seed"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run (per replica: `batch` sequences of `seq` tokens per micro-batch)."""

    steps: int
    lr: float = 3e-4
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_accum: int = 1
    clip: float | None = 1.0
    bf16: bool = False
    seed: int = 0
    nonfinite: str = "stop"
    eval_every: int | None = None
    eval_batches: int = 4
    checkpoint_every: int | None = None
    log_every: int = 10
    kd_stop: int | None = None
    kd_alpha: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        checks = [(self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
                  (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
                  (0 <= self.warmup <= self.steps, f"warmup must be in [0, steps={self.steps}], got {self.warmup}"),
                  (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
                  (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
                  (self.clip is None or self.clip > 0, f"clip must be > 0 (or None), got {self.clip}"),
                  (self.nonfinite in ("stop", "skip"), f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}"),
                  (self.kd_stop is None or 0 <= self.kd_stop <= self.steps,
                   f"kd_stop must be in [0, steps={self.steps}], got {self.kd_stop}"),
                  (self.temperature > 0, f"temperature must be > 0, got {self.temperature}")]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    def hyper(self) -> dict:
        """The values a resumed run compares with its checkpoint's (it warns about changes)."""
        d = asdict(self)
        # grad_accum is per replica: a resume at another world size changes it on purpose (the trainer
        # compares the global micro-batch count instead)
        for k in ("steps", "eval_every", "eval_batches", "checkpoint_every", "log_every", "nonfinite", "grad_accum"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    """What `train` returns: rows (one per optimizer step, the CSV's), evals [(step, loss)], skipped
    steps, the step a resumed run started from, and the last validation loss."""

    rows: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    skipped: int = 0
    resumed_from: int | None = None

    @property
    def final_eval_loss(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


def micro_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of micro-batch `index` of step `step` (dropout masks, noisy gates)."""
    return hash_seed("moefx-rng", seed, step, index)


def _autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _losses(forward, model, teacher, ids, targets, config: TrainConfig, use_kd: bool, device):
    """(loss, task term, aux, kd) of one micro-batch forward."""
    with _autocast(config.bf16, device):
        logits = main_tensor(forward(ids))
        t_logits = None
        if use_kd:
            with torch.no_grad():
                t_logits = main_tensor(teacher(ids)).float()
    V = logits.shape[-1]
    terms = distill_losses(logits.float().reshape(-1, V), None if t_logits is None else t_logits.reshape(-1, V),
                           targets.reshape(-1), task="classification", kd_alpha=config.kd_alpha,
                           temperature=config.temperature)
    aux = aux_loss(model).to(terms["lm"].device).float()
    return terms["lm"] + aux + terms["kd"], terms["lm"], aux, terms["kd"]


def optimizer_for(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices, none on biases / norms (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2))


def evaluate(model: nn.Module, batches: list, device, world, bf16: bool = False) -> float:
    """Mean next-token cross-entropy of `model` over `batches` (this replica's), averaged over replicas."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for ids, targets in batches:
            with _autocast(bf16, device):
                logits = main_tensor(model(ids.to(device))).float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       targets.to(device).reshape(-1)).double()
    return float(world.mean(total / len(batches)))


def train(model: nn.Module, config: TrainConfig, windows: Windows, *, eval_model: nn.Module | None = None,
          teacher: nn.Module | None = None, world=None, checkpoint_dir=None, resume=None, metrics_csv=None,
          loss_svg_path=None, progress: bool = False, say=print, forward=None, record: dict | None = None
          ) -> TrainResult:
    """Train `model` (a converted GraphModule, captured in train mode, or a rank graph) for config.steps
    optimizer steps (see the module docstring).

    eval_model: the eval-mode graph sharing model's parameters (validation every eval_every steps
    and at the end); teacher: a frozen model for KD while step < kd_stop; world: `Single()` (default)
    or `Ranks(model)`; checkpoint_dir: write a checkpoint every checkpoint_every steps and at the
    end (`moefx.train.resume`); resume: a checkpoint folder to continue from; metrics_csv /
    loss_svg_path: rank 0 writes them; forward: what runs the forward (e.g. torch.compile(model);
    default: model itself); record: what the checkpoints record about the job (model spec, plan,
    versions: `moefx.runtime.build.job_record`). Returns a TrainResult."""
    world = world or Single()
    forward = forward if forward is not None else model
    device = next(model.parameters()).device
    if teacher is not None:
        if config.kd_stop is None:
            raise TrainError("a teacher needs kd_stop (the step KD ends)")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = optimizer_for(model, config)
    sched = scheduler(opt, steps=config.steps, warmup=config.warmup, schedule=config.schedule,
                      min_ratio=config.min_lr_ratio)
    result = TrainResult()
    start = 0
    if resume is not None:
        start, result.skipped, evals, changed = R.load(resume, model, opt, sched, config,
                                                       config.grad_accum * world.replicas)
        result.resumed_from, result.evals = start, [tuple(e) for e in evals]
        if changed and world.rank == 0:
            say("moefx train: the resumed run changes " + ", ".join(changed))
        if start > config.steps:
            raise TrainError(f"checkpoint {resume} is at step {start}, past --steps {config.steps}: raise --steps")
    columns = COLUMNS + (("kd",) if teacher is not None else ())
    csv = MetricsCSV(metrics_csv, columns, start) if metrics_csv and world.rank == 0 else None
    evals = windows.eval_batches(config.eval_batches) if eval_model is not None else []
    # every replica validates its own share of the fixed batches
    evals = [b for i, b in enumerate(evals) if i % world.replicas == world.replica] or evals[:1]
    bar = Progress(progress and world.rank == 0, config.steps, start, desc="train",
                   fields=("loss", "aux", "grad_norm", "lr") + (("kd",) if teacher is not None else ()), fmt=".4g")
    tokens_per_step = windows.batch * windows.seq * config.grad_accum * world.replicas
    owned = _own_checkpoint_dir(checkpoint_dir, world) if checkpoint_dir is not None else contextlib.nullcontext()
    with owned, contextlib.closing(bar):
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            model.train()
            opt.zero_grad(set_to_none=True)
            use_kd = teacher is not None and step < config.kd_stop
            sums = torch.zeros(4, dtype=torch.float64, device=device)     # on device: NCCL reduces it
            for a in range(config.grad_accum):
                j = micro_index(world.replica, a, world.replicas)
                ids, targets = windows.micro_batch(step, j)
                torch.manual_seed(micro_seed(config.seed, step, j))
                loss, lm, aux, kd = _losses(forward, model, teacher, ids.to(device), targets.to(device), config,
                                            use_kd, device)
                world.before_backward(model, last=a == config.grad_accum - 1)
                (loss / config.grad_accum).backward()
                sums += torch.stack([loss.detach(), lm.detach(), aux.detach(), kd.detach()]).double()
            world.reduce_gradients(model)
            norm = world.clip(model, config.clip)
            means = world.mean(sums / config.grad_accum)
            lr = opt.param_groups[0]["lr"]
            finite = bool(torch.isfinite(means).all()) and bool(torch.isfinite(norm))
            if not finite:
                what = f"step {step + 1}: the loss is {float(means[0])!r} and the gradient norm {float(norm)!r}"
                if config.nonfinite == "stop":
                    raise TrainError(f"{what}: stopping (lower the lr, enable --clip, or pass --nonfinite skip to "
                                     "skip such steps)")
                result.skipped += 1
                opt.zero_grad(set_to_none=True)
                if world.rank == 0:
                    say(f"moefx train: {what}: skipped the update ({result.skipped} skipped so far)")
            else:
                opt.step()
            sched.step()
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "loss": float(means[1]), "aux": float(means[2]), "grad_norm": float(norm),
                   "lr": float(lr), "tokens_per_s": tokens_per_step / dt}
            if teacher is not None:
                row["kd"] = float(means[3])
            done = step + 1
            if eval_model is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
                eval_model.eval()
                result.evals.append((done, evaluate(eval_model, evals, device, world, config.bf16)))
                row["eval_loss"] = result.evals[-1][1]
            result.rows.append(row)
            if csv is not None:
                csv.write(row)
            bar.update({**row, "step": step}, show=(step + 1) % config.log_every == 0 or step == start)
            if checkpoint_dir is not None and (done == config.steps or (config.checkpoint_every and
                                                                        done % config.checkpoint_every == 0)):
                R.save(f"{checkpoint_dir}/step{done:07d}", model, opt, sched, config, done, result.skipped,
                       result.evals, config.grad_accum * world.replicas, record=record)
    if loss_svg_path and world.rank == 0:
        loss_svg(result.rows, loss_svg_path, evals=result.evals)
    return result


def _own_checkpoint_dir(checkpoint_dir, world) -> contextlib.ExitStack:
    """A context holding, on rank 0, the checkpoint folder's lock for the run (a second run writing
    there is refused before any step, naming the owner); removes what crashed saves left there. Every
    rank agrees: a refusal raises TrainError on all of them."""
    error, owned = None, contextlib.ExitStack()
    if world.rank == 0:
        try:
            owned.enter_context(own_folder(checkpoint_dir))
            for stale in Path(checkpoint_dir).glob(f".*{TMP_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
        except FolderBusy as e:
            error = f"--checkpoint-dir {e}: give this run another --checkpoint-dir, or stop the other run"
        except OSError as e:
            error = f"--checkpoint-dir {checkpoint_dir} cannot be written: {e}"
    error = world.agree(error)
    if error:
        owned.close()
        raise TrainError(error)
    return owned

