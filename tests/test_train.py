"""The training job: distributed AdamW steps equal one process on the same micro-batches (EP + DP with
different data per replica, EP + TP), the global gradient norm, checkpoints that resume bit for bit
and at another world size, train-mode dropout, non-finite steps, metrics, and distributed staged KD."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings

import pytest
import torch

import moefx
from moefx.train.tokens import Windows, open_tokens
from moefx.train.trainer import TrainConfig, TrainError, train
from moefx.train.world import Single

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

# distinct experts, top-2, dropless: a token at the wrong expert or a wrong gradient shows
MOE = {"experts": 4, "every": 2, "top_k": 2, "drop_tokens": False, "init_noise": 0.2, "z_loss_coef": 1e-3}
CONFIG = TrainConfig(steps=5, lr=2e-3, warmup=2, clip=0.5, weight_decay=0.1, checkpoint_every=3, seed=1)
EP_DP = {"nodes": 1, "devices_per_node": 4, "ep": 2}                 # dp 4: four different batches
EP_TP = {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": 2}        # dp 2, coordinated all-to-all


def _windows() -> Windows:
    return Windows(open_tokens(None) % 128, batch=2, seq=12, seed=3)


def _single(plan: dict, config: TrainConfig, **kw):
    from moefx.runtime.build import ModelSpec, build_train_graphs

    warnings.filterwarnings("ignore")
    model, _ = build_train_graphs(ModelSpec(name="llama-tiny", seed=2), moefx.Plan.from_dict(plan),
                                  distributed=False, with_eval=False)
    return model, train(model, config, _windows(), world=Single(), **kw)


def _close(got: list, want: list, rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "aux", "grad_norm", "lr"):
            assert abs(a[key] - b[key]) <= rel * max(abs(b[key]), 1.0), (a["step"], key, a[key], b[key])


def _check_pieces(local, state: dict, rel: float = 1e-5) -> None:
    """Every local parameter equals its piece of the single-process model's global tensor."""
    from moefx.facts import placements
    from moefx.placement import whole

    recs = placements(local)
    for name, p in local.named_parameters():
        rec = recs.get(name) or whole(name, tuple(p.shape))
        want = state[rec.global_name]
        for d, off in enumerate(rec.offsets):
            want = want.narrow(d, off, p.shape[d])
        scale = max(want.abs().max().item(), 1.0)
        assert (p.detach() - want).abs().max().item() <= rel * scale, name


def _train_on_ranks(rank, world, parallel, want_rows, want_state, ckpt):
    from moefx.runtime.build import ModelSpec, build_train_graphs
    from moefx.train.world import Ranks

    warnings.filterwarnings("ignore")
    plan = moefx.Plan.from_dict({"moe": MOE, "parallel": parallel})
    model, _ = build_train_graphs(ModelSpec(name="llama-tiny", seed=2), plan, with_eval=False)
    w = Ranks(model)
    result = train(model, CONFIG, _windows(), world=w, checkpoint_dir=ckpt)
    _close(result.rows, want_rows)
    # AdamW divides each update by sqrt(v): for a weight whose gradients are near zero (an lm_head row
    # of a token the batches never hold) float32 reduction-order differences of the sharded run come
    # out at about lr * 1e-2 after 5 steps; a wrong gradient moves a weight by about lr (2e-3)
    _check_pieces(model, want_state, rel=1e-4)
    assert w.replicas == world // parallel.get("tp", 1)


def _resume_on_ranks(rank, world, parallel, want_rows, ckpt, replicas):
    from moefx.runtime.build import ModelSpec, build_train_graphs
    from moefx.train.world import Ranks

    warnings.filterwarnings("ignore")
    plan = moefx.Plan.from_dict({"moe": MOE, "parallel": parallel})
    model, _ = build_train_graphs(ModelSpec(name="llama-tiny", seed=2), plan, with_eval=False)
    w = Ranks(model)
    # the same micro-batches per step at world 2 as in the world-4 run: more accumulation per replica
    config = dataclasses.replace(CONFIG, grad_accum=replicas // w.replicas)
    said = []
    result = train(model, config, _windows(), world=w, resume=f"{ckpt}/step0000003", say=said.append)
    assert result.resumed_from == 3 and said == []
    _close(result.rows, want_rows[3:])


@pytest.mark.dist
@pytest.mark.parametrize("parallel", [EP_DP, EP_TP], ids=["ep2-dp4", "ep2-tp2"])
def test_four_ranks_train_like_one_process_and_resume_elsewhere(parallel, tmp_path):
    replicas = 4 // parallel.get("tp", 1)
    single = dataclasses.replace(CONFIG, grad_accum=replicas)           # one process, the same micro-batches
    model, want = _single({"moe": MOE}, single)
    assert all(r["grad_norm"] > CONFIG.clip for r in want.rows[:2])    # clipping is active
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_world(_train_on_ranks, 4, parallel, want.rows, state, str(tmp_path), timeout=300)
    if parallel.get("tp", 1) > 1:   # the TP-sharded optimizer state resharded to a plan without TP, at world 2
        run_world(_resume_on_ranks, 2, {"nodes": 1, "devices_per_node": 2, "ep": 2}, want.rows, str(tmp_path),
                  replicas, timeout=300)


def _bit_exact_on_ranks(rank, world, ckpt):
    from moefx.runtime.build import ModelSpec, build_train_graphs
    from moefx.train.world import Ranks

    warnings.filterwarnings("ignore")
    plan = moefx.Plan.from_dict({"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": 2, "tp": 2, "ep": 2}})
    config = dataclasses.replace(CONFIG, steps=6)
    runs = []
    for resume in (None, f"{ckpt}/step0000003"):
        model, _ = build_train_graphs(ModelSpec(name="llama-tiny", seed=2), plan, with_eval=False)
        result = train(model, config, _windows(), world=Ranks(model), checkpoint_dir=ckpt if resume is None else None,
                       resume=resume)
        runs.append((result.rows, {k: v.detach().clone() for k, v in model.named_parameters()}))
    (full_rows, full), (resumed_rows, resumed) = runs
    assert [(r["loss"], r["grad_norm"]) for r in resumed_rows] == [(r["loss"], r["grad_norm"]) for r in full_rows[3:]]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.dist
