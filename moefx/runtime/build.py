"""Build a rank's model from a model spec without ever holding the whole model: the runtime's straight line.

    spec + plan
      -> skeleton on the meta device (built-in config, or a Hugging Face folder's config.json)
      -> capture + convert + distribute on meta              (no memory; the same passes as always)
      -> materialise this rank's tensors from the source     (moefx.weights.materialize)

The source of the dense weights (`ModelSpec`): a Hugging Face safetensors folder (`weights`,
streamed slice by slice), the dense model's own init (`init="model"`: the small dense model built
on the rank, the built-ins' default, so results equal `moefx.convert(load_model(name))`), or a
seeded per-tensor init (`init="seeded"`: no dense weights anywhere, for plans larger than any
machine). Buffers (rotary frequencies, position ids) come from the model built with its
parameters on meta (`moefx.models.skeleton.params_on_meta`). A moefx sharded checkpoint is
loaded over the materialised tensors by the job (`checkpoint.load_sharded`).

`build_generator` does the same for generation: prefill and decode graphs with a static KV cache
(`moefx.gen`), converted and partitioned on meta with one mesh, the prefill's tensors
materialised (the cache as zeros, only this rank's heads) and the decode graph tied to them.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import fx, nn

from ..convert import convert
from ..dist.checkpoint import read_info
from ..dist.mesh import build_mesh
from ..distribute import distribute, resolve
from ..errors import InexactConversionWarning, MoefxError
from ..facts import record_facts
from ..gen.fill import cache_source, fill_generator
from ..gen.generator import Generator, convert_graphs, model_positions, special_tokens
from ..memory import check_step_fits, local_ranks
from ..models import load_model
from ..models.skeleton import params_on_meta
from ..plan import Plan
from ..tensors import share_tensors
from ..versions import library_versions
from ..weights.materialize import materialize
from ..weights.sources import (
    ChainSource,
    ModuleSource,
    PrefixedSource,
    SafetensorsSource,
    SeededSource,
    Source,
    check_safetensors,
    tied_aliases,
)
from .calibrate import measure_profile

__all__ = ["ModelSpec", "Skeleton", "skeleton", "dense_source", "convert_meta", "build_rank", "build_reference",
           "build_generator", "build_train_graphs", "partition", "job_record", "recorded_job", "dense_model", "INITS"]

INITS = ("model", "seeded")


@dataclass(frozen=True)
class ModelSpec:
    """What to build: `name` (a built-in or package.module:function) or `weights` (a Hugging Face
    folder with config.json and safetensors); `init` for a built-in without weights ("model" or
    "seeded"); seed / batch / seq size the example inputs (and seed the built-in's init)."""

    name: str | None = None
    weights: str | None = None
    init: str = "model"
    seed: int = 0
    batch: int = 2
    seq: int = 8

    def __post_init__(self) -> None:
        if (self.name is None) == (self.weights is None):
            raise MoefxError("give a model name (built-in or package.module:function) or a --weights folder, "
                             "not both and not neither")
        if self.init not in INITS:
            raise MoefxError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def label(self) -> str:
        return self.name or f"weights {self.weights}"

    def to_dict(self) -> dict:
        """The spec as a JSON-able dict, a weights folder as an absolute path (`from_dict` reads it)."""
        out = dataclasses.asdict(self)
        if self.weights is not None:
            out["weights"] = str(Path(self.weights).resolve())
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """The spec `to_dict` wrote (MoefxError naming the field when it is not one)."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            raise MoefxError(f"not a recorded model spec: {d!r} (fields: {sorted(known)})")
        return cls(**d)


def job_record(spec: ModelSpec, plan) -> dict:
    """What a checkpoint records about the job that wrote it: the model spec, the plan and the library
    versions (`recorded_job` reads it back)."""
    return {"model": spec.to_dict(), "plan": plan.to_dict(), "versions": library_versions()}


def recorded_job(path) -> tuple[ModelSpec, Plan] | None:
    """(model spec, plan) a sharded checkpoint recorded (`job_record`), or None when it has no record."""
    record = read_info(path).get("record")
    if not record:
        return None
    return ModelSpec.from_dict(record["model"]), Plan.from_dict(record["plan"])


@dataclass
class Skeleton:
    """The model on the meta device, meta example inputs, and a source of its real buffers."""

    model: nn.Module
    inputs: tuple
    buffers: Source
    aliases: dict


def _hf_class(folder: Path):
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise MoefxError(f"{folder}/config.json names no transformers architecture this install has ({arch!r})")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    config._attn_implementation = "sdpa"
    return cls, config


def _hf_inputs(config, batch: int, seq: int, seed: int, device) -> tuple:
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise MoefxError("a --weights folder must hold a model that takes input_ids (its config has no vocab_size)")
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq), generator=g).to(device),)


def _build_hf(folder: Path, device):
    cls, config = _hf_class(folder)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    return model.eval(), config


def skeleton(spec: ModelSpec) -> Skeleton:
    """The model on meta (no memory), meta example inputs and its real buffers."""
    if spec.weights is not None:
        folder = Path(spec.weights)
        if not (folder / "config.json").exists():
            raise MoefxError(f"--weights {str(folder)!r} has no config.json: give a folder written by save_pretrained")
        meta_model, config = _build_hf(folder, "meta")
        with params_on_meta():
            real_buffers, _ = _build_hf(folder, "cpu")
        inputs = _hf_inputs(config, spec.batch, spec.seq, spec.seed, "meta")
    else:
        meta_model, inputs = load_model(spec.name, device="meta", seed=spec.seed, batch=spec.batch, seq=spec.seq)
        with params_on_meta():
            real_buffers, _ = load_model(spec.name, seed=spec.seed, batch=1, seq=1)   # its buffers, not inputs
    aliases = tied_aliases(meta_model)
    return Skeleton(meta_model, inputs, ModuleSource(real_buffers, aliases), aliases)


def dense_model(spec: ModelSpec, device="cpu") -> tuple[nn.Module, tuple]:
    """The spec's dense model with its weights, in eval mode, and example inputs: a built-in (its own
    init) or a Hugging Face folder (`from_pretrained`, local files only)."""
    if spec.weights is None:
        return load_model(spec.name, device=device, seed=spec.seed, batch=spec.batch, seq=spec.seq)
    cls, config = _hf_class(Path(spec.weights))
    check_safetensors(spec.weights)                  # transformers would not name a damaged file
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(spec.weights, config=config, local_files_only=True)
    return model.to(device).eval(), _hf_inputs(config, spec.batch, spec.seq, spec.seed, device)


def example_inputs(spec: ModelSpec, device="cpu") -> tuple:
    """Real example inputs of the spec's shape (the built-in's own, or random token ids)."""
    if spec.weights is not None:
        _, config = _hf_class(Path(spec.weights))
        return _hf_inputs(config, spec.batch, spec.seq, spec.seed, device)
    with params_on_meta():
        _, inputs = load_model(spec.name, seed=spec.seed, batch=spec.batch, seq=spec.seq)
    return tuple(x.to(device) for x in inputs)


def dense_source(spec: ModelSpec, skel: Skeleton) -> Source:
    """Where the dense weights come from (see the module docstring)."""
    if spec.weights is not None:
        return SafetensorsSource(spec.weights, skel.aliases)
    if spec.init == "seeded":
        shapes = {n: tuple(t.shape) for n, t in skel.model.state_dict(keep_vars=True).items()}
        dtypes = {n: t.dtype for n, t in skel.model.state_dict(keep_vars=True).items()}
        return SeededSource(shapes, seed=spec.seed, dtypes=dtypes, aliases=skel.aliases)
    model, _ = load_model(spec.name, seed=spec.seed, batch=spec.batch, seq=spec.seq)
    return ModuleSource(model, skel.aliases)


def convert_meta(spec: ModelSpec, plan, *, train: bool = False, target: str | None = None
                 ) -> tuple[fx.GraphModule, Skeleton]:
    """Capture and convert the spec's model on the meta device, lowered for `target` (the device
    type it will run on; None: "cpu"): (converted graph, skeleton)."""
    skel = skeleton(spec)
    declared = model_positions(skel.model)
    if declared and spec.seq > declared[1]:
        raise MoefxError(f"--seq {spec.seq} exceeds the model's {declared[1]} positions (config.{declared[0]}): use "
                         f"--seq <= {declared[1]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=InexactConversionWarning)
        gm = convert(skel.model, plan, skel.inputs, copy_weights=False, train=train, target=target or "cpu")
    return gm, skel


def needs_profile(resolved) -> bool:
    """Whether some layer leaves the flat / hierarchical choice to the cost model."""
    return any(lp.hierarchical == "auto" and lp.hier_shape is not None and lp.ep > 1 for lp in resolved.layers)


def partition(plan, graphs: list[tuple[fx.GraphModule, int]], *, profile=None, measure: bool = False, mesh=None):
    """This rank's partitioned graphs of the converted `graphs` ((graph, tokens per rank) pairs) and
    the cost profile used. One mesh for all: `mesh` (the job's, `moefx.dist.mesh.Mesh`; it must hold
    every group the plan needs) or, when None, one built here. Without a profile, one is measured on
    that mesh first (`moefx.runtime.calibrate`) when `measure` and a layer leaves hierarchical_a2a to
    the cost model. Needs an initialised process group."""
    resolved = resolve(graphs[0][0], plan.parallel, dist.get_world_size())
    if mesh is None:
        mesh = build_mesh(resolved)
    else:
        mesh.check_covers(resolved)
    if profile is None and measure and needs_profile(resolved):
        profile = measure_profile(mesh)
    return [distribute(gm, plan, mesh=mesh, tokens_per_rank=tokens, profile=profile) for gm, tokens in graphs], profile


def build_rank(spec: ModelSpec, plan, *, device="cpu", train: bool = False, tokens_per_rank: int = 4096,
               profile=None, measure: bool = False, source: Source | None = None, mesh=None):
    """This rank's materialised GraphModule (under an initialised process group) and the skeleton.

    Only this rank's tensors are ever allocated: conversion and partitioning run on meta, then
    `materialize` fills the rank's pieces from the source (`dense_source(spec)` unless given).
    profile: a `moefx.cost.CostProfile` for hierarchical_a2a = "auto"; measure: without one,
    measure it on this job's groups first (`moefx.runtime.calibrate`) when a layer needs it; mesh:
    the job's mesh (`local.moefx_mesh` of an earlier build; None: build one)."""
    gm, skel = convert_meta(spec, plan, train=train, target=torch.device(device).type)
    (local,), profile = partition(plan, [(gm, tokens_per_rank)], profile=profile, measure=measure, mesh=mesh)
    materialize(local, source if source is not None else dense_source(spec, skel), device=device,
                buffers=skel.buffers)
    record_facts(local, profile=profile)
    return local, skel


