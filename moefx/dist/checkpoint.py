"""Sharded checkpoints of partitioned models with torch.distributed.checkpoint (DCP), reshardable
and verified.

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

Where each local tensor sits in its global tensor comes from its placement record
(`moefx.placement`, written by the partition passes). A global tensor the rank holds whole is
given to DCP as a plain tensor; one it holds pieces of as a `DTensor` whose local tensor is a
`LocalShardsWrapper` (torch's multi-shard local tensor) listing each piece with its global
offsets. DCP writes one chunk per (name, offsets) and reshards on load by intersecting the saved
chunks with the requested ones. Why not DTensor placements alone: one rank may hold several
non-adjacent ranges of one tensor (the q, k and v rows of a fused projection), which
Shard/Replicate placements cannot express. The DTensor sits on a 1-D world mesh built with
`_init_backend=False` (DCP only asks whether the rank is on it), so checkpointing creates no
process group. Replicas (EDP copies of an expert piece, DP copies of a TP shard, every copy of a
replicated tensor) are chunks with the same (name, offsets); DCP's save planner keeps the lowest
rank's copy. `extra` tensors (optimizer state, sharded like their parameters) travel the same way.

Integrity: the side-car `moefx.json` holds a SHA-256 of every stored chunk (the byte range DCP
recorded for it) and of every file. `load_*` verify them first: overwritten bytes or swapped
shard files are a `CheckpointError` naming the piece; a damaged `.metadata` too. A model with
NaN / inf values is never saved (CheckpointError naming the rank and tensor). Publishing is
atomic: DCP writes into a hidden folder beside `path`, which then becomes what `path` names by
one atomic symlink swap (`moefx.fileio.publish_folder`), so `path` names a complete checkpoint at
every instant.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..facts import facts
from ..errors import CheckpointError
from ..fileio import free_bytes, publish_folder, resolve_folder, sha256_file, write_atomic
from ..placement import whole
from ..facts import placements

__all__ = ["save_sharded", "load_sharded", "load_full", "sharded_state_dict", "Piece", "pieces",
           "checkpoint_tensors", "read_info", "CheckpointError", "FORMAT"]

FORMAT = "moefx-dcp-2"
_SIDE_CAR = "moefx.json"


@dataclass(frozen=True)
class Piece:
    """Where one local tensor sits in its global tensor.

    local_name: its key in the rank's state; global_name: the key of the global tensor in the
    unpartitioned converted GraphModule; offsets: the global index of its first element (it
    covers offsets + local shape).
    """

    local_name: str
    global_name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return not any(self.offsets)


def _state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict(keep_vars=True))


def pieces(local: torch.nn.Module) -> list[Piece]:
    """Every state_dict entry of a (distributed) GraphModule as a Piece of its global tensor, from its
    placement record (an entry without one is whole)."""
    recs = placements(local)
    out = []
    for name, t in _state(local).items():
        rec = recs.get(name) or whole(name, tuple(t.shape))
        out.append(Piece(name, rec.global_name, tuple(rec.global_shape), tuple(rec.offsets)))
    return out


_MESHES: dict[tuple, Any] = {}


def _world_mesh(device_type: str, world: int, rank: int):
    """A 1-D DeviceMesh over the world that creates no process group."""
    key = (device_type, world, rank)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(device_type, torch.arange(world), mesh_dim_names=("world",),
                                  _init_backend=False, _rank=rank)
    return _MESHES[key]


def _dcp_state(tensors: dict[str, tuple[torch.Tensor, Piece]]) -> dict[str, torch.Tensor]:
    """Global name -> plain tensor (held whole) or DTensor over a LocalShardsWrapper of this rank's
    pieces. Values share storage with the given tensors, so loading into them loads in place."""
    by_global: dict[str, list[tuple[torch.Tensor, Piece]]] = {}
    for t, piece in tensors.values():
        by_global.setdefault(piece.global_name, []).append((t, piece))
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    out: dict[str, torch.Tensor] = {}
    for name, items in by_global.items():
        items.sort(key=lambda it: it[1].offsets)
        ts = [t.detach() for t, _ in items]
        ps = [p for _, p in items]
        if len(ps) == 1 and tuple(ts[0].shape) == ps[0].global_shape:
            out[name] = ts[0]
            continue
        wrapper = LocalShardsWrapper(ts, [p.offsets for p in ps])
        shape = torch.Size(ps[0].global_shape)
        out[name] = DTensor.from_local(wrapper, _world_mesh(ts[0].device.type, world, rank), [Shard(0)],
                                       run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride())
    return out


def _gather(local: torch.nn.Module, extra: dict | None, rename=None) -> dict[str, tuple[torch.Tensor, Piece]]:
    """local name -> (tensor, piece) for the model and the extra tensors ({name: (tensor, Placement)}).
    rename(global name) -> the name in the checkpoint, or None to leave the tensor out."""
    state = _state(local)
    out = {}
    for p in pieces(local):
        if rename is not None:
            name = rename(p.global_name)
            if name is None:
                continue
            p = Piece(p.local_name, name, p.global_shape, p.offsets)
        out[p.local_name] = (state[p.local_name], p)
    for name, (t, rec) in (extra or {}).items():
        rec = rec or whole(name, tuple(t.shape))
        out[f"extra:{name}"] = (t, Piece(f"extra:{name}", rec.global_name, tuple(rec.global_shape),
                                         tuple(rec.offsets)))
    return out


def sharded_state_dict(local: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What DCP sees for a (distributed) GraphModule (see the module docstring)."""
    return _dcp_state(_gather(local, None))


