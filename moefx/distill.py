"""Staged knowledge distillation: train a Mixture-of-Students (MoS) student from its teacher.

DeepSpeed-MoE's MoS recipe: the student (the PR-MoE teacher with fewer layers) minimises

    L = L_task + L_aux + kd_alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

for the first ``kd_stop`` steps and ``L_task + L_aux`` afterwards ("staged KD": KD helps early
and hurts late, when the smaller student can no longer follow the teacher). ``L_aux`` is
``moefx.nn.aux.aux_loss(student)``, the MoE load-balancing losses of the student's latest
forward (0 for a dense student).

Example::

    >>> from moefx.distill import distill
    >>> from moefx.data import load_corpus, lm_batches
    >>> train, _ = load_corpus(max_bytes=200_000)
    >>> batches = lm_batches(train, batch_size=8, seq_len=64, steps=100, seed=0)
    >>> result = distill(teacher, student, batches, steps=100, kd_stop=60, progress=False)
    >>> result.history[0].keys()
    dict_keys(['step', 'lm', 'kd', 'aux', 'total', 'lr'])

Models
------
``teacher`` and ``student`` are any ``nn.Module`` (eager, ``fx.GraphModule`` or the module of a
``torch.export`` program). Their output may be a tensor, a tuple/list (first element), a dict
or a Hugging Face ``ModelOutput`` (``.logits`` / ``["logits"]``). The teacher runs under
``torch.no_grad()`` in eval mode; its parameters get ``requires_grad=False`` during the run and
their flags are restored afterwards. Teacher and student must not share parameters. Exported
modules refuse ``.train()`` / ``.eval()``: they keep the mode they were captured in.

Batches
-------
* a tensor or a tuple/list of tensors: positional model inputs. For a causal LM the labels are
  the first input (``input_ids``), shifted by one inside the loss.
* a dict. Reserved keys: ``labels`` (optional for a causal LM), ``inputs`` (a tuple of
  positional inputs; use it for exported GraphModules, which take positional arguments) and
  ``loss_mask``. Every other key is passed to the model as a keyword argument. Without a
  ``loss_mask``, an ``attention_mask`` key doubles as the padding mask of the loss.

Causal-LM labels follow the Hugging Face convention: aligned with the inputs (``[B, T]``) and
shifted inside the loss (logits at ``t`` predict label ``t + 1``). A target with label ``-100``
or mask 0 is left out of both the task loss and the KD loss. Classification labels are
``[B]`` (``-100`` ignored); regression labels are float.

``train_batches`` is a list (or other sequence) of batches, read as ``batches[step % len]``; a
callable ``step -> batch``; or an iterator (read in order; a resumed run skips the batches the
checkpointed steps used, which is exact only when the iterator replays the same batches).
Lists and callables make resumption exact.

Tasks
-----
``causal_lm`` (logits ``[B, T, V]``), ``classification`` (logits ``[B, C]``, KD as above),
``regression`` (MSE task loss; the KD term becomes ``kd_alpha * MSE(student, teacher)``, no
temperature). ``auto`` decides from the first student output: float labels -> regression,
3-D logits -> causal_lm, 2-D logits -> classification, 1-D -> regression.

Checkpoints and resumption
--------------------------
With ``checkpoint_dir``, ``distill.pt`` is written every ``checkpoint_every`` steps and at the
end, atomically (temporary file in the same folder, then ``os.replace``). It holds the student
state dict, optimizer state, the number of steps done, the history and the torch / Python /
NumPy RNG states. With ``resume=True`` a run that finds it continues from there, and the result
(history, eval history, weights) is bit-identical to an uninterrupted run on the same machine.
Evaluations run inside ``torch.random.fork_rng`` so they never shift the training RNG.
``distill`` seeds torch, ``random`` and NumPy with ``seed`` at the start of a fresh run.
"""
from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefx.errors import MoefxError
from moefx.nn.aux import AuxLossSink, aux_loss
from moefx.outputs import main_tensor

__all__ = ["distill", "DistillResult", "DistillError", "distill_losses", "extract_logits"]

