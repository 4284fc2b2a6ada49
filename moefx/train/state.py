"""Resumable training state: RNG states (in a form `torch.load(weights_only=True)` accepts) and
the single-file checkpoint of `moefx.distill` (student, optimizer, history, RNG), written atomically.
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import torch

from ..errors import DistillError
from ..fileio import atomic_file

__all__ = ["rng_state", "set_rng_state", "seed_all", "CHECKPOINT_NAME", "save_checkpoint", "checkpoint",
           "load_checkpoint"]

CHECKPOINT_NAME = "distill.pt"

_CHECKPOINT_VERSION = 1



# RNG state, in a form torch.load(weights_only=True) accepts.
def rng_state() -> dict:
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



def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))



def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    np.random.seed(seed % 2**32)



def save_checkpoint(obj: dict, path: str) -> None:
    """torch.save `obj` to `path` atomically (readers see the old file or the new one)."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def checkpoint(done, student, opt, result, config) -> dict:
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
        "rng": rng_state(),
    }



def load_checkpoint(path, student, opt, result, config) -> int:
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
    set_rng_state(state["rng"])
    return int(state["step"])

