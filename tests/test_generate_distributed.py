"""Distributed generation: every rank runs its partitioned prefill + decode graphs (EP, EP + TP) and
the greedy tokens of every data-parallel replica equal the single-process generator's; `moefx
launch --generate --check` and `moefx generate` end to end."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import moefx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "runtime"))
from dist_utils import run_world  # noqa: E402

# distinct experts (init_noise), so a token sent to the wrong expert changes the tokens
MOE = {"experts": 4, "every": 1, "top_k": 2, "drop_tokens": False, "init_noise": 0.3}


def _replica_prompts(replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + replica)
    ids = torch.randint(0, 128, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[replica % 2, :2] = 0                     # a left-padded row
    return ids, mask


def _generate_on_ranks(rank, world, parallel, name):
    from moefx.runtime.build import ModelSpec, build_generator
    from moefx.runtime.jobs.generate import _agree

    warnings.filterwarnings("ignore")
    plan = moefx.Plan.from_dict({"moe": MOE, "parallel": parallel})
    spec = ModelSpec(name=name, seed=3)
    tp = parallel.get("tp", 1)
    replica = rank // tp
    ids, mask = _replica_prompts(replica)
    gen = build_generator(spec, plan, batch_size=2, max_cache_len=20, prompt_len=5)
    gen.agree = _agree(torch.device("cpu"))
    ref = build_generator(spec, plan, batch_size=2, max_cache_len=20, prompt_len=5, distributed=False)
    # this rank holds only its experts and its heads of the attention and of the KV cache
    from moefx.nn import bound_collectives as B

    bound_a2a = {torch.ops._c10d_functional.all_to_all_single.default, B.all_to_all_start}
    for g in (gen.prefill, gen.decode):      # all-to-alls bound to this job's groups
        assert any(n.target in bound_a2a for n in g.graph.nodes if n.op == "call_function")
    local = {n: b for n, b in gen.prefill.named_buffers() if "key_cache" in n}
    whole = {n: b for n, b in ref.prefill.named_buffers() if "key_cache" in n}
    assert len(local) == len(whole) == 4                  # one key cache per block
    for (_, lb), (_, wb) in zip(sorted(local.items()), sorted(whole.items())):
        assert lb.shape[1] * tp == wb.shape[1] and lb.shape[2:] == wb.shape[2:]
    experts = [p for n, p in gen.prefill.named_parameters() if ".experts." in n]
    full = [p for n, p in ref.prefill.named_parameters() if ".experts." in n]
    assert sum(p.numel() for p in experts) * 2 == sum(p.numel() for p in full)   # ep = 2
    want = ref.generate(ids, mask, max_new_tokens=8)
    got = gen.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(got, want), (rank, got, want)
    # EOS: replica 0 stops after its 3rd new token, replica 1 goes on; every rank runs the same steps
    eos = int(ref.generate(*_replica_prompts(0), max_new_tokens=8)[0, 7])
    want = ref.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    got = gen.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(got, want), (rank, got, want)
    prompts = [None] * world
    torch.distributed.all_gather_object(prompts, ids.tolist())
    assert prompts[0] != prompts[-1]                 # data-parallel replicas generate different prompts


@pytest.mark.dist
@pytest.mark.parametrize("world,parallel,name", [
    (2, {"nodes": 1, "devices_per_node": 2, "ep": 2}, "llama-tiny"),
    (4, {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": 2}, "gpt2-tiny"),
], ids=["ep2", "ep2-tp2"])
def test_distributed_greedy_tokens_equal_single_process(world, parallel, name):
    run_world(_generate_on_ranks, world, parallel, name, timeout=240)


def _moefx(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moefx.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.dist
def test_launch_generate_check(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('[moe]\nexperts = 4\nevery = 1\ntop_k = 2\ndrop_tokens = false\ninit_noise = 0.3\n'
                    '[parallel]\nnodes = 1\ndevices_per_node = 2\nep = 2\n')
    r = _moefx("launch", "--nproc-per-node", "2", "--plan", str(plan), "nanogpt-tiny", "--generate",
               "--prompt-ids", "1,2,3;4,5,6,7;8,9", "--max-new-tokens", "6", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    # 3 rows on 2 replicas: replica 1 runs row 2 and a filler; exactly the user's 3 rows are printed
    assert [ln.split(":")[0] for ln in lines if ln.startswith(("row", "replica"))] == [
        "row 0 (replica 0)", "row 1 (replica 0)", "row 2 (replica 1)"]
    rows = {ln.split(":")[0]: ln.split(": ")[1].split() for ln in lines if ln.startswith("row")}
    assert rows["row 0 (replica 0)"][:4] == ["0", "1", "2", "3"] and rows["row 1 (replica 0)"][:4] == ["4", "5", "6", "7"]
    assert rows["row 2 (replica 1)"][:3] == ["0", "8", "9"] and len(rows["row 2 (replica 1)"]) == 3 + 6   # padded
    assert sum("ok tokens equal the single-process run" in ln for ln in lines) == 2
    # the single-process command prints the same tokens for the same prompt
    from moefx.cli import main

    assert main(["generate", "nanogpt-tiny", "--plan", str(plan), "--prompt-ids", "1,2,3", "--max-new-tokens",
                 "6"]) == 0


def test_generate_command_save_and_load(tmp_path, capsys):
    from moefx.cli import main

    args = ["--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "6"]
    assert main(["generate", "llama-tiny", *args, "--save", str(tmp_path / "gen")]) == 0
    first = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("row")]
    assert len(first) == 2 and first[1].split()[2:4] == ["0", "4"]           # left-padded row
    assert main(["generate", "--load", str(tmp_path / "gen"), *args]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("row")] == first
    assert main(["generate", "llama-tiny", "--prompt-ids", "1,999"]) == 2
    assert "outside the model's vocabulary [0, 128)" in capsys.readouterr().err
    assert main(["generate", "--load", str(tmp_path / "gen"), "--plan", "x.toml"]) == 2
    assert "give no MODEL, --plan or --weights" in capsys.readouterr().err


def _train_then_generate(rank, world, plan, ckpt):
    from moefx.runtime.jobs import generate, train

    warnings.filterwarnings("ignore")
    # rank 0 prints the tokens; collect them here (forkserver workers do not write to pytest's capture)
    lines = []
    generate.say = lines.append
    common = ["llama-tiny", "--plan", plan, "--seed", "4"]
    line = train.run(train.build_parser().parse_args(common + ["--steps", "3", "--lr", "5e-3", "--batch", "2", "--seq",
                                                               "12", "--no-progress", "--save", ckpt]))
    assert line.startswith(f"rank {rank}/2: ok 3 steps")
    fresh = generate.run(generate.build_parser().parse_args(common + ["--prompt-ids", "1,2,3", "--max-new-tokens", "5"]))
    trained = generate.run(generate.build_parser().parse_args(
        common + ["--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--check", "--load", ckpt]))
    assert f"rank {rank}/2: ok" in fresh and "ok tokens equal the single-process run" in trained
    if rank == 0:
        rows = [ln for ln in lines if ln.startswith("row 0 (replica 0)")]
        assert len(rows) == 2 and rows[0] != rows[1], lines     # the trained weights generate other tokens


@pytest.mark.dist
def test_generate_from_a_training_checkpoint(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('[moe]\nexperts = 4\nevery = 2\ntop_k = 2\ndrop_tokens = false\ninit_noise = 0.3\n'
                    '[parallel]\nnodes = 1\ndevices_per_node = 2\nep = 2\n')
    run_world(_train_then_generate, 2, str(plan), str(tmp_path / "ckpt"), timeout=300)
