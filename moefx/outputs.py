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


def output_size(gm) -> int | None:
    """The last size of a captured graph's main output (an LM's vocabulary), from the output node's
    shape metadata; None when the graph carries none."""
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    first = out.args[0] if out is not None else None
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    v = getattr(first, "meta", {}).get("val") if first is not None else None
    return int(v.shape[-1]) if isinstance(v, torch.Tensor) else None