def test_resume_at_the_same_world_is_bit_identical(tmp_path):
    run_world(_bit_exact_on_ranks, 2, str(tmp_path), timeout=300)


def test_single_process_resume_bit_identical_csv_and_changed_lr(tmp_path):
    from moefx.train.metrics import read_csv

    config = dataclasses.replace(CONFIG, steps=6)
    full_model, full = _single({"moe": MOE}, config, checkpoint_dir=tmp_path / "ck", metrics_csv=tmp_path / "m.csv",
                               loss_svg_path=tmp_path / "loss.svg")
    rows = read_csv(tmp_path / "m.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full.rows]            # repr(float) round-trips
    assert (tmp_path / "loss.svg").read_text().count("<polyline") == 1
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith(".")) == ["step0000003",
                                                                                          "step0000006"]
    said = []
    model, resumed = _single({"moe": MOE}, config, resume=tmp_path / "ck" / "step0000003",
                             metrics_csv=tmp_path / "m.csv", say=said.append)
    assert resumed.rows == [dict(r, tokens_per_s=resumed.rows[i]["tokens_per_s"]) for i, r in enumerate(full.rows[3:])]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), full_model.parameters()))
    assert [r["step"] for r in read_csv(tmp_path / "m.csv")] == [1, 2, 3, 4, 5, 6]
    assert said == []
    _, changed = _single({"moe": MOE}, dataclasses.replace(config, lr=1e-3), resume=tmp_path / "ck", say=said.append)
    assert said == ["moefx train: the resumed run changes lr 0.002 -> 0.001"] and changed.resumed_from == 6
    assert changed.rows == []
    # another --steps ends the run elsewhere; the lr schedule keeps the length it started with (no jump)
    said.clear()
    _, longer = _single({"moe": MOE}, dataclasses.replace(config, steps=9), resume=tmp_path / "ck" / "step0000003",
                        say=said.append)
    assert said == ["moefx train: the resumed run changes steps 6 -> 9 (the lr schedule keeps its length of 6 steps: "
                    "the floor lr from step 6)"]
    assert [r["lr"] for r in longer.rows[:3]] == [r["lr"] for r in full.rows[3:]]
    assert [r["lr"] for r in longer.rows[3:]] == pytest.approx([config.lr * config.min_lr_ratio] * 3)


