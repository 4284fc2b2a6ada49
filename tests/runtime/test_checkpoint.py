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
    from moefx.runtime.checkpoint import pieces, save_sharded

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
    save_sharded(local, path)
    assert os.path.isdir(path) and not os.path.exists(os.path.join(os.path.dirname(path), ".ckpt.moefx-tmp"))


def _expected_local(ref_state, local):
    """The slice of the global (reference) tensor each local tensor must hold, from partition's
    records (not from the checkpoint code's Piece list)."""
    resolved, rank = local.meta["moefx_parallel"], local.meta["moefx_rank"]
    shards = local.meta["moefx_shards"]
    layers = sorted(int(n[3:]) for n, _ in local.named_children() if n.startswith("moe"))
    out = {}
    for name in local.state_dict():
        if name in {t for t, *_ in shards.values()}:
            continue                                    # full-size original left next to its shards
        if name in shards:
            target, dim, lo, hi = shards[name][:4]
            out[name] = ref_state[target].narrow(dim, lo, hi - lo)
        elif name.startswith("moe") and ".experts." in name:
            lp = resolved.layers[layers.index(int(name.split(".")[0][3:]))]
            mine = lp.experts_of(rank)
            t = ref_state[name][mine.start:mine.stop]
            inner = {"up_weight": 2, "up_bias": 1, "down_weight": 1}.get(name.split(".")[2])
            if lp.expert_slicing > 1 and inner is not None:
                part = t.shape[inner] // lp.expert_slicing
                t = t.narrow(inner, lp.slice_of(rank) * part, part)
            out[name] = t
        else:
            out[name] = ref_state[name]
    return out


def _load_world(rank, world, path):
    import moefx
    from moefx.runtime.checkpoint import load_sharded

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
    from moefx.runtime.checkpoint import FORMAT, checkpoint_tensors, load_full

    path = str(tmp_path / "ckpt")
    os.makedirs(path)                 # an older checkpoint at the same path gets replaced
    open(os.path.join(path, "stale"), "w").close()
    run_world(_save_world, 4, path, timeout=120)
    assert not os.path.exists(os.path.join(path, "stale"))
    side = json.load(open(os.path.join(path, "moefx.json")))
    assert side["format"] == FORMAT and side["world"] == 4

    # one writer per piece: rank 0 writes replicated tensors; expert pieces of layer 1 (ep 2 x edp 2)
    # come from ranks 0 and 1 only; sliced layer 0 from all four ranks, its down bias from slice 0 ranks
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(path).read_metadata()
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
    from moefx.runtime.checkpoint import CheckpointError, load_full, save_sharded

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
