"""Build a model without allocating its parameters: on the meta device, or with only its buffers real.

`params_on_meta()` makes every parameter created inside it a meta tensor while buffers (rotary
frequencies, position ids, causal masks) are computed for real: the cheap way to get a model's
buffer values without its weights. Each parameter is created as usual and moved to meta at
once, so at most one parameter is ever allocated.
"""
from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["params_on_meta"]


@contextlib.contextmanager
def params_on_meta():
    """Inside: `register_parameter` stores a meta copy of each new parameter (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