# ----------------------------------------------------------------------------------- errors

@contextlib.contextmanager
def _dcp_errors(what: str, path: Path, space=None):
    """DCP raises CheckpointException (a BaseException) and, for a damaged .metadata, pickle/EOF errors:
    turn them into CheckpointError, keeping KeyboardInterrupt / SystemExit as they are. space(): why
    the write may have run out of room (its serialiser reports a full disk as a position mismatch)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
            yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except CheckpointError:
        raise
    except (CheckpointException, Exception) as e:      # DCP's CheckpointException is a BaseException
        if isinstance(e, CheckpointException):
            first = next(iter((getattr(e, "failures", {}) or {}).items()), None)
            why = f"rank {first[0]}: {type(first[1]).__name__}: {first[1]}" if first else str(e)
            plain = f"{what} {str(path)!r} failed ({why})"
        else:
            why = f"{type(e).__name__}: {e}"
            plain = f"{what} {str(path)!r} failed: {why}"
        full = space() if space is not None else None
        raise CheckpointError(full + f" ({what} failed: {why})" if full else plain) from None


def _agree(error: str | None) -> None:
    """Raise CheckpointError on every rank when any rank has an error (the first one, naming its rank)."""
    if not dist.is_initialized():
        if error:
            raise CheckpointError(error)
        return
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, error)
    bad = [(r, e) for r, e in enumerate(box) if e]
    if bad:
        raise CheckpointError(bad[0][1] if bad[0][1].startswith("rank ") else f"rank {bad[0][0]}: {bad[0][1]}")


# ----------------------------------------------------------------------------------- checksums

def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _piece_key(fqn: str, offsets) -> str:
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


def _checksums(folder: Path) -> dict:
    """SHA-256 of every stored chunk (its byte range in its file) and of every data file."""
    md = FileSystemReader(folder).read_metadata()
    chunks: dict[str, str] = {}
    cache: dict[str, bytes] = {}
    for index, info in md.storage_data.items():
        data = cache.get(info.relative_path)
        if data is None:
            data = cache[info.relative_path] = (folder / info.relative_path).read_bytes()
        chunks[_piece_key(index.fqn, index.offset or ())] = _sha(data[info.offset:info.offset + info.length])
    files = {p.name: sha256_file(p)[:32] for p in sorted(folder.iterdir())
             if p.is_file() and p.name != _SIDE_CAR}
    return {"chunks": chunks, "files": files}


def _verify_checksums(folder: Path, side: dict) -> str | None:
    """None when every stored chunk and file matches the side-car's checksums, else what differs."""
    want = side.get("checksums")
    if want is None:
        return f"checkpoint {str(folder)!r} has no checksums in {_SIDE_CAR} (written by an older moefx?)"
    try:
        got = _checksums(folder)
    except Exception as e:  # a damaged or truncated .metadata
        return f"checkpoint {str(folder)!r} cannot be read: {type(e).__name__}: {e} (its .metadata is damaged)"
    bad_chunks = sorted(k for k, v in want["chunks"].items() if got["chunks"].get(k) != v)
    bad_files = sorted(k for k, v in want["files"].items() if got["files"].get(k) != v)
    if bad_chunks or bad_files:
        what = []
        if bad_chunks:
            what.append("pieces " + ", ".join(bad_chunks[:6]) + (" ..." if len(bad_chunks) > 6 else ""))
        if bad_files:
            what.append("files " + ", ".join(bad_files))
        return (f"checkpoint {str(folder)!r} is damaged: the stored bytes of {'; '.join(what)} do not match the "
                "checksums written with it (overwritten or swapped shard files); restore it from a copy or re-save")
    return None


