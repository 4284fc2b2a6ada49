"""Sharded checkpoints of partitioned models with torch.distributed.checkpoint (DCP), reshardable.

Every rank of a `moefx.distribute`d model calls `save_sharded(local, path)`; the checkpoint holds
the GLOBAL tensors of the converted (unpartitioned) model, each written as the pieces the ranks
hold, so it loads at any other world size / parallel plan (`load_sharded`) or into one process
without any process group (`load_full`)::

    local = moefx.distribute(moe_model, plan_at_world_4)
    ... train ...
    save_sharded(local, "ckpt/step100")                 # every rank (collective)

    local2 = moefx.distribute(fresh_moe_model, plan_at_world_2)
    load_sharded(local2, "ckpt/step100")                # every rank of the new world (collective)

    load_full(moefx.convert(model, plan, inputs), "ckpt/step100")   # single process, no group

Global names and pieces (`pieces`, read from what partition records):
- expert weights of MoE layer L: one global stacked tensor `moe{L}.experts.<param>` ([E, ...]);
  a rank holds rows [first_expert, first_expert + n) of it and, with expert slicing, column range
  `slice_of(rank)` of the expert inner dimension f (up weights dim 2, up biases dim 1, down weight
  dim 1; the down bias is whole on every slice and slice 0's copy is the one that counts);
- tensor-parallel shards `tp_shard_<target>[_chunkN]` (`meta["moefx_shards"]`): range [lo, hi)
  of `dim` of their original target; a fused qkv projection gives one rank several shards;
- everything else is replicated.

A global tensor the rank holds whole is given to DCP as a plain tensor; one it holds pieces of
as a `DTensor` whose local tensor is a `LocalShardsWrapper` (torch's multi-shard local tensor,
the form torchrec gives DCP) listing each piece with its global offsets. DCP writes one chunk per
(name, offsets) and reshards on load by intersecting the saved chunks with the requested ones.
Why not DTensor placements alone: one rank may hold several non-adjacent ranges of one tensor
(the q, k and v rows of a fused projection), which Shard/Replicate placements cannot express, and
taking offsets from partition's own records keeps the checkpoint right whatever layout partition
chooses. Why not ShardedTensor: deprecated, and its construction is collective. The DTensor sits
on a 1-D world mesh built with `_init_backend=False` (DCP only asks whether the rank is on it;
its collectives use the default group), so checkpointing creates no process group. All of this
works on gloo / CPU.

Replicas (EDP copies of an expert piece, DP copies of a TP shard, every copy of a replicated
tensor, the down bias of slices > 0) are chunks with the same (name, offsets); DCP's save planner
de-duplicates them and, with `dedup_save_to_lowest_rank=True`, keeps the lowest rank's copy.
Writes are atomic: DCP writes into `.<name>.moefx-tmp` next to `path`, which then replaces
`path` by rename (an existing checkpoint is moved aside first and deleted after).

Not saved: optimizer state, RNG state, the unused full-size originals that partition leaves
next to TP shards.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..errors import MoefxError

__all__ = ["save_sharded", "load_sharded", "load_full", "sharded_state_dict", "Piece", "pieces",
           "checkpoint_tensors", "CheckpointError", "FORMAT"]

FORMAT = "moefx-dcp-1"
_SIDE_CAR = "moefx.json"


class CheckpointError(MoefxError, ValueError):
    """A checkpoint does not fit the model it is loaded into (names, shapes, coverage)."""


@dataclass(frozen=True)
class Piece:
    """Where one local tensor sits in its global tensor.

    local_name: its state_dict key in the rank's GraphModule; global_name: the key of the global
    tensor in the unpartitioned converted GraphModule; offsets: the global index of its first
    element (it covers offsets + local shape).
    """

    local_name: str
    global_name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return not any(self.offsets)


# StackedExperts parameter -> its expert inner (f) dimension, sliced by expert slicing.
def _inner_dim(param: str) -> int | None:
    if param.startswith("up_weight."):
        return 2
    if param.startswith("up_bias."):
        return 1
    if param == "down_weight":
        return 1
    if param == "down_bias":
        return None
    raise CheckpointError(f"unknown expert parameter {param!r}: moefx checkpoints know StackedExperts' "
                          "up_weight.N, up_bias.N, down_weight and down_bias")


def _state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict(keep_vars=True))


def pieces(local: torch.nn.Module) -> list[Piece]:
    """Every state_dict entry of a distributed GraphModule as a Piece of its global tensor.

    Read from partition's records: `meta["moefx_shards"]` (TP shards: target, dim, lo, hi; a fused
    projection gives several shards of one target), `meta["moefx_parallel"]` + `meta["moefx_rank"]`
    (which experts / expert slice this rank holds). The full-size originals that partition leaves
    next to their TP shards are left out. Without partition metadata every entry is whole.
    """
    from ..nn.moe import moe_layers

    state = _state(local)
    meta = getattr(local, "meta", {}) or {}
    resolved = meta.get("moefx_parallel")
    if resolved is None:
        return [Piece(n, n, tuple(t.shape), (0,) * t.dim()) for n, t in state.items()]
    rank = meta["moefx_rank"]
    shards = meta.get("moefx_shards", {})
    shadowed = {target for target, *_ in shards.values()} - set(shards)
    expert_prefix = {f"moe{layer}.experts.": (index, mod) for index, (layer, mod) in enumerate(moe_layers(local))}

    out: list[Piece] = []
    for name, t in state.items():
        if name in shadowed:
            continue
        offsets = [0] * t.dim()
        shape = list(t.shape)
        if name in shards:
            target, dim, lo, hi = shards[name][:4]
            if len(shards[name]) > 4:
                shape = list(shards[name][4])
            elif target in state:
                shape = list(state[target].shape)
            elif sum(1 for v in shards.values() if v[0] == target) == 1:
                shape[dim] = (hi - lo) * resolved.tp
            else:
                raise CheckpointError(f"{name}: cannot tell the global shape of {target} (its full-size "
                                      "original is gone and it has several shards on this rank)")
            offsets[dim] = lo
            out.append(Piece(name, target, tuple(shape), tuple(offsets)))
            continue
        prefix = next((p for p in expert_prefix if name.startswith(p)), None)
        if prefix is None:
            out.append(Piece(name, name, tuple(shape), tuple(offsets)))
            continue
        index, mod = expert_prefix[prefix]
        lp = resolved.layers[index]
        mine = lp.experts_of(rank)
        if t.shape[0] != len(mine) or mod.experts.first_expert != mine.start:
            raise CheckpointError(f"{name}: rank {rank} holds experts [{mod.experts.first_expert}, "
                                  f"{mod.experts.first_expert + t.shape[0]}) but the plan gives it "
                                  f"[{mine.start}, {mine.stop})")
        shape[0], offsets[0] = lp.experts, mine.start
        inner = _inner_dim(name[len(prefix):])
        if lp.expert_slicing > 1 and inner is not None:
            offsets[inner] = lp.slice_of(rank) * shape[inner]
            shape[inner] *= lp.expert_slicing
        # the down bias is whole on every slice; slice 0's copy counts (same offsets: de-duplicated)
        out.append(Piece(name, name, tuple(shape), tuple(offsets)))
    return out


_MESHES: dict[tuple, Any] = {}


def _world_mesh(device_type: str, world: int, rank: int):
    """A 1-D DeviceMesh over the world that creates no process group (DCP only asks whether this
    rank is on it; the pieces' positions come from their LocalShardsWrapper)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = (device_type, world, rank)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(device_type, torch.arange(world), mesh_dim_names=("world",),
                                  _init_backend=False, _rank=rank)
    return _MESHES[key]


