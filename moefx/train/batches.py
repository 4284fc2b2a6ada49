"""Training batches: how a batch splits into model inputs, labels and a loss mask, and where the
batches of a run come from (a list, a callable step -> batch, or an iterator).

* a tensor or a tuple/list of tensors: positional model inputs. For a causal LM the labels are
  the first input (input_ids), shifted by one inside the loss.
* a dict. Reserved keys: `labels` (optional for a causal LM), `inputs` (a tuple of positional
  inputs; use it for exported GraphModules, which take positional arguments) and `loss_mask`.
  Every other key is passed to the model as a keyword argument. Without a `loss_mask`, an
  `attention_mask` key doubles as the padding mask of the loss.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DistillError

__all__ = ["Batch", "split_batch", "default_labels", "to_device", "BatchSource"]


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    labels: torch.Tensor | None
    mask: torch.Tensor | None



def split_batch(batch: Any, where: str) -> Batch:
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
        out = Batch(tuple(inputs), rest, labels, mask)
    elif isinstance(batch, (tuple, list)):
        out = Batch(tuple(batch), {}, None, None)
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



def default_labels(b: Batch, where: str) -> torch.Tensor:
    first = b.args[0] if b.args else b.kwargs.get("input_ids")
    if not isinstance(first, torch.Tensor) or first.is_floating_point():
        raise DistillError(
            f"{where}: no 'labels' in the batch and no integer input_ids to shift; "
            "pass a dict batch with 'labels'"
        )
    return first



def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x



class BatchSource:
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