def build_reference(spec: ModelSpec, plan, *, device="cpu", train: bool = False,
                    source: Source | None = None) -> fx.GraphModule:
    """The single-process converted model, materialised whole (what every rank must agree with)."""
    gm, skel = convert_meta(spec, plan, train=train, target=torch.device(device).type)
    return materialize(gm, source if source is not None else dense_source(spec, skel), device=device,
                       buffers=skel.buffers)


def build_generator(spec: ModelSpec, plan, *, batch_size: int, max_cache_len: int, prompt_len: int = 4,
                    device="cpu", distributed: bool = True, profile=None, measure: bool = False,
                    source: Source | None = None, weight_layout: str = "auto"):
    """A `moefx.gen.Generator` of this rank's prefill and decode graphs (distributed=False: the
    whole single-process model), built on meta and materialised as `build_rank` does;
    weight_layout: see `moefx.gen.Generator`."""
    skel = skeleton(spec)
    prefill, decode = convert_graphs(skel.model, plan, batch_size=batch_size, max_cache_len=max_cache_len,
                                     prompt_len=prompt_len, target=torch.device(device).type)
    caches = cache_source(prefill)
    if distributed:
        (prefill, decode), _ = partition(plan, [(prefill, batch_size * prompt_len), (decode, batch_size)],
                                         profile=profile, measure=measure)
    # the generation graphs wrap the LM as `model`: its tensors are model.<name>
    dense = PrefixedSource(source if source is not None else dense_source(spec, skel), "model.")
    fill_generator(prefill, decode, dense, ChainSource(caches, PrefixedSource(skel.buffers, "model.")), device)
    eos, pad = special_tokens(skel.model)
    return Generator(prefill, decode, batch_size, max_cache_len, eos_token_id=eos, pad_token_id=pad, plan=plan,
                     weight_layout=weight_layout)


