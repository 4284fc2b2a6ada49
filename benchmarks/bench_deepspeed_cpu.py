"""moefx against DeepSpeed's own MoE layer (deepspeed.moe.layer.MoE, 0.19.8), expert parallel on gloo CPU
ranks: forward and training step, capacity and dropless routing. A script, not a test.

    python benchmarks/bench_deepspeed_cpu.py                     # worlds 2 and 4, ~10 min on 2 cores
    python benchmarks/bench_deepspeed_cpu.py --worlds 2 --no-compile

The model is the GPT-2 of `bench_distributed_cpu.py` (d = --d, 4 blocks, vocab 1024), PR-MoE every 2nd
block with 8 experts, top-1, DeepSpeed's combine weight (the gate probability), residual MLP, ep =
world, each rank its own batch. Both sides hold the same weights: the DeepSpeed side is the Hugging
Face model with each MoE block's MLP replaced by `deepspeed.moe.layer.MoE(use_residual=True)`, its
experts and residual MLP `nn.Linear` / tanh-GELU / `nn.Linear` (GPT-2's `Conv1D` cannot be a DeepSpeed
expert: DeepSpeed hands experts a non-contiguous slice), router, experts (this rank's, by DeepSpeed's
layout), residual MLP and coefficient copied from moefx's converted model; the logits must agree
(printed). DeepSpeed runs as its docs say for CPU ranks: DS_ACCELERATOR=cpu,
`deepspeed.init_distributed(dist_backend="gloo")`, `deepspeed.initialize` with ZeRO stage 0 and a
torch AdamW; its training step is engine(ids), `engine.backward` (which all-reduces the gradients)
and `engine.step`. moefx: `moefx.distribute`'s rank graph (eager; and compiled with
`torch.compile(fullgraph=True)`, inductor, unless --no-compile), training step = forward, backward
with the gradients reduced in buckets during it (`GradBuckets`), AdamW step. Variants are timed in
turn round after round (`_timing.interleaved_ms`, slowest rank's median); the ratios are DeepSpeed
time / moefx time (> 1: moefx faster). Results: printed and written to
benchmarks/results/deepspeed_cpu.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DS = "DeepSpeed eager"
EAGER = "moefx eager"
COMPILED = "moefx compiled"


def ds_moe(layer, dense_mlp, world: int, rank: int):
    """deepspeed.moe.layer.MoE with `layer`'s router, this rank's experts, the residual MLP and the
    coefficient of moefx's MoE layer (global weights), wrapped to return the hidden states only."""
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.moe = moe
            self.l_aux = None

        def forward(self, h):
            out, self.l_aux, _ = self.moe(h)
            return out

    E, d = layer.router.weight.shape
    f = layer.experts.up_weight[0].shape[-1]
    g = layer.gate
    expert = nn.Sequential(nn.Linear(d, f), nn.GELU(approximate="tanh"), nn.Linear(f, d))
    moe = MoE(hidden_size=d, expert=expert, num_experts=E, ep_size=world, k=1, capacity_factor=g.capacity_factor,
              eval_capacity_factor=g.eval_capacity_factor, min_capacity=g.min_capacity, use_residual=True,
              drop_tokens=g.drop_tokens, use_rts=False)
    El = E // world
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        ex = layer.experts
        for i, e in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            j = rank * El + i
            e[0].weight.copy_(ex.up_weight[0][j].t())
            e[0].bias.copy_(ex.up_bias[0][j])
            e[2].weight.copy_(ex.down_weight[j].t())
            e[2].bias.copy_(ex.down_bias[j])
        moe.mlp[0].weight.copy_(dense_mlp.c_fc.weight.t())
        moe.mlp[0].bias.copy_(dense_mlp.c_fc.bias)
        moe.mlp[2].weight.copy_(dense_mlp.c_proj.weight.t())
        moe.mlp[2].bias.copy_(dense_mlp.c_proj.bias)
        moe.coefficient.weight.copy_(layer.coef.weight)
        moe.coefficient.bias.copy_(layer.coef.bias)
    return Wrapped(moe)


def ds_model(model, gm, world: int, rank: int):
    """The HF model with DeepSpeed MoE layers where `gm` has MoE layers."""
    from moefx.nn.moe import MoELayer

    base = copy.deepcopy(model)
    for _, layer in gm.named_children():
        if isinstance(layer, MoELayer):
            block = base.transformer.h[layer.block]
            block.mlp = ds_moe(layer, block.mlp, world, rank)
    return base