TASKS = ("auto", "causal_lm", "classification", "regression")
CHECKPOINT_NAME = "distill.pt"
_CHECKPOINT_VERSION = 1
_IGNORE = -100


class DistillError(MoefxError, ValueError):
    """Arguments, batches or models that ``distill`` cannot train with."""


@dataclass
class DistillResult:
    """What ``distill`` returns.

    ``history`` has one dict per training step: ``step`` (0-based index of the step), ``lm``
    (task loss), ``kd`` (the weighted KD term, 0.0 once KD stopped), ``aux``, ``total`` (the
    loss that was back-propagated, ``lm + kd + aux``) and ``lr``. ``eval_history`` has
    ``{"step", "eval_loss"}`` where ``step`` counts the optimizer steps done when it ran and
    ``eval_loss`` is the task loss averaged over every target of ``eval_batches``.
    """

    student: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    task: str = "auto"
    teacher_eval_loss: float | None = None
    resumed_from: int | None = None
    checkpoint_path: str | None = None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_history[-1]["eval_loss"] if self.eval_history else None


# --------------------------------------------------------------------------- outputs and batches


def extract_logits(output: Any) -> torch.Tensor:
    """The logits of a model output (see `moefx.outputs.main_tensor`); DistillError when there are none."""
    try:
        return main_tensor(output)
    except TypeError as e:
        raise DistillError(str(e)) from None


@dataclass
class _Batch:
    args: tuple
    kwargs: dict
    labels: torch.Tensor | None
    mask: torch.Tensor | None


def _split_batch(batch: Any, where: str) -> _Batch:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, Mapping):
        rest = dict(batch)
        labels = rest.pop("labels", None)
        mask = rest.pop("loss_mask", None)
        inputs = rest.pop("inputs", ())
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if mask is None and isinstance(rest.get("attention_mask"), torch.Tensor):
            mask = rest["attention_mask"]
        out = _Batch(tuple(inputs), rest, labels, mask)
    elif isinstance(batch, (tuple, list)):
        out = _Batch(tuple(batch), {}, None, None)
    else:
        raise DistillError(
            f"{where}: a batch must be a tensor, a tuple of inputs or a dict, "
            f"not {type(batch).__name__}"
        )
    if not out.args and not out.kwargs:
        raise DistillError(f"{where}: the batch is empty (no model inputs)")
    for name, value in [*enumerate(out.args), *out.kwargs.items()]:
        if isinstance(value, torch.Tensor) and value.numel() == 0:
            raise DistillError(f"{where}: model input {name!r} is empty {tuple(value.shape)}")
    return out


def _default_labels(b: _Batch, where: str) -> torch.Tensor:
    first = b.args[0] if b.args else b.kwargs.get("input_ids")
    if not isinstance(first, torch.Tensor) or first.is_floating_point():
        raise DistillError(
            f"{where}: no 'labels' in the batch and no integer input_ids to shift; "
            "pass a dict batch with 'labels'"
        )
    return first


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------- losses


def _resolve_task(task: str, logits: torch.Tensor, labels: torch.Tensor | None) -> str:
    if task != "auto":
        return task
    if labels is not None and labels.is_floating_point():
        return "regression"
    if logits.dim() >= 3:
        return "causal_lm"
    if logits.dim() == 2:
        return "classification"
    return "regression"


def _valid_targets(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = labels != _IGNORE
    if mask is not None:
        if mask.shape != labels.shape:
            raise DistillError(
                f"loss mask shape {tuple(mask.shape)} does not match labels {tuple(labels.shape)}"
            )
        valid = valid & (mask != 0)
    return valid


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, t: float):
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return torch.where(valid, kl, torch.zeros_like(kl)).sum()