def build_train_graphs(spec: ModelSpec, plan, *, device="cpu", distributed: bool = True, tokens_per_rank: int = 4096,
                       profile=None, measure: bool = False, source: Source | None = None, with_eval: bool = True,
                       mesh=None) -> tuple[fx.GraphModule, fx.GraphModule | None]:
    """(train-mode graph, eval-mode graph) of this rank (distributed) or of the whole model, sharing
    every tensor: the train graph keeps the model's dropout, the eval graph has none. with_eval=False
    skips the eval graph (one capture less) and returns None in its place; mesh: the job's (None:
    build one)."""
    target = torch.device(device).type
    train_gm, skel = convert_meta(spec, plan, train=True, target=target)
    tp = plan.parallel.tp if distributed and plan.parallel is not None and isinstance(plan.parallel.tp, int) else 1
    check_step_fits(train_gm, torch.device(device), batch=spec.batch, seq=spec.seq, share=1 / tp,
                    ranks_here=local_ranks() if distributed else 1)
    eval_gm = convert_meta(spec, plan, train=False, target=target)[0] if with_eval else None
    if distributed:
        graphs = [gm for gm in (train_gm, eval_gm) if gm is not None]
        parts, _ = partition(plan, [(gm, tokens_per_rank) for gm in graphs], profile=profile, measure=measure,
                             mesh=mesh)
        train_gm, eval_gm = parts if eval_gm is not None else (parts[0], None)
    source = source if source is not None else dense_source(spec, skel)
    materialize(train_gm, source, device=device, buffers=skel.buffers)
    if eval_gm is not None:
        share_tensors(eval_gm, train_gm)
        materialize(eval_gm, source, device=device, buffers=skel.buffers)
    return train_gm, eval_gm