# ----------------------------------------------------------------------------------- save

TMP_MARK = ".moefx-tmp-"


def _tmp_path(path: Path) -> Path:
    """A fresh hidden folder beside `path` for one save (unique, so two saves never share one)."""
    return path.parent / f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def _one_name(tmp: Path) -> Path:
    """Rank 0's temporary folder name on every rank (one save, one folder)."""
    if not dist.is_initialized():
        return tmp
    box = [str(tmp)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _space_error(path: Path, needed: int) -> str | None:
    """Why `needed` bytes will not fit beside `path`, or None."""
    free = free_bytes(path.parent)
    if free >= needed * 1.05 + (1 << 20):
        return None
    return (f"no space left for checkpoint {str(path)!r}: this rank writes about {needed / 2**20:.1f} MiB and the "
            f"file system of {str(path.parent)!r} has {free / 2**20:.1f} MiB free; free space there or use another "
            "--checkpoint-dir")


def _nonfinite(tensors: dict[str, tuple[torch.Tensor, Piece]]) -> str | None:
    for name, (t, _) in tensors.items():
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t.detach()).all()):
            return f"{name} has NaN or inf values: a non-finite model is not checkpointed"
    return None


def save_sharded(local: fx.GraphModule, path: str | os.PathLike, *, extra: dict | None = None,
                 info: dict | None = None, record: dict | None = None) -> Path:
    """Write this rank's pieces of `local` (a `moefx.distribute` result, or a single-process model)
    into the DCP checkpoint folder `path`; collective: every rank calls it with the same path (on a
    shared file system).

    extra: more tensors, {name: (tensor, Placement or None)} (e.g. optimizer state sharded like its
    parameter); info: JSON-able metadata stored in the side-car (step, data cursor, ...); record:
    what the checkpoint is of (the model spec, the plan, the library versions: `moefx.runtime.build
    .job_record`), so that a later job can rebuild the model without being told again.
    Returns the checkpoint folder. Raises CheckpointError (on every rank) when a tensor is not
    finite or a rank cannot write.
    """
    path = Path(path)
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    tmp = _one_name(_tmp_path(path))
    tensors = _gather(local, extra)
    _agree(_nonfinite(tensors))
    state = _dcp_state(tensors)
    needed = sum(t.numel() * t.element_size() for t, _ in tensors.values() if t.device.type != "meta")
    error = _space_error(path, needed)
    if rank == 0 and error is None:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            error = f"cannot create {tmp}: {e}"
    _agree(error)
    try:
        with _dcp_errors("saving", path, lambda: _space_error(path, needed)):
            dcp.save(state, storage_writer=FileSystemWriter(tmp),
                     planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True), no_dist=not distributed)
        if distributed:
            dist.barrier()
        _publish(local, path, tmp, tensors, state, record, info, distributed, rank)
    finally:
        if rank == 0 and tmp.exists():          # a failed save leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _publish(local, path: Path, tmp: Path, tensors: dict, state: dict, record, info, distributed: bool,
             rank: int) -> None:
    """Rank 0 writes the side-car into `tmp` and makes `tmp` what `path` names (every rank agrees)."""
    error = None
    if rank == 0:
        try:
            resolved = facts(local).parallel
            extras = sorted({piece.global_name for key, (_, piece) in tensors.items() if key.startswith("extra:")})
            side = {"format": FORMAT, "world": dist.get_world_size() if distributed else 1,
                    "parallel": resolved.describe() if resolved is not None else None,
                    "tensors": {k: list(v.shape) for k, v in state.items()}, "extras": extras,
                    "record": record, "info": info or {}, "checksums": _checksums(tmp)}
            write_atomic(tmp / _SIDE_CAR, json.dumps(side, indent=1))
            publish_folder(tmp, path)
        except OSError as e:
            error = f"rank 0 could not put the checkpoint in place: {type(e).__name__}: {e}"
    _agree(error)


# ----------------------------------------------------------------------------------- load

def read_info(path: str | os.PathLike) -> dict:
    """The side-car of a checkpoint (format, world, tensor shapes, extra tensor names, `record`,
    `info`, checksums)."""
    folder = resolve_folder(path)
    if not (folder / ".metadata").exists():
        raise CheckpointError(f"{str(path)!r} is not a DCP checkpoint folder (no .metadata); "
                              "write one with moefx.dist.checkpoint.save_sharded")
    try:
        side = json.loads((folder / _SIDE_CAR).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: cannot read its {_SIDE_CAR} ({type(e).__name__}: {e})") from None
    if side.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} has format {side.get('format')!r}; this moefx reads {FORMAT!r}")
    return side


