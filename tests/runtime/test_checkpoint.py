"""Sharded DCP checkpoints: save at world 4 (EP + expert slicing + TP + EDP replicas), load at
world 2 under two other plans and into one process without a process group, bit-exactly."""
from __future__ import annotations

import functools
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_world  # noqa: E402

MODEL = "nanogpt-tiny"   # no transformers import: each rank starts faster
MOE = {"experts": [2, 8], "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}
# world 4: layer 0 (2 experts) ep 4 = expert slicing over 2 ranks; layer 1 (8 experts) ep 2 x edp 2; tp 2
SAVE = {"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": [4, 2]}}
# world 2: plain EP (layer 0 one expert per rank, layer 1 four) / TP 2 with layer 0 replicated (ep 1)
LOAD = {"ep2": {"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": 2, "ep": 2}},
        "tp2-ep1-2": {"moe": MOE, "parallel": {"nodes": 2, "devices_per_node": 1, "tp": 2, "ep": [1, 2]}}}


@functools.cache
def _captured():
    import moefx
    from moefx.models import load_model

    model, inputs = load_model(MODEL)
    return moefx.capture(model, inputs), inputs


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _converted(plan_dict, perturb: bool):
    """The single-process converted model; perturbed deterministically (not the init values)."""
    import moefx

    captured, inputs = _captured()
    torch.manual_seed(0)
    gm = moefx.convert(captured, moefx.Plan.from_dict(plan_dict), inputs)
    if perturb:
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, p in sorted(gm.state_dict(keep_vars=True).items()):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return gm, inputs


def _save_world(rank, world, path):
    import torch.distributed as dist

    import moefx
    from moefx.dist.checkpoint import pieces, save_sharded

    ref, _ = _converted(SAVE, perturb=True)
    local = moefx.distribute(ref, moefx.Plan.from_dict(SAVE))
    mine = pieces(local)
    everyone = [None] * world
    dist.all_gather_object(everyone, [(p.global_name, p.offsets) for p in mine])
    lower = {key for r in range(rank) for key in everyone[r]}
    state = local.state_dict(keep_vars=True)
    with torch.no_grad():
        # Copies that a lower rank also holds get garbage: the checkpoint must hold the lowest's.
        for p in mine:
            if (p.global_name, p.offsets) in lower:
                state[p.local_name].add_(1000.0)
    save_sharded(local, path, info={"step": 7})
    assert os.path.isdir(path) and not [n for n in os.listdir(os.path.dirname(path)) if ".moefx-tmp" in n]


def _expected_local(ref_state, local):
    """The slice of the global (reference) tensor each local tensor must hold, by its placement record
    (the forward comparison below checks that the records themselves are right)."""
    from moefx.facts import placements

    out = {}
    for name, t in local.state_dict().items():
        rec = placements(local)[name]
        want = ref_state[rec.global_name]
        for dim in rec.shard_dims:
            want = want.narrow(dim, rec.offsets[dim], t.shape[dim])
        out[name] = want
    return out


def _load_world(rank, world, path):
    import moefx
    from moefx.dist.checkpoint import load_sharded

    ref, inputs = _converted(SAVE, perturb=True)
    ref_state = ref.state_dict()
    with torch.no_grad():
        want = _logits(ref(*inputs))
    for tag, plan_dict in LOAD.items():
        fresh, _ = _converted(plan_dict, perturb=False)
        local = moefx.distribute(fresh, moefx.Plan.from_dict(plan_dict))
        load_sharded(local, path)
        got_state = local.state_dict()
        expected = _expected_local(ref_state, local)
        assert expected, tag
        for name, t in expected.items():
            assert torch.equal(got_state[name], t), f"{tag}: rank {rank}: {name} differs from the saved slice"
        with torch.no_grad():
            out = _logits(local(*inputs))
        assert (out - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1.0), tag


@pytest.mark.dist
def test_save_at_4_load_at_2_and_1(tmp_path):
    from moefx.dist.checkpoint import FORMAT, checkpoint_tensors, load_full

    path = str(tmp_path / "ckpt")
    os.makedirs(path)                 # an older checkpoint at the same path gets replaced
    open(os.path.join(path, "stale"), "w").close()
    run_world(_save_world, 4, path, timeout=120)
    assert not os.path.exists(os.path.join(path, "stale")) and os.path.islink(path)
    side = json.load(open(os.path.join(path, "moefx.json")))
    assert side["format"] == FORMAT and side["world"] == 4 and side["info"] == {"step": 7}
    assert sorted(os.listdir(tmp_path)) == [".ckpt.v-" + os.readlink(path)[len(".ckpt.v-"):], "ckpt"]

    # one writer per piece: rank 0 writes replicated tensors; expert pieces of layer 1 (ep 2 x edp 2)
    # come from ranks 0 and 1 only; sliced layer 0 from all four ranks, its down bias from slice 0 ranks
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(os.path.realpath(path)).read_metadata()
    writers: dict[str, set] = {}
    for index, info in md.storage_data.items():
        writers.setdefault(index.fqn, set()).add(int(info.relative_path.split("_")[2]))
    assert writers["transformer.h.0.ln_1.weight"] == {0}
    assert writers["moe1.experts.up_weight.0"] == {0, 1}
    assert writers["moe0.experts.up_weight.0"] == {0, 1, 2, 3}
    assert writers["moe0.experts.down_bias"] == {0, 2}
    assert writers["transformer.h.0.mlp.c_fc.weight"] == {0, 1}       # tp 2 x dp 2: the dp-0 pair
    shapes = checkpoint_tensors(path)
    assert shapes["moe1.experts.up_weight.0"][0] == (8, 64, 256)
    assert len(shapes["moe0.experts.down_weight"][1]) == 4              # 2 experts x 2 slices

    # world 1: the unpartitioned model, no process group
    ref, inputs = _converted(SAVE, perturb=True)
    fresh, _ = _converted(SAVE, perturb=False)
    load_full(fresh, path)
    ref_state, got = ref.state_dict(), fresh.state_dict()
    assert set(ref_state) == set(got)
    for name, t in ref_state.items():
        assert torch.equal(got[name], t), f"load_full: {name} differs"

    run_world(_load_world, 2, path, timeout=120)


