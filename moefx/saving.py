"""Save a converted model (or a Generator) to a folder and load it back without the script that made it.

    moefx.save(moe_model, "out/moe")           # a converted GraphModule, e.g. after training
    moe_model = moefx.load("out/moe")          # rebuilt: same graph, same weights
    moefx.save(gen, "out/gen"); gen = moefx.load("out/gen")   # a Generator: prefill + decode graphs
    gen = moefx.saving.load_generator("out/moe", batch_size=8)  # generate from a saved (trained) graph

The folder holds `model.safetensors` (every tensor of the converted graph, tied tensors once, a
generator's KV cache left out) and `moefx.json` (format, what it is, the origin `convert`
recorded: the dense model's built-in name or transformers class + config, the plan, the
example-input shapes and capture options; the ties; the SHA-256 of the weights file). `load`
rebuilds the dense model on the meta device, replays capture + convert (deterministic: the same
graph and tensor names), and fills every tensor from the file (`moefx.weights.materialize`), so
only the converted model's tensors are ever allocated. The folder is published atomically: a
failed save leaves no half-written folder behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx, nn

from . import origin as O
from .convert import convert
from .errors import InexactConversionWarning, MoefxError
from .facts import facts
from .fileio import publish_folder, sha256_file
from .gen.cache import is_cache_buffer
from .gen.fill import cache_source, fill_generator
from .gen.generator import Generator, convert_graphs, position_limit, special_tokens
from .models.skeleton import params_on_meta
from .plan import Plan
from .tensors import named_tensors
from .weights.materialize import materialize
from .weights.sources import ChainSource, ModuleSource, PrefixedSource, SafetensorsSource

__all__ = ["save", "load", "load_generator", "read", "FORMAT"]

FORMAT = "moefx-save/1"
WEIGHTS, INFO = "model.safetensors", "moefx.json"


def _tensors(gm: nn.Module, skip=lambda name: False) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(name -> tensor with ties stored once, name -> other names of the same tensor)."""
    first: dict[int, str] = {}
    out, ties = {}, {}
    for name, t in named_tensors(gm):
        if skip(name):
            continue
        if id(t) in first:
            ties.setdefault(first[id(t)], []).append(name)
            continue
        first[id(t)] = name
        out[name] = t.detach().contiguous().cpu()
    return out, ties


def save(obj, folder: str | os.PathLike) -> Path:
    """Write a converted GraphModule or a `moefx.gen.Generator` to `folder` (see the module docstring).

    Refuses (MoefxError, before writing anything) a partitioned rank graph (save those with
    `moefx.dist.checkpoint.save_sharded`) and a graph whose dense model cannot be rebuilt.
    Returns the folder's path."""
    if isinstance(obj, Generator):
        gm, kind = obj.prefill, "generator"
        skip = is_cache_buffer
        settings = {"batch_size": obj.batch_size, "max_cache_len": obj.max_cache_len,
                    "eos_token_id": obj.eos_token_id, "pad_token_id": obj.pad_token_id}
    elif isinstance(obj, fx.GraphModule):
        gm, kind, skip, settings = obj, "graph", (lambda name: False), {}
    else:
        raise MoefxError(f"moefx.save takes a converted GraphModule or a Generator, not {type(obj).__name__}")
    if facts(gm).parallel is not None:
        raise MoefxError("this graph is one rank's partition (moefx.distribute): save it with "
                         "moefx.dist.checkpoint.save_sharded, or save the unpartitioned converted model")
    info = facts(gm).origin
    if info is None or info.get("model") is None:
        raise MoefxError("moefx.save needs to know how to rebuild the dense model: convert a built-in "
                         "(moefx.models.load_model), a package.module:function model or a transformers model")
    if kind == "graph" and info.get("inputs") is None:
        raise MoefxError("moefx.save replays the capture from the example inputs' shapes: convert with positional "
                         "tensor example_inputs (no example_kwargs)")
    if info["capture"]["dynamic_shapes"] == "unsupported":
        raise MoefxError("moefx.save can replay dynamic_shapes='auto' or None only; this graph was captured with "
                         "custom dynamic_shapes")
    tensors, ties = _tensors(gm, skip)
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise MoefxError(f"refusing to save non-finite weights: {bad[:4]}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        record = {"format": FORMAT, "kind": kind, "origin": info, "ties": ties, "settings": settings,
                  "sha256": sha256_file(tmp / WEIGHTS), "torch": torch.__version__}
        (tmp / INFO).write_text(json.dumps(record, indent=1, default=str) + "\n")
        return publish_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read(folder: str | os.PathLike) -> dict:
    """The `moefx.json` record of a saved folder (MoefxError when it is not one)."""
    path = Path(folder) / INFO
    if not path.exists():
        raise MoefxError(f"{str(folder)!r} is not a folder written by moefx.save (no {INFO})")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise MoefxError(f"{path}: format {record.get('format')!r}, this moefx reads {FORMAT!r}")
    return record


