"""Materialise a graph built on the meta device: allocate exactly its tensors and fill them.

    local = moefx.distribute(meta_converted, plan)          # every tensor on meta: no memory
    materialize(local, SafetensorsSource("weights/"), device="cpu")

For every tensor of `gm` (parameters, buffers, graph constants; tied names once), its placement
record (`moefx.placement`; whole without one) says which piece of which global tensor it is, and
the global tensor's recipe (`moefx.recipes`, for the tensors the PR-MoE pass made) or the source
(the dense model's own tensors) gives the values of exactly that piece: a rank reads only the
slices of the dense weights it holds or copies into its experts; a source that holds a
converted tensor itself (a saved converted model) is read instead of its recipe. Buffers come from `buffers`
(the model's real buffers, e.g. rotary frequencies) when given, else from the source. Device
literals the capture recorded (`arange(device=meta)`, casts) are retargeted to `device`
(`retarget`), so the graph runs where its tensors now live. Peak memory ~ the rank's tensors plus
one dense tensor being copied.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import MoefxError
from ..facts import facts, placements
from ..placement import whole
from ..recipes import Copy, StackExperts, Uniform
from ..tensors import named_tensors, owner_of
from .sources import Source, SourceError

__all__ = ["materialize", "retarget", "meta_tensors"]


def meta_tensors(gm: nn.Module) -> list[str]:
    """Names of the tensors of `gm` still on the meta device (placeholders of generic experts left out)."""
    return [name for name, t in named_tensors(gm) if t.device.type == "meta"]


def _assign(gm: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    owner, attr = owner_of(gm, name)
    if attr in owner._parameters:
        p = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=like.requires_grad)
        owner._parameters[attr] = p
        return p
    if attr in owner._buffers:
        owner._buffers[attr] = value
        return value
    object.__setattr__(owner, attr, value)
    return value


def _value(name: str, t: torch.Tensor, rec, recipes: dict, source: Source, buffers: Source | None,
           is_buffer: bool) -> torch.Tensor:
    """The values of the local tensor `name` (meta tensor `t`) from its record and recipe."""
    narrow = {d: (rec.offsets[d], rec.offsets[d] + t.shape[d]) for d in rec.shard_dims}
    recipe = recipes.get(rec.global_name)
    if recipe is not None and rec.global_name in source._names():
        recipe = None                      # the source holds the converted tensor itself (moefx.load)
    if isinstance(recipe, StackExperts):
        experts = range(rec.offsets[0], rec.offsets[0] + t.shape[0])
        inner = {d - 1: span for d, span in narrow.items() if d != 0}
        return recipe.build(source.read, source.shape(recipe.source), experts=experts, narrow=inner)
    if isinstance(recipe, Uniform):
        return recipe.build(narrow=narrow)
    if isinstance(recipe, Copy):
        return recipe.build((buffers or source).read)
    src = buffers if is_buffer and buffers is not None else source
    try:
        return src.read(rec.global_name, narrow)
    except SourceError:
        if is_buffer and src is not source:
            return source.read(rec.global_name, narrow)
        raise


def materialize(gm: fx.GraphModule, source: Source, *, device: str | torch.device = "cpu",
                buffers: Source | None = None) -> fx.GraphModule:
    """Replace every meta tensor of `gm` by its values from `source` (see the module docstring), on
    `device`, keeping each tensor's dtype and requires_grad and every tie; retarget the graph's
    device literals. Returns `gm` (changed in place). Raises SourceError naming a missing tensor,
    MoefxError for a shape that does not fit."""
    device = torch.device(device)
    recipes = facts(gm).recipes
    recs = placements(gm)
    buffer_ids = {id(b) for _, b in gm.named_buffers(remove_duplicate=False)}
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named_tensors(gm):
        groups.setdefault(id(t), []).append((name, t))
    for items in groups.values():
        name, t = items[0]
        if t.device.type != "meta":
            continue
        rec = recs.get(name) or next((recs[n] for n, _ in items if n in recs), None) or whole(name, tuple(t.shape))
        with torch.no_grad():
            value = _value(name, t, rec, recipes, source, buffers, id(t) in buffer_ids)
        if tuple(value.shape) != tuple(t.shape):
            raise MoefxError(f"{name}: the source gives shape {list(value.shape)} but the model expects "
                             f"{list(t.shape)} (global tensor {rec.global_name}, offsets {list(rec.offsets)}): is the "
                             "source the same model?")
        value = value.to(device=device, dtype=t.dtype if t.is_floating_point() or value.dtype != t.dtype else None)
        value = value.contiguous()
        assigned = None
        for n, _ in items:
            assigned = _assign(gm, n, assigned if assigned is not None else value, t)
    retarget(gm, torch.device("meta"), device)
    return gm


def retarget(gm: fx.GraphModule, old: torch.device, new: torch.device) -> fx.GraphModule:
    """Rewrite the device literals of `gm`'s graph (and its sub-graphs) from `old` to `new` (a CUDA
    device without an index becomes the current one: metadata asserts compare indexed devices)."""
    old, new = torch.device(old), torch.device(new)
    if new.type == "cuda" and new.index is None:
        new = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if old == new:
        return gm
    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        changed = False
        for node in mod.graph.nodes:
            dev = node.kwargs.get("device")
            if isinstance(dev, (torch.device, str)) and torch.device(dev).type == old.type:
                node.kwargs = {**node.kwargs, "device": new}
                changed = True
            if any(isinstance(a, torch.device) and a.type == old.type for a in node.args):
                node.args = tuple(new if isinstance(a, torch.device) and a.type == old.type else a for a in node.args)
                changed = True
        if changed:
            mod.recompile()
    return gm
