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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DistillError
from ..nn.aux import AuxLossSink, aux_loss
from .batches import Batch, BatchSource, default_labels, split_batch, to_device
from .losses import TASKS, distill_losses, extract_logits, loss_sums, mismatch_message, resolve_task
from .progress import Progress
from .state import CHECKPOINT_NAME, checkpoint, load_checkpoint, save_checkpoint, seed_all

__all__ = ["distill", "DistillResult", "DistillError"]


@dataclass
class DistillResult:
    """What ``distill`` returns.

    ``history`` has one dict per training step: ``step`` (0-based index of the step), ``lm``
    (task loss), ``kd`` (the weighted KD term, 0.0 once KD stopped), ``aux``, ``total`` (the
    loss that was back-propagated, ``lm + kd + aux``) and ``lr``. ``eval_history`` has
    ``{"step", "eval_loss"}`` where ``step`` counts the optimizer steps done when it ran and
    ``eval_loss`` is the task loss averaged over every target of ``eval_batches``. ``skipped``
    counts the updates left out for a non-finite loss or gradient (``nonfinite="skip"``).
    """

    student: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    task: str = "auto"
    teacher_eval_loss: float | None = None
    resumed_from: int | None = None
    checkpoint_path: str | None = None
    skipped: int = 0

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_history[-1]["eval_loss"] if self.eval_history else None



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
    nonfinite: str = "stop",
) -> DistillResult:
    """Train ``student`` for ``steps`` steps with KD from ``teacher`` during the first ``kd_stop``.

    Step ``s`` (0-based) adds the KD term when ``s < kd_stop``; ``kd_stop=None`` keeps KD on
    for every step and ``kd_stop=0`` never uses it. ``optimizer`` is None (AdamW with ``lr``
    and ``weight_decay``), an optimizer over the student's parameters, or a callable
    ``params -> optimizer``. ``lr_schedule(step)`` multiplies each group's initial lr;
    ``grad_clip`` clips the global gradient norm. ``eval_batches`` are evaluated (task loss)
    every ``eval_every`` steps (None: only at the end) and once on the teacher. See the module
    docstring for batches, tasks and checkpoints. A NaN / inf loss or gradient norm stops the run
    with a DistillError naming the step (``nonfinite="skip"``: the update is skipped and counted in
    ``result.skipped``); a non-finite student is never checkpointed. Raises ``DistillError`` (a
    ValueError) for bad arguments, empty batches and teacher/student output mismatches.
    """
    if nonfinite not in ("stop", "skip"):
        raise DistillError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
    _check_args(steps, kd_stop, kd_alpha, temperature, task, eval_every, log_every,
                checkpoint_dir, checkpoint_every)
    if eval_batches is not None and len(eval_batches) == 0:
        raise DistillError("eval_batches is empty; pass None to skip evaluation")
    source = BatchSource(train_batches)
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
                  "temperature": float(temperature), "seed": seed, "lr": float(lr),
                  "weight_decay": float(weight_decay), "grad_clip": grad_clip}
        result = DistillResult(student=student, task=task, checkpoint_path=ckpt_path)
        start = 0
        if ckpt_path and resume and os.path.exists(ckpt_path):
            start = load_checkpoint(ckpt_path, student, opt, result, config)
            if start > steps:
                raise DistillError(
                    f"checkpoint {ckpt_path} is at step {start}, past steps={steps}; raise "
                    "steps, or pass resume=False / another checkpoint_dir to start over")
            result.resumed_from = start
        else:
            seed_all(seed)
        _set_mode(teacher, False)

        def run_eval(model: nn.Module, resolved: str) -> float:
            return _evaluate(model, eval_batches, resolved, device)

        progress_bar = Progress(progress, steps, start)
        for step in range(start, steps):
            where = f"step {step}"
            b = split_batch(source.get(step), where)
            b = Batch(to_device(b.args, device), to_device(b.kwargs, device),
                       to_device(b.labels, device), to_device(b.mask, device))
            use_kd = step < kd_until and kd_alpha != 0
            _set_mode(student, True)
            with torch.no_grad():
                t_logits = extract_logits(teacher(*b.args, **b.kwargs)) if use_kd else None
            _reset_sinks(student)
            s_logits = extract_logits(student(*b.args, **b.kwargs))
            labels = b.labels
            if result.task == "auto":
                result.task = resolve_task("auto", s_logits, labels)
            if labels is None:
                if result.task != "causal_lm":
                    raise DistillError(f"{where}: task {result.task!r} needs 'labels' in the batch")
                labels = default_labels(b, where)
            if t_logits is not None and t_logits.shape != s_logits.shape:
                raise DistillError(f"{where}: " + mismatch_message(s_logits, t_logits))
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
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            if not (bool(torch.isfinite(total)) and bool(torch.isfinite(norm))):
                what = f"step {step + 1}: the loss is {total.item()!r} and the gradient norm {norm.item()!r}"
                if nonfinite == "stop":
                    raise DistillError(f"{what}: stopping (lower lr, set grad_clip, or pass nonfinite='skip')")
                result.skipped += 1
                opt.zero_grad(set_to_none=True)
            else:
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
                bad = [n for n, t in student.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
                if bad:
                    raise DistillError(f"step {done}: the student has NaN / inf values in {bad[:4]}: not checkpointed")
                save_checkpoint(checkpoint(done, student, opt, result, config), ckpt_path)
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
                b = split_batch(raw, f"eval batch {i}")
                args, kwargs = to_device(b.args, device), to_device(b.kwargs, device)
                mask = to_device(b.mask, device)
                logits = extract_logits(model(*args, **kwargs))
                resolved = resolve_task(task, logits, b.labels) if task == "auto" else task
                labels = b.labels if b.labels is not None else default_labels(b, f"eval batch {i}")
                task_sum, _, n = loss_sums(resolved, logits, None, labels.to(device), mask,
                                            temperature=1.0, with_kd=False)
                total += task_sum.double().cpu()
                count += n.double().cpu()
    finally:
        _restore_modes(modes)
    if count.item() == 0:
        raise DistillError("eval_batches have no unmasked targets")
    return (total / count).item()

