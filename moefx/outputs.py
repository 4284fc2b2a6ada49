"""The main tensor of a model's output, whatever container the model returns it in."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def main_tensor(output: Any) -> torch.Tensor:
    """The tensor itself, `.logits`, `.last_hidden_state`, a mapping's "logits" or first value, or
    the first element of a tuple/list (recursively). Raises TypeError when there is none."""
    for _ in range(8):
        if isinstance(output, torch.Tensor):
            return output
        for attr in ("logits", "last_hidden_state"):
            value = getattr(output, attr, None)
            if isinstance(value, torch.Tensor):
                return value
        if isinstance(output, Mapping) and len(output):
            output = output["logits"] if "logits" in output else next(iter(output.values()))
        elif isinstance(output, (tuple, list)) and len(output):
            output = output[0]
        else:
            break
    raise TypeError(f"cannot find a tensor in a model output of type {type(output).__name__}: return a tensor, "
                    "a tuple whose first element is the main tensor, or an object with .logits")