def worker(a) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import bench_distributed_cpu as bd
    import deepspeed
    import torch
    import torch.distributed as dist

    import moefx
    from moefx.dist.grads import GradBuckets
    from moefx.dist.mesh import build_mesh
    from moefx.distribute import resolve

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    bd.D = a.d
    (ids,), targets = bd.batch(rank, a.batch, a.seq)
    results = {}
    mesh = None
    compiler = bd.StaggeredCompile() if a.compile else None
    for routing in a.routing:
        moe = {**bd.MOE, "drop_tokens": routing == "capacity"}
        plan = moefx.Plan.from_dict({"moe": moe, "parallel": {"nodes": 1, "devices_per_node": world, "ep": world}})
        model, gm = bd.build(0, train=False, moe=moe)
        _, gm_train = bd.build(0, train=True, moe=moe)
        if mesh is None:
            mesh = build_mesh(resolve(gm, plan.parallel, world))
        local = moefx.distribute(gm, plan, mesh=mesh).eval()
        local_train = moefx.distribute(gm_train, plan, mesh=mesh).train()
        theirs = ds_model(model, gm, world, rank)
        opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
        engine, _, _, _ = deepspeed.initialize(model=theirs, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": a.batch, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9})
        theirs.eval()
        with torch.no_grad():
            want = bd.logits_of(theirs(ids))
            got = bd.logits_of(local(ids))
        diff = bd.slowest({"d": float((want - got).abs().max())})["d"]

        def ds_forward():
            with torch.no_grad():
                theirs(ids)

        def ds_step():
            engine.train()
            out = engine(ids)
            aux = sum(m.l_aux for m in theirs.modules() if hasattr(m, "l_aux") and m.l_aux is not None)
            loss = bd.lm_loss(bd.logits_of(out), targets) + 0.01 * aux
            engine.backward(loss)
            engine.step()

        buckets = GradBuckets(local_train)
        mine_opt = torch.optim.AdamW(local_train.parameters(), lr=1e-4)

        def step_of(fn):
            def run():
                loss = bd.lm_loss(bd.logits_of(fn(ids)), targets) + moefx.aux_loss(local_train)
                buckets.arm()
                loss.backward()
                buckets.finish()
                mine_opt.step()
                mine_opt.zero_grad(set_to_none=True)
            return run

        def forward_of(fn):
            def run():
                with torch.no_grad():
                    fn(ids)
            return run

        fwd = {DS: ds_forward, EAGER: forward_of(local)}
        stp = {DS: ds_step, EAGER: step_of(local_train)}
        compile_s = {}
        if compiler is not None:
            c_fwd = torch.compile(local, fullgraph=True)
            c_train = torch.compile(local_train, fullgraph=True)
            compile_s["forward"] = compiler.first_call(f"fwd-{routing}", forward_of(c_fwd))
            compile_s["training step"] = compiler.first_call(f"train-{routing}", step_of(c_train))
            fwd[COMPILED], stp[COMPILED] = forward_of(c_fwd), step_of(c_train)
        results[routing] = {"logits max|diff|": diff, "compile s": compile_s,
                            "forward": bd.interleaved_world(fwd, a.rounds, a.reps, 2),
                            "training step": bd.interleaved_world(stp, a.rounds, a.reps, 2)}
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    dist.barrier()


def run_world(a, world: int) -> dict:
    from moefx.runtime.launch import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--d", str(a.d), "--batch",
                str(a.batch), "--seq", str(a.seq), "--rounds", str(a.rounds), "--reps", str(a.reps),
                "--routing", *a.routing] + ([] if a.compile else ["--no-compile"])
        procs = [subprocess.Popen(argv, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
                                             "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                             "DS_ACCELERATOR": "cpu"})
                 for r in range(world)]
        end = time.time() + a.timeout
        try:
            for p in procs:
                if p.wait(timeout=max(1.0, end - time.time())) != 0:
                    raise RuntimeError(f"world {world}: a rank failed")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--routing", nargs="+", default=["capacity", "dropless"], choices=["capacity", "dropless"])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--timeout", type=float, default=1500)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return

    from _timing import load_note, table

    note = load_note()
    rows = []
    for world in a.worlds:
        print(f"# world {world}", flush=True)
        for routing, r in run_world(a, world).items():
            for mode in ("forward", "training step"):
                ms = r[mode]
                row = {"world": world, "routing": routing, "mode": mode, f"{DS} ms": ms[DS], f"{EAGER} ms": ms[EAGER],
                       "DS / moefx eager": ms[DS] / ms[EAGER], "logits max|diff|": r["logits max|diff|"]}
                if COMPILED in ms:
                    row[f"{COMPILED} ms"] = ms[COMPILED]
                    row["DS / moefx compiled"] = ms[DS] / ms[COMPILED]
                    row["compile s"] = r["compile s"][mode]
                rows.append(row)
                print(json.dumps(row), flush=True)
    cols = ["world", "routing", "mode", f"{DS} ms", f"{EAGER} ms", f"{COMPILED} ms", "DS / moefx eager",
            "DS / moefx compiled", "logits max|diff|", "compile s"]
    text = "\n".join([
        "# moefx vs DeepSpeed's MoE layer, expert parallel on gloo CPU ranks", "",
        f"`python benchmarks/bench_deepspeed_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{datetime.date.today()}; {note}", "",
        f"GPT-2 d={a.d}, 4 blocks, PR-MoE every 2nd block (8 experts, top-1, DeepSpeed's combine weight, residual), "
        f"ep = world, {a.batch} x {a.seq} tokens per rank, one thread per rank, loopback gloo; slowest rank's median "
        f"over {a.rounds} interleaved rounds of {a.reps} calls. Ratios: DeepSpeed time / moefx time (> 1: moefx "
        "faster).", "",
        table(rows, cols), ""])
    print(text)
    with open(os.path.join(HERE, "results", "deepspeed_cpu.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