def test_load_full_errors_name_the_problem(tmp_path):
    from moefx.dist.checkpoint import CheckpointError, load_full, save_sharded

    gm, _ = _converted({"moe": MOE}, perturb=True)
    path = tmp_path / "single"
    save_sharded(gm, path)                      # no process group: a whole-model checkpoint
    fresh, _ = _converted({"moe": MOE}, perturb=False)
    load_full(fresh, path)
    for (name, a), b in zip(gm.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    other, _ = _converted({"moe": {**MOE, "experts": [4, 8]}}, perturb=False)
    with pytest.raises(CheckpointError, match=r"moe0.experts.down_weight: checkpoint has global shape \[2, 256, 64\]"):
        load_full(other, path)
    with pytest.raises(CheckpointError, match="not a DCP checkpoint"):
        load_full(fresh, tmp_path / "nothing")


def _damaged(tmp_path, name):
    """A saved whole-model checkpoint and a fresh model to load it into."""
    from moefx.dist.checkpoint import save_sharded

    gm, _ = _converted({"moe": MOE}, perturb=True)
    path = tmp_path / name
    save_sharded(gm, path)
    fresh, _ = _converted({"moe": MOE}, perturb=False)
    return path, os.path.realpath(path), fresh


def test_overwritten_bytes_are_a_checkpoint_error_naming_the_piece(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from moefx.dist.checkpoint import CheckpointError, load_full

    path, folder, fresh = _damaged(tmp_path, "bytes")
    md = FileSystemReader(folder).read_metadata()
    index, info = next((i, v) for i, v in md.storage_data.items() if i.fqn == "moe1.experts.down_weight")
    with open(os.path.join(folder, info.relative_path), "r+b") as fh:
        fh.seek(info.offset + info.length // 2)
        fh.write(b"\x7f\xff\xff\xff" * 4)         # NaN bytes in the middle of one piece
    with pytest.raises(CheckpointError, match=r"damaged: the stored bytes of pieces moe1.experts.down_weight@0,0,0"):
        load_full(fresh, path)


def test_swapped_shard_files_are_a_checkpoint_error(tmp_path):
    from moefx.dist.checkpoint import CheckpointError, load_full, save_sharded

    path, folder, fresh = _damaged(tmp_path, "swap")
    other_gm, _ = _converted({"moe": MOE}, perturb=False)
    other = tmp_path / "other"
    save_sharded(other_gm, other)
    data = [f for f in os.listdir(folder) if f.endswith(".distcp")]
    assert data
    for f in data:                               # the same file names, another checkpoint's bytes
        os.replace(os.path.join(os.path.realpath(other), f), os.path.join(folder, f))
    with pytest.raises(CheckpointError, match=r"damaged: .*files __0_0.distcp"):
        load_full(fresh, path)


def test_truncated_metadata_is_a_checkpoint_error(tmp_path):
    from moefx.dist.checkpoint import CheckpointError, load_full

    path, folder, fresh = _damaged(tmp_path, "meta")
    meta = os.path.join(folder, ".metadata")
    with open(meta, "r+b") as fh:
        fh.truncate(os.path.getsize(meta) // 2)
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        load_full(fresh, path)
    with pytest.raises(CheckpointError, match=r"cannot be read|failed"):
        load_full(fresh, path, verify=False)


def test_a_nan_model_is_never_checkpointed(tmp_path):
    from moefx.dist.checkpoint import CheckpointError, save_sharded

    gm, _ = _converted({"moe": MOE}, perturb=False)
    with torch.no_grad():
        gm.moe1.router.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="moe1.router.weight has NaN or inf values: a non-finite model is not "
                                              "checkpointed"):
        save_sharded(gm, tmp_path / "nan")
    assert not os.path.exists(tmp_path / "nan")


def test_the_path_names_a_complete_checkpoint_at_every_instant(tmp_path):
    """The swap is one rename of a symlink: before it the old folder, after it the new one."""
    from moefx.fileio import publish_folder
    from moefx.dist.checkpoint import load_full, read_info, save_sharded

    path, folder, fresh = _damaged(tmp_path, "swapping")
    first = os.path.realpath(path)
    gm, _ = _converted({"moe": MOE}, perturb=False)
    save_sharded(gm, path, info={"n": 2})
    assert os.path.realpath(path) != first and not os.path.exists(first)   # the old version is gone after
    assert read_info(path)["info"] == {"n": 2}
    # a crash after the new folder is complete but before the swap leaves the previous one in place
    staged = tmp_path / "staged"
    os.makedirs(staged)
    before = os.path.realpath(path)
    load_full(fresh, path)
    assert os.path.realpath(path) == before
    publish_folder(staged, tmp_path / "fresh_target")
    assert os.path.islink(tmp_path / "fresh_target")