def sharded_state_dict(local: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What DCP sees for a distributed GraphModule: global name -> plain tensor (the rank holds it
    whole) or DTensor over a LocalShardsWrapper of this rank's pieces with their global offsets.
    The values share storage with `local`'s tensors, so loading into them loads the model."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    state = _state(local)
    by_global: dict[str, list[Piece]] = {}
    for piece in pieces(local):
        by_global.setdefault(piece.global_name, []).append(piece)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    out: dict[str, torch.Tensor] = {}
    for name, ps in by_global.items():
        ps.sort(key=lambda p: p.offsets)
        tensors = [state[p.local_name].detach() for p in ps]
        if len(ps) == 1 and tuple(tensors[0].shape) == ps[0].global_shape:
            out[name] = tensors[0]
            continue
        wrapper = LocalShardsWrapper(tensors, [p.offsets for p in ps])
        shape = torch.Size(ps[0].global_shape)
        out[name] = DTensor.from_local(wrapper, _world_mesh(tensors[0].device.type, world, rank), [Shard(0)],
                                       run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())
    return out


# ----------------------------------------------------------------------------------- save

@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns that it "assumes the intent" of a single process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.moefx-tmp"


def save_sharded(local: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write this rank's pieces of `local` (a `moefx.distribute` result) into the DCP checkpoint
    folder `path`; collective: every rank calls it with the same path (on a shared file system).

    Without an initialised process group it saves a single-process model whole (DCP no-dist mode).
    Returns the checkpoint folder. The folder appears atomically (written aside, then renamed).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    path = Path(path)
    tmp = _tmp_path(path)
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    state = sharded_state_dict(local)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)          # left over from a crashed save
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    with _quiet_no_dist():
        dcp.save(state, storage_writer=FileSystemWriter(tmp),
                 planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True), no_dist=not distributed)
    if distributed:
        dist.barrier()                  # every rank's files are written (and the metadata, by rank 0)
    error = None
    if rank == 0:
        try:
            resolved = getattr(local, "meta", {}).get("moefx_parallel")
            side = {"format": FORMAT, "world": dist.get_world_size() if distributed else 1,
                    "parallel": resolved.describe() if resolved is not None else None,
                    "tensors": {k: list(v.shape) for k, v in state.items()}}
            (tmp / _SIDE_CAR).write_text(json.dumps(side, indent=1))
            _swap_in(tmp, path)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    if distributed:                     # every rank returns only once the folder is in place (or fails)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(f"saving {str(path)!r}: rank 0 could not put the checkpoint in place: {error}")
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename tmp to path; an existing path is moved aside first and removed after."""
    old = path.parent / f".{path.name}.moefx-old"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- load

def checkpoint_tensors(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], list]]:
    """Global name -> (global shape, saved chunks as [(offsets, sizes), ...]) of a DCP checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{str(path)!r} is not a DCP checkpoint folder (no .metadata); "
                              "write one with moefx.runtime.checkpoint.save_sharded")
    md = FileSystemReader(path).read_metadata()
    return {k: (tuple(v.size), [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks])
            for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _verify(state: dict[str, torch.Tensor], path: Path, strict: bool) -> None:
    saved = checkpoint_tensors(path)
    problems = []
    missing = sorted(set(state) - set(saved))
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are not in the checkpoint: {missing[:8]}"
                        + (" ..." if len(missing) > 8 else ""))
    extra = sorted(set(saved) - set(state))
    if extra and strict:
        problems.append(f"{len(extra)} tensor(s) of the checkpoint are not in the model: {extra[:8]}"
                        + (" ..." if len(extra) > 8 else ""))
    for name, t in state.items():
        if name not in saved:
            continue
        shape, chunks = saved[name]
        if tuple(t.shape) != shape:
            problems.append(f"{name}: checkpoint has global shape {list(shape)}, the model {list(t.shape)}")
            continue
        covered = sum(math.prod(sizes) for _, sizes in chunks)
        if covered != math.prod(shape):
            problems.append(f"{name}: the saved pieces cover {covered} of {math.prod(shape)} elements")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model:\n  " + "\n  ".join(problems))


