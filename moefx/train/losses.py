"""The losses of knowledge distillation and of plain training: task loss (causal LM, classification,
regression) and the KD term, both over the unmasked targets only.

Causal-LM labels follow the Hugging Face convention: aligned with the inputs ([B, T]) and shifted
inside the loss (logits at t predict label t + 1). A target with label -100 or mask 0 counts in
neither term. `distill_losses` returns the weighted terms; `loss_sums` their unweighted sums and
the number of counted targets (for exact averages over several batches or ranks).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DistillError
from ..outputs import main_tensor

__all__ = ["TASKS", "IGNORE", "extract_logits", "resolve_task", "loss_sums", "distill_losses", "mismatch_message"]

TASKS = ("auto", "causal_lm", "classification", "regression")

IGNORE = -100



def extract_logits(output: Any) -> torch.Tensor:
    """The logits of a model output (see `moefx.outputs.main_tensor`); DistillError when there are none."""
    try:
        return main_tensor(output)
    except TypeError as e:
        raise DistillError(str(e)) from None



def resolve_task(task: str, logits: torch.Tensor, labels: torch.Tensor | None) -> str:
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
    valid = labels != IGNORE
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



def loss_sums(task, s_out, t_out, labels, mask, *, temperature, with_kd):
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
        raise DistillError(mismatch_message(student_logits, teacher_logits))
    task_sum, kd_sum, count = loss_sums(
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



def mismatch_message(s: torch.Tensor, t: torch.Tensor) -> str:
    if s.dim() == t.dim() and s.shape[:-1] == t.shape[:-1]:
        return (
            f"teacher and student output sizes differ: teacher vocab/classes {t.shape[-1]}, "
            f"student {s.shape[-1]}; KD needs the same output vocabulary"
        )
    return (
        f"teacher output {tuple(t.shape)} and student output {tuple(s.shape)} differ; "
        "KD needs outputs of the same shape"
    )