def test_dropout_is_active_in_training_and_absent_in_eval():
    from moefx.tensors import share_tensors
    from moefx.models import NanoGPT, NanoGPTConfig
    from moefx.outputs import main_tensor

    torch.manual_seed(0)
    model = NanoGPT(NanoGPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    ids = torch.randint(0, 64, (2, 8))
    plan = {"moe": {"experts": 2, "every": 1, "drop_tokens": False}}
    train_gm = moefx.convert(model, plan, (ids,), train=True)
    eval_gm = moefx.convert(model.eval(), plan, (ids,))
    share_tensors(eval_gm, train_gm)
    with torch.no_grad():
        torch.manual_seed(1)
        a = main_tensor(train_gm(ids))
        torch.manual_seed(2)
        b = main_tensor(train_gm(ids))
        torch.manual_seed(1)
        again = main_tensor(train_gm(ids))
        e1, e2 = main_tensor(eval_gm(ids)), main_tensor(eval_gm(ids))
    assert not torch.allclose(a, b) and torch.equal(a, again)        # masks differ by seed, replay by seed
    assert torch.equal(e1, e2) and not torch.allclose(a, e1)
    def train_flags(gm):                                          # aten.dropout(x, p, train)
        return [n.args[2] for n in gm.graph.nodes if "dropout" in str(n.target)]

    assert train_flags(train_gm) == [True] * 5 and train_flags(eval_gm) == [False] * 5


class _Poisoned(torch.nn.Module):
    """A tiny LM whose logits turn NaN at the given forwards."""

    def __init__(self, bad: set[int]):
        super().__init__()
        self.emb = torch.nn.Embedding(128, 16)
        self.out = torch.nn.Linear(16, 128)
        self.bad, self.calls = bad, 0
        self.seen = []          # the parameters each forward ran with

    def forward(self, ids):
        self.calls += 1
        self.seen.append({k: v.detach().clone() for k, v in self.named_parameters()})
        logits = self.out(self.emb(ids))
        return logits * float("nan") if self.calls in self.bad else logits


def test_a_non_finite_step_stops_the_run_or_is_skipped(tmp_path):
    config = TrainConfig(steps=4, lr=1e-2, checkpoint_every=1)
    model = _Poisoned({3})
    with pytest.raises(TrainError, match=r"step 3: the loss is nan"):
        train(model, config, _windows(), checkpoint_dir=tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.startswith(".")) == ["step0000001",
                                                                                         "step0000002"]
    said = []
    model = _Poisoned({3})
    result = train(model, dataclasses.replace(config, nonfinite="skip"), _windows(), say=said.append)
    assert result.skipped == 1 and len(result.rows) == 4 and math.isnan(result.rows[2]["loss"])
    assert said == ["moefx train: step 3: the loss is nan and the gradient norm nan: skipped the update "
                    "(1 skipped so far)"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # one forward per step: step 4 runs with the parameters step 3 had (its update was skipped: no NaN
    # gradient, no weight decay, no Adam step), while the finite steps 1, 2 and 4 did update them
    seen = model.seen + [{k: v.detach() for k, v in model.named_parameters()}]
    assert model.calls == 4 and len(seen) == 5
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:])]
    assert same == [False, False, True, False], same


def _job_args(**kw) -> argparse.Namespace:
    from moefx.runtime.jobs.distill import build_parser

    argv = ["llama-tiny", "--plan", kw.pop("plan"), "--steps", "4", "--kd-stop", "2", "--lr", "2e-3", "--batch", "2",
            "--seq", "12", "--no-progress", "--seed", "2"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return build_parser().parse_args(argv)


def _distill_job_on_ranks(rank, world, plan, csv):
    from moefx.runtime.jobs.train import run

    warnings.filterwarnings("ignore")
    line = run(_job_args(plan=plan, check=True, metrics_csv=csv))
    assert line.startswith(f"rank {rank}/2: ok 4 steps") and line.endswith("losses equal the single-process run")


@pytest.mark.dist
def test_distributed_staged_kd_equals_one_process(tmp_path):
    from moefx.train.metrics import read_csv

    plan = tmp_path / "mos.toml"
    plan.write_text('[moe]\nexperts = 4\nevery = 2\ntop_k = 1\nresidual = true\ndrop_tokens = false\n'
                    'init_noise = 0.2\n[student]\nlayers = 3\n[parallel]\nnodes = 1\ndevices_per_node = 2\nep = 2\n')
    run_world(_distill_job_on_ranks, 2, str(plan), str(tmp_path / "kd.csv"), timeout=300)
    rows = read_csv(tmp_path / "kd.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kd"] > 0 and rows[1]["kd"] > 0 and rows[2]["kd"] == 0 == rows[3]["kd"]    # staged KD


def test_train_command(tmp_path, capsys):
    from moefx.cli import main
    from moefx.train.metrics import read_csv

    code = main(["train", "nanogpt-tiny", "--steps", "3", "--batch", "2", "--seq", "16", "--lr", "0.05",
                 "--no-progress", "--metrics-csv", str(tmp_path / "m.csv"), "--eval-every", "3",
                 "--save", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code == 0 and "ok 3 steps" in out and "validation loss" in out
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "step,loss,aux,grad_norm,lr,tokens_per_s,eval_loss"
    rows = read_csv(tmp_path / "m.csv")
    assert "eval_loss" not in rows[1] and f"validation loss {rows[2]['eval_loss']:.4f}" in out   # the CSV has it
    # generate from the saved training weights in one process; without MODEL the checkpoint's recorded model
    gen = ["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    assert main([*gen, "nanogpt-tiny"]) == 0 and main([*gen, "nanogpt-tiny", "--load", str(tmp_path / "w")]) == 0
    assert main([*gen, "--load", str(tmp_path / "w")]) == 0
    fresh, trained, recorded = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("row 0")]
    assert fresh != trained and recorded == trained
    # a checkpoint that records no model (an older moefx's) needs MODEL
    side = tmp_path / "w" / "moefx.json"
    side.write_text(side.read_text().replace('"record": {', '"unrecorded": {'))
    assert main([*gen, "--load", str(tmp_path / "w")]) == 2
    assert "records its model" in capsys.readouterr().err
    data = tmp_path / "tokens.bin"
    torch.randint(0, 300, (5000,), dtype=torch.int32).numpy().astype("uint16").tofile(data)
    assert main(["train", "nanogpt-tiny", "--data", str(data), "--steps", "1", "--no-progress"]) == 2
    assert "token id 299 but the model's vocabulary is 128" in capsys.readouterr().err