def _copy_back(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make sure the loaded values are in the model's tensors. DCP loads in place into the views
    `sharded_state_dict` made, so this copies nothing unless DCP had to replace a tensor."""
    from torch.distributed.tensor import DTensor

    own = _state(model)
    with torch.no_grad():
        for piece in pieces(model):
            value = state[piece.global_name]
            if isinstance(value, DTensor):
                wrapper = value.to_local()
                src = next(t for t, off in zip(wrapper.local_shards(), wrapper.local_offsets())
                           if tuple(off) == piece.offsets)
            else:
                src = value
            dst = own[piece.local_name]
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)


def load_sharded(local: fx.GraphModule, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a checkpoint into this rank's pieces of `local` (a `moefx.distribute` result), at any
    world size / plan: DCP reads, for every piece, the parts of the saved pieces that overlap it.
    Collective: every rank calls it. strict: the checkpoint may not hold tensors the model lacks.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = sharded_state_dict(local)
    _verify(state, path, strict)
    with _quiet_no_dist():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    _copy_back(local, state)


def load_full(gm: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a (sharded) checkpoint whole into a single-process, unpartitioned model (the converted
    GraphModule), without any process group (DCP no-dist mode)."""
    import torch.distributed.checkpoint as dcp

    if getattr(gm, "meta", {}).get("moefx_parallel") is not None:
        raise CheckpointError("load_full takes an unpartitioned model; this one was partitioned by "
                              "moefx.distribute: use load_sharded (under its process group)")
    path = Path(path)
    state = {name: t.detach() for name, t in _state(gm).items()}
    _verify(state, path, strict)
    with _quiet_no_dist():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    _copy_back(gm, state)