def _loss_sums(task, s_out, t_out, labels, mask, *, temperature, with_kd):
    """(task_loss_sum, kd_sum or None, number of counted targets) before any weighting."""
    if task in ("causal_lm", "classification"):
        if labels.is_floating_point():
            raise DistillError(f"task={task!r} needs integer labels, got {labels.dtype}")
        if task == "causal_lm":
            if s_out.dim() != 3 or labels.shape != s_out.shape[:2]:
                raise DistillError(
                    f"causal_lm needs logits [B, T, V] and labels [B, T]; got logits "
                    f"{tuple(s_out.shape)}, labels {tuple(labels.shape)}"
                )
            valid = _valid_targets(labels, mask)[:, 1:]
            labels = labels[:, 1:]
            s_out = s_out[:, :-1]
            t_out = t_out[:, :-1] if t_out is not None else None
        else:
            if s_out.dim() != 2 or labels.shape != s_out.shape[:1]:
                raise DistillError(
                    f"classification needs logits [B, C] and labels [B]; got logits "
                    f"{tuple(s_out.shape)}, labels {tuple(labels.shape)}"
                )
            valid = _valid_targets(labels, mask)
        count = valid.sum()
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        nll = F.cross_entropy(
            s_out.reshape(-1, s_out.shape[-1]).float(), safe.reshape(-1), reduction="none"
        ).reshape(valid.shape)
        task_sum = torch.where(valid, nll, torch.zeros_like(nll)).sum()
        kd_sum = _kl_sum(s_out, t_out, valid, temperature) if with_kd else None
        return task_sum, kd_sum, count
    # regression
    pred = s_out.float()
    target = labels.float()
    if pred.shape != target.shape and pred.shape[-1:] == (1,) and pred.shape[:-1] == target.shape:
        pred = pred.squeeze(-1)
        t_out = t_out.squeeze(-1) if t_out is not None else None
    if pred.shape != target.shape:
        raise DistillError(
            f"regression output {tuple(s_out.shape)} does not match labels {tuple(labels.shape)}"
        )
    weight = torch.ones_like(pred)
    if mask is not None:
        m = mask.to(pred.dtype)
        while m.dim() < pred.dim():
            m = m.unsqueeze(-1)
        weight = weight * m
    count = weight.sum()
    task_sum = (weight * (pred - target) ** 2).sum()
    kd_sum = (weight * (pred - t_out.float()) ** 2).sum() if with_kd else None
    return task_sum, kd_sum, count


