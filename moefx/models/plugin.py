"""`package.module:function` models: a function of no arguments returning (model, example_inputs).

The current folder is importable (as with `python -m`), so a model defined in ./my_models.py is
`my_models:build`.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.nn as nn

from ..errors import MoefxError
from .zoo import REGISTRY

__all__ = ["ModelError", "load_function"]


class ModelError(MoefxError, ValueError):
    """A model name cannot be resolved, or a model function returned the wrong thing."""


def unknown(name: str, why: str) -> ModelError:
    """The error for a model name that cannot be loaded, listing the builtins."""
    return ModelError(
        f"cannot load model {name!r}: {why}. Use a builtin name "
        f"({', '.join(sorted(REGISTRY))}) or 'package.module:function' naming a function "
        "of no arguments that returns (model, example_inputs)."
    )


def load_function(name: str, device: torch.device) -> tuple[nn.Module, tuple]:
    """Import ``package.module:function``, call it, validate and move the result to device."""
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise unknown(name, "expected the form 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())        # like `python -m`: models next to the caller import
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise unknown(name, f"cannot import module {module_name!r} ({e})") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise unknown(name, f"module {module_name!r} has no function {func_name!r}")
    with device:
        result = func()
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise unknown(
            name, f"{func_name}() returned {type(result).__name__}, not (model, example_inputs)"
        )
    model, inputs = result
    if not isinstance(model, nn.Module):
        raise unknown(name, f"{func_name}() returned a {type(model).__name__} as the model, "
                             "not a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise unknown(name, f"{func_name}() returned {type(inputs).__name__} as the example "
                             "inputs, not a tuple of positional arguments")
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device != device and t.device.type != "meta" for t in tensors):   # meta ones: a skeleton, leave them
        model = model.to(device)
    return model.eval(), inputs
