"""Tensors of a module by dotted name: who owns one, every tensor a graph holds, tying two modules' tensors."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["owner_of", "named_tensors", "share_tensors"]


def owner_of(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding the dotted `name` ("layers.0.mlp.weight") and the attribute name in it."""
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def named_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of `gm`: parameters and buffers (duplicates kept, placeholders of generic
    experts left out) and the graph constants export lifted onto the module as plain attributes."""
    out = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    placeholder = {f"{n}.{b}" if n else b for n, m in gm.named_modules()
                   for b in getattr(m, "_moefx_placeholders", ())}
    out = [(n, t) for n, t in out if n not in placeholder]
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not name.startswith("_moefx"):
            out.append((name, value))
    return out


def share_tensors(dst: nn.Module, src: nn.Module) -> int:
    """Make every parameter / buffer of `dst` that `src` has under the same name (and shape) the very
    tensor of `src`. Returns how many were tied."""
    have = dict(src.named_parameters(remove_duplicate=False))
    have.update(src.named_buffers(remove_duplicate=False))
    tied = 0
    for name, t in list(dst.named_parameters(remove_duplicate=False)) + list(dst.named_buffers(remove_duplicate=False)):
        other = have.get(name)
        if other is None or other is t or other.shape != t.shape:
            continue
        owner, attr = owner_of(dst, name)
        store = owner._parameters if attr in owner._parameters else owner._buffers
        store[attr] = other
        tied += 1
    return tied