def distill_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    task: str,
    loss_mask: torch.Tensor | None = None,
    kd_alpha: float = 1.0,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The task and KD terms ``distill`` uses, for one batch: ``{"lm", "kd"}`` (scalars).

    ``task`` is one of ``causal_lm``, ``classification``, ``regression``; causal-LM labels are
    aligned with the inputs and shifted here. Targets with label -100 or ``loss_mask`` 0 count
    in neither term. ``kd`` is already weighted (``kd_alpha * T^2 * KL``, or ``kd_alpha * MSE``
    for regression); pass ``teacher_logits=None`` for ``kd = 0``.
    """
    if task not in TASKS[1:]:
        raise DistillError(f"task must be one of {TASKS[1:]}, got {task!r}")
    with_kd = teacher_logits is not None and kd_alpha != 0
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise DistillError(_mismatch_message(student_logits, teacher_logits))
    task_sum, kd_sum, count = _loss_sums(
        task, student_logits, teacher_logits, labels, loss_mask,
        temperature=temperature, with_kd=with_kd,
    )
    if int(count) == 0:
        raise DistillError("every target of the batch is masked (labels -100 / mask 0)")
    lm = task_sum / count
    if with_kd:
        scale = kd_alpha * (temperature**2 if task != "regression" else 1.0)
        kd = scale * (kd_sum / count)
    else:
        kd = torch.zeros((), device=lm.device)
    return {"lm": lm, "kd": kd}


def _mismatch_message(s: torch.Tensor, t: torch.Tensor) -> str:
    if s.dim() == t.dim() and s.shape[:-1] == t.shape[:-1]:
        return (
            f"teacher and student output sizes differ: teacher vocab/classes {t.shape[-1]}, "
            f"student {s.shape[-1]}; KD needs the same output vocabulary"
        )
    return (
        f"teacher output {tuple(t.shape)} and student output {tuple(s.shape)} differ; "
        "KD needs outputs of the same shape"
    )


# --------------------------------------------------------------------------- helpers


def _set_mode(module: nn.Module, training: bool) -> None:
    try:
        module.train(training)
    except NotImplementedError:
        pass  # torch.export modules keep the mode they were captured in


def _modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def _restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in saved:
        m.training = flag


def _reset_sinks(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, AuxLossSink):
            m.value = None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class _BatchSource:
    def __init__(self, batches: Any):
        if isinstance(batches, (str, bytes)) or batches is None:
            raise DistillError("train_batches must be a list, a callable step -> batch or an iterator")
        self._seq = self._fn = self._it = None
        if isinstance(batches, torch.Tensor):
            raise DistillError("train_batches is a single tensor; wrap the batch in a list: [(x,)]")
        if isinstance(batches, Sequence):
            if len(batches) == 0:
                raise DistillError("train_batches is empty")
            if isinstance(batches, tuple) and all(isinstance(b, torch.Tensor) for b in batches):
                raise DistillError(
                    "train_batches is a tuple of tensors, which looks like a single batch; "
                    "pass a list of batches, e.g. [batch]"
                )
            self._seq = batches
        elif callable(batches):
            self._fn = batches
        elif isinstance(batches, Iterable):
            self._it = iter(batches)
            self._next = 0
        else:
            raise DistillError(
                f"train_batches must be a list, a callable or an iterator, not {type(batches).__name__}"
            )

    def get(self, step: int) -> Any:
        if self._seq is not None:
            return self._seq[step % len(self._seq)]
        if self._fn is not None:
            return self._fn(step)
        while self._next < step:  # skip batches consumed before a checkpoint
            self._take(step)
        return self._take(step)

    def _take(self, step: int) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            raise DistillError(f"train_batches iterator ran out at step {step}") from None
        self._next += 1
        return batch


# RNG state, in a form torch.load(weights_only=True) accepts.
def _rng_state() -> dict:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        pass
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    np.random.seed(seed % 2**32)


def _save_atomic(obj: dict, path: str) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".distill-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int):
        self._bar = None
        self._enabled = enabled
        self._total = total
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, desc="distill", file=sys.stderr,
                         dynamic_ncols=True, leave=True)

    def update(self, row: dict[str, float], show: bool) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if show:
                self._bar.set_postfix(lm=f"{row['lm']:.4f}", kd=f"{row['kd']:.4f}",
                                      aux=f"{row['aux']:.4f}", refresh=False)
        elif show:
            print(f"distill step {int(row['step']) + 1}/{self._total} lm={row['lm']:.4f} "
                  f"kd={row['kd']:.4f} aux={row['aux']:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------- the trainer


def _check_args(steps, kd_stop, kd_alpha, temperature, task, eval_every, log_every,
                checkpoint_dir, checkpoint_every):
    if not isinstance(steps, int) or steps < 1:
        raise DistillError(f"steps must be a positive int, got {steps!r}")
    if kd_stop is not None:
        if not isinstance(kd_stop, int) or kd_stop < 0:
            raise DistillError(f"kd_stop must be None or an int >= 0, got {kd_stop!r}")
        if kd_stop > steps:
            raise DistillError(
                f"kd_stop={kd_stop} is past steps={steps}; use kd_stop <= steps, or "
                "kd_stop=None to keep KD on for the whole run"
            )
    if kd_alpha < 0 or not math.isfinite(kd_alpha):
        raise DistillError(f"kd_alpha must be finite and >= 0, got {kd_alpha}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise DistillError(f"temperature must be finite and > 0, got {temperature}")
    if task not in TASKS:
        raise DistillError(f"task must be one of {TASKS}, got {task!r}")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DistillError(f"{name} must be None or a positive int, got {value!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise DistillError(f"log_every must be a positive int, got {log_every!r}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise DistillError("checkpoint_every needs checkpoint_dir (where to write distill.pt)")


def _freeze_teacher(teacher: nn.Module, student: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    student_ids = {id(p): n for n, p in student.named_parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in student_ids]
    if shared:
        raise DistillError(
            f"teacher and student share {len(shared)} parameter(s) (e.g. {shared[0]!r}); "
            "build the student from a deep copy of the teacher"
        )
    saved = [(p, p.requires_grad) for p in teacher.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def _build_optimizer(optimizer, student, lr, weight_decay) -> torch.optim.Optimizer:
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise DistillError("the student has no trainable parameters (requires_grad=True)")
    if optimizer is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise DistillError("optimizer(params) must return a torch.optim.Optimizer")
        return opt
    raise DistillError("optimizer must be None, a torch.optim.Optimizer or a callable params -> optimizer")


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_batches: Sequence[Any] | Callable[[int], Any] | Iterable[Any],
    *,
    steps: int,
    kd_stop: int | None,
    kd_alpha: float = 1.0,
    temperature: float = 1.0,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    grad_clip: float | None = None,
    eval_batches: Sequence[Any] | None = None,
    eval_every: int | None = None,
    task: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 10,
    seed: int = 0,
) -> DistillResult:
    """Train ``student`` for ``steps`` steps with KD from ``teacher`` during the first ``kd_stop``.

    Step ``s`` (0-based) adds the KD term when ``s < kd_stop``; ``kd_stop=None`` keeps KD on
    for every step and ``kd_stop=0`` never uses it. ``optimizer`` is None (AdamW with ``lr``
    and ``weight_decay``), an optimizer over the student's parameters, or a callable
    ``params -> optimizer``. ``lr_schedule(step)`` multiplies each group's initial lr;
    ``grad_clip`` clips the global gradient norm. ``eval_batches`` are evaluated (task loss)
    every ``eval_every`` steps (None: only at the end) and once on the teacher. See the module
    docstring for batches, tasks and checkpoints. Raises ``DistillError`` (a ValueError) for
    bad arguments, empty batches and teacher/student output mismatches.
    """
    _check_args(steps, kd_stop, kd_alpha, temperature, task, eval_every, log_every,
                checkpoint_dir, checkpoint_every)
    if eval_batches is not None and len(eval_batches) == 0:
        raise DistillError("eval_batches is empty; pass None to skip evaluation")
    source = _BatchSource(train_batches)
    kd_until = steps if kd_stop is None else kd_stop
    device = _device_of(student)
    ckpt_path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME) if checkpoint_dir else None

    teacher_modes, student_modes = _modes(teacher), _modes(student)
    teacher_flags = _freeze_teacher(teacher, student)
    progress_bar = None
    try:
        opt = _build_optimizer(optimizer, student, lr, weight_decay)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        config = {"steps": steps, "kd_stop": kd_until, "kd_alpha": float(kd_alpha),
                  "temperature": float(temperature), "seed": seed}
        result = DistillResult(student=student, task=task, checkpoint_path=ckpt_path)
        start = 0
        if ckpt_path and resume and os.path.exists(ckpt_path):
            start = _load_checkpoint(ckpt_path, student, opt, result, config)
            if start > steps:
                raise DistillError(
                    f"checkpoint {ckpt_path} is at step {start}, past steps={steps}; raise "
                    "steps, or pass resume=False / another checkpoint_dir to start over")
            result.resumed_from = start
        else:
            _seed_all(seed)
        _set_mode(teacher, False)

        def run_eval(model: nn.Module, resolved: str) -> float:
            return _evaluate(model, eval_batches, resolved, device)

        progress_bar = _Progress(progress, steps, start)
        for step in range(start, steps):
            where = f"step {step}"
            b = _split_batch(source.get(step), where)
            b = _Batch(_to_device(b.args, device), _to_device(b.kwargs, device),
                       _to_device(b.labels, device), _to_device(b.mask, device))
            use_kd = step < kd_until and kd_alpha != 0
            _set_mode(student, True)
            with torch.no_grad():
                t_logits = extract_logits(teacher(*b.args, **b.kwargs)) if use_kd else None
            _reset_sinks(student)
            s_logits = extract_logits(student(*b.args, **b.kwargs))
            labels = b.labels
            if result.task == "auto":
                result.task = _resolve_task("auto", s_logits, labels)
            if labels is None:
                if result.task != "causal_lm":
                    raise DistillError(f"{where}: task {result.task!r} needs 'labels' in the batch")
                labels = _default_labels(b, where)
            if t_logits is not None and t_logits.shape != s_logits.shape:
                raise DistillError(f"{where}: " + _mismatch_message(s_logits, t_logits))
            try:
                terms = distill_losses(s_logits, t_logits, labels, task=result.task,
                                       loss_mask=b.mask, kd_alpha=kd_alpha,
                                       temperature=temperature)
            except DistillError as e:
                raise DistillError(f"{where}: {e}") from None
            aux = aux_loss(student).to(terms["lm"].device)
            total = terms["lm"] + aux + terms["kd"]

            factor = 1.0 if lr_schedule is None else float(lr_schedule(step))
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], grad_clip)
            opt.step()

            row = {"step": step, "lm": terms["lm"].item(),
                   "kd": terms["kd"].item() if use_kd else 0.0,
                   "aux": float(aux.detach().item()), "total": total.item(),
                   "lr": float(opt.param_groups[0]["lr"])}
            result.history.append(row)
            progress_bar.update(row, show=(step + 1) % log_every == 0 or step == start)

            done = step + 1
            if eval_batches is not None and (
                done == steps or (eval_every is not None and done % eval_every == 0)
            ):
                if result.teacher_eval_loss is None:
                    result.teacher_eval_loss = run_eval(teacher, result.task)
                result.eval_history.append({"step": done, "eval_loss": run_eval(student, result.task)})
            if ckpt_path and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
                _save_atomic(_checkpoint(done, student, opt, result, config), ckpt_path)
        if eval_batches is not None and result.teacher_eval_loss is None:
            result.teacher_eval_loss = run_eval(teacher, result.task)
        return result
    finally:
        if progress_bar is not None:
            progress_bar.close()
        for p, flag in teacher_flags:
            p.requires_grad_(flag)
        _restore_modes(teacher_modes)
        _restore_modes(student_modes)


def _evaluate(model: nn.Module, batches: Sequence[Any], task: str, device: torch.device) -> float:
    modes = _modes(model)
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        _set_mode(model, False)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for i, raw in enumerate(batches):
                b = _split_batch(raw, f"eval batch {i}")
                args, kwargs = _to_device(b.args, device), _to_device(b.kwargs, device)
                mask = _to_device(b.mask, device)
                logits = extract_logits(model(*args, **kwargs))
                resolved = _resolve_task(task, logits, b.labels) if task == "auto" else task
                labels = b.labels if b.labels is not None else _default_labels(b, f"eval batch {i}")
                task_sum, _, n = _loss_sums(resolved, logits, None, labels.to(device), mask,
                                            temperature=1.0, with_kd=False)
                total += task_sum.double().cpu()
                count += n.double().cpu()
    finally:
        _restore_modes(modes)
    if count.item() == 0:
        raise DistillError("eval_batches have no unmasked targets")
    return (total / count).item()


def _checkpoint(done, student, opt, result, config) -> dict:
    return {
        "version": _CHECKPOINT_VERSION,
        "step": done,
        "student": student.state_dict(),
        "optimizer": opt.state_dict(),
        "history": list(result.history),
        "eval_history": list(result.eval_history),
        "task": result.task,
        "teacher_eval_loss": result.teacher_eval_loss,
        "config": config,
        "rng": _rng_state(),
    }


def _load_checkpoint(path, student, opt, result, config) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file is broken
        raise DistillError(f"cannot read checkpoint {path}: {e}; delete it or pass resume=False") from e
    if state.get("version") != _CHECKPOINT_VERSION:
        raise DistillError(f"checkpoint {path} has version {state.get('version')}, "
                           f"expected {_CHECKPOINT_VERSION}")
    changed = {k: (state["config"].get(k), v) for k, v in config.items()
               if k != "steps" and state["config"].get(k) != v}
    if changed:
        warnings.warn(
            f"resuming {path} with different settings (checkpoint, now): {changed}; "
            "the run will not match an uninterrupted one", stacklevel=3)
    student.load_state_dict(state["student"])
    opt.load_state_dict(state["optimizer"])
    result.history = list(state["history"])
    result.eval_history = list(state["eval_history"])
    if state["task"] != "auto":
        result.task = state["task"]
    result.teacher_eval_loss = state["teacher_eval_loss"]
    _set_rng_state(state["rng"])
    return int(state["step"])