def _open(folder: str | os.PathLike, verify: bool):

    record = read(folder)
    folder = Path(folder)
    if verify and sha256_file(folder / WEIGHTS) != record["sha256"]:
        raise MoefxError(f"{folder / WEIGHTS} does not match the checksum in {INFO}: the file was changed or is "
                         "damaged")
    info = record["origin"]
    saved = SafetensorsSource(folder, aliases=_aliases(record["ties"]))
    return record, info, _plan(info["plan"]), saved, ModuleSource(_real_buffers(info))


def load(folder: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True,
         weight_layout: str = "auto"):
    """The converted GraphModule or Generator saved in `folder`, its tensors on `device`.

    verify: check the weights file's SHA-256 first (MoefxError when it differs); weight_layout: a
    Generator's (see `moefx.gen.Generator`)."""
    record, info, plan, saved, buffers = _open(folder, verify)
    if record["kind"] == "generator":
        s = record["settings"]
        return _generator(record, plan, saved, buffers, device, s["batch_size"], s["max_cache_len"], weight_layout)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=InexactConversionWarning)
        gm = convert(O.rebuild_model(info, "meta"), plan, O.example_inputs(info), copy_weights=False,
                     target=torch.device(device).type, **_capture(info))
    return materialize(gm, ChainSource(saved, buffers), device=device)


def load_generator(folder: str | os.PathLike, *, batch_size: int | None = None, max_cache_len: int | None = None,
                   device: str | torch.device = "cpu", verify: bool = True, weight_layout: str = "auto"):
    """A Generator from a saved Generator or a saved converted graph (e.g. a trained model), with a
    cache of batch_size x max_cache_len (default: the saved generator's, or 1 x the model's limit).
    weight_layout: see `moefx.gen.Generator`."""
    record, info, plan, saved, buffers = _open(folder, verify)
    s = record["settings"]
    if record["kind"] == "graph":
        saved = PrefixedSource(saved, "model.")           # the generation graphs wrap the LM as `model`
    return _generator(record, plan, saved, buffers, device, batch_size or s.get("batch_size", 1),
                      max_cache_len or s.get("max_cache_len"), weight_layout)


def _plan(d: dict):

    return Plan.from_dict(d)


def _capture(info: dict) -> dict:
    return {"dynamic_shapes": info["capture"]["dynamic_shapes"], "train": info["capture"]["train"]}


def _aliases(ties: dict) -> dict:
    out = {}
    for name, others in ties.items():
        group = [name, *others]
        for n in group:
            out[n] = [m for m in group if m != n]
    return out


def _real_buffers(info: dict) -> nn.Module:
    """The dense model with its parameters on meta and its buffers computed (rotary frequencies, ...)."""
    with params_on_meta():
        return O.rebuild_model(info, "cpu")


def _generator(record: dict, plan, saved, buffers, device, batch_size: int, max_cache_len: int | None,
               weight_layout: str = "auto"):
    meta_model = O.rebuild_model(record["origin"], "meta")
    max_cache_len = max_cache_len or position_limit(meta_model)
    prefill, decode = convert_graphs(meta_model, plan, batch_size=batch_size, max_cache_len=max_cache_len,
                                     prompt_len=record["origin"].get("generator", {}).get("prompt_len", 4),
                                     target=torch.device(device).type)
    fill_generator(prefill, decode, ChainSource(saved, cache_source(prefill), PrefixedSource(buffers, "model.")),
                   None, device)
    s = record["settings"]
    eos, pad = special_tokens(meta_model, s.get("eos_token_id"), s.get("pad_token_id"))
    return Generator(prefill, decode, batch_size, max_cache_len, eos_token_id=eos, pad_token_id=pad, plan=plan,
                     weight_layout=weight_layout)