def checkpoint_tensors(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], list]]:
    """Global name -> (global shape, saved chunks as [(offsets, sizes), ...]) of a DCP checkpoint."""
    folder = resolve_folder(path)
    if not (folder / ".metadata").exists():
        raise CheckpointError(f"{str(path)!r} is not a DCP checkpoint folder (no .metadata); "
                              "write one with moefx.dist.checkpoint.save_sharded")
    with _dcp_errors("reading", Path(path)):
        md = FileSystemReader(folder).read_metadata()
    return {k: (tuple(v.size), [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks])
            for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _verify_fit(state: dict[str, torch.Tensor], path: Path, strict: bool, side: dict) -> None:
    """Every requested tensor is saved whole with its shape; strict: and every saved model tensor is
    requested (the saved extra tensors, optimizer state, may be left: loading weights only is fine)."""
    saved = checkpoint_tensors(path)
    problems = []
    missing = sorted(set(state) - set(saved))
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are not in the checkpoint: {missing[:8]}"
                        + (" ..." if len(missing) > 8 else ""))
    extra = sorted(set(saved) - set(state) - set(side.get("extras", ())))
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
        plan = " (the plan differs from the one it was saved with?)" if side.get("record") else ""
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model{plan}:\n  " + "\n  ".join(problems))


def _check_integrity(path: Path, verify: bool) -> dict:
    """Read the side-car and (verify=True) check every checksum; rank 0 reads, every rank agrees."""
    side, error = None, None
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        side = read_info(path)
        if verify and rank == 0:
            error = _verify_checksums(resolve_folder(path), side)
    except CheckpointError as e:
        error = str(e)
    _agree(error)
    return side


def _copy_back(tensors: dict[str, tuple[torch.Tensor, Piece]], state: dict[str, torch.Tensor]) -> None:
    """Make sure the loaded values are in the given tensors (DCP loads in place into the views
    `_dcp_state` made, so this copies nothing unless DCP had to replace a tensor)."""
    with torch.no_grad():
        for dst, piece in tensors.values():
            value = state[piece.global_name]
            if isinstance(value, DTensor):
                wrapper = value.to_local()
                src = next(t for t, off in zip(wrapper.local_shards(), wrapper.local_offsets())
                           if tuple(off) == piece.offsets)
            else:
                src = value
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)


def load_sharded(local: fx.GraphModule, path: str | os.PathLike, *, extra: dict | None = None,
                 strict: bool = True, verify: bool = True, rename=None) -> dict:
    """Load a checkpoint into this rank's pieces of `local` (and of the `extra` tensors), at any world
    size / plan: DCP reads, for every piece, the parts of the saved pieces that overlap it.
    Collective: every rank calls it. strict: the checkpoint may not hold tensors the model (and
    extra) lacks; verify: check the checksums first; rename(global name) -> checkpoint name or None
    (left out): load a training checkpoint into generation graphs, whose names differ. Saved extra
    tensors (optimizer state) that are not asked for are left. Returns the side-car's `info`.
    """
    path = Path(path)
    side = _check_integrity(path, verify)
    tensors = _gather(local, extra, rename)
    state = _dcp_state(tensors)
    _verify_fit(state, path, strict, side)
    with _dcp_errors("loading", path):
        dcp.load(state, checkpoint_id=resolve_folder(path), no_dist=not dist.is_initialized())
    _copy_back(tensors, state)
    return side.get("info", {})


def load_full(gm: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True, verify: bool = True,
              rename=None) -> dict:
    """Load a (sharded) checkpoint whole into a single-process, unpartitioned model (the converted
    GraphModule), without any process group (DCP no-dist mode). Returns the side-car's `info`."""
    if facts(gm).parallel is not None:
        raise CheckpointError("load_full takes an unpartitioned model; this one was partitioned by "
                              "moefx.distribute: use load_sharded (under its process group)")
    path = Path(path)
    side = read_info(path)
    if verify:
        error = _verify_checksums(resolve_folder(path), side)
        if error:
            raise CheckpointError(error)
    tensors = _gather(gm, None, rename)
    state = {p.global_name: t.detach() for t, p in tensors.values()}
    _verify_fit(state, path, strict, side)
    with _dcp_errors("loading", path):
        dcp.load(state, checkpoint_id=resolve_folder(path), no_dist=True)
    _copy_back(tensors, state)
    return side.get("info", {})

