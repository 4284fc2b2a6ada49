"""Training on CPU: optimizer-step throughput of moefx (eager and compiled) against a DeepSpeed-style
eager baseline in one process and at worlds 2 and 4, and a short real `moefx train` run on the
shipped corpus. A script, not a test.

    python benchmarks/bench_train_cpu.py                    # both parts (~15 min on 2 cores)
    python benchmarks/bench_train_cpu.py --part throughput  # results/train_cpu.md (~6 min)
    python benchmarks/bench_train_cpu.py --part run         # results/train_run.{md,csv,svg} (~6 min)
    python benchmarks/bench_train_cpu.py --quick            # throughput only, smaller, fewer rounds

Throughput (results/train_cpu.md): the throughput model of bench_distributed_cpu.py (GPT-2 d=256,
4 blocks, PR-MoE every 2nd block with 8 experts, top-1, capacity factor 1), every rank (or the one
process) its own micro-batch of B x T tokens of the shipped corpus, one thread per process. One
optimizer step = zero_grad, forward, next-token cross-entropy + aux loss, backward, gradient
reduction, global-norm clipping (1.0), AdamW step (weight decay on matrices). Variants:
- "moefx eager": the pieces `moefx.train.trainer.train` uses: `optimizer_for` (AdamW),
  `world.reduce_gradients` / `world.clip` of `moefx.train.world.Single` (one process: the whole
  converted train-mode graph) or `Ranks` (world 2 / 4: the rank graph of `moefx.distribute`,
  ep = world);
- "moefx compiled": the same with the forward under `torch.compile(fullgraph=True)` (inductor;
  compiled outside the timed region, rank 0 first into a fresh cache; the time is reported);
- "baseline": bench_distributed_cpu's DeepSpeed-style eager model (DSMoEMLP: one-hot [S, E, C]
  gate, einsum dispatch / combine, autograd all_to_all_single), DeepSpeed-engine gradient
  averaging, global-norm clipping, the same AdamW grouping. Same weights, so the first step's
  loss and gradient norm must match moefx's (checked).
All variants of a world are timed round by round (`_timing.interleaved_ms`).

Real run (results/train_run.md, .csv, .svg): `moefx train` (the CLI) on the shipped corpus
(byte-level Python standard library source, no --data) of `run_model` below (NanoGPT, vocabulary
256, so no folding of byte ids) with the built-in default plan (PR-MoE: 4 then 8 experts, residual,
dropless); the exact command, final training loss, validation losses (the CLI's --eval-every ones,
recomputed from its checkpoints, and held-out ones on the corpus's validation files) and tokens/s
go into train_run.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE, os.path.join(ROOT, "tests", "runtime")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _timing import load_note  # noqa: E402  (the load average is taken at import)

BASELINE = "baseline (DeepSpeed-style eager)"
CLIP, LR = 1.0, 3e-4
EVAL_BATCHES = 8
HELD_COL = "held-out validation loss (validation files, what the CLI evaluates)"
TRAIN_COL = "loss on training-split windows"

# the real run's model (`moefx train benchmarks.bench_train_cpu:run_model`)
RUN_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 256, "block_size": 128}
RUN_NAME = "benchmarks.bench_train_cpu:run_model"


def run_model():
    """NanoGPT over bytes (vocabulary 256: the shipped corpus's ids as they are): the real run's model."""
    from moefx.models.nanogpt import NanoGPT, NanoGPTConfig

    return NanoGPT(NanoGPTConfig(**RUN_MODEL)).eval(), (torch.randint(0, RUN_MODEL["vocab_size"], (2, 8)),)


# ------------------------------------------------------------------------- throughput, inside a world

def _micro_batch(B: int, T: int, replica: int):
    from moefx.train.tokens import Windows, open_tokens

    return Windows(open_tokens(None), B, T, seed=0).micro_batch(0, replica)


def _train_world(rank, world, cfg, out_path):
    """One process (world 1: the whole converted model, `Single`) or one rank (`Ranks`)."""
    import torch.distributed as dist

    import moefx
    from bench_distributed_cpu import (StaggeredCompile, baseline_clip, baseline_model, baseline_reduce, build,
                                       interleaved_world, lm_loss, logits_of, MOE, baseline_aux)
    from moefx.train.trainer import TrainConfig, optimizer_for
    from moefx.train.world import Ranks, Single

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    single = cfg["single"]
    B, T = cfg["B"], cfg["T"]
    config = TrainConfig(steps=10**6, lr=LR, clip=CLIP)
    model, gm = build()
    _, gm_train = build(train=True)
    if single:
        local = gm_train.train()
        w = Single()
        base = baseline_model(model, gm, None, 1, 0)
    else:
        plan = moefx.Plan.from_dict({"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": world, "ep": world,
                                                               "hierarchical_a2a": False}})
        local = moefx.distribute(gm_train, plan, tokens_per_rank=B * T).train()
        w = Ranks(local)
        base = baseline_model(model, gm, dist.group.WORLD, world, rank)
    base.train()
    ids, targets = _micro_batch(B, T, w.replica)
    opt = optimizer_for(local, config)
    decay = [p for p in base.parameters() if p.dim() >= 2]
    rest = [p for p in base.parameters() if p.dim() < 2]
    base_opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=LR, betas=(config.beta1, config.beta2))
    last = {}

    def moefx_step(runner, key):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(logits_of(runner(ids)), targets) + moefx.aux_loss(local)
            loss.backward()
            w.reduce_gradients(local)
            last[key] = (loss.detach(), w.clip(local, CLIP))
            opt.step()
        return step

    def base_step():
        base_opt.zero_grad(set_to_none=True)
        loss = lm_loss(logits_of(base(ids)), targets) + baseline_aux(base)
        loss.backward()
        baseline_reduce(base)
        last[BASELINE] = (loss.detach(), baseline_clip(base, CLIP))
        base_opt.step()

    variants = {BASELINE: base_step, "moefx eager": moefx_step(local, "moefx eager")}
    compile_s = None
    if cfg["compile"]:
        import torch._functorch.config as functorch_config

        functorch_config.force_non_lazy_backward_lowering = True
        stagger = StaggeredCompile()
        compiled = torch.compile(local, fullgraph=True)
        variants["moefx compiled"] = moefx_step(compiled, "moefx compiled")
        # compile without stepping the optimizer (the first step's numbers are compared below)
        mine = stagger.first_call("train", lambda: compiled(ids))
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        compile_s = {"rank 0": per_rank[0], "others (max)": max(per_rank[1:], default=0.0)}

    # first step of every variant, from the same weights: loss and (pre-clip) gradient norm vs the baseline.
    # moefx eager and compiled share weights and optimizer: snapshot and restore so both start alike.
    snapshot = ({k: v.detach().clone() for k, v in local.state_dict().items()}, None)
    diffs = {}
    variants[BASELINE]()
    ref_loss, ref_norm = (float(x) for x in last[BASELINE])
    for name in [n for n in variants if n != BASELINE]:
        local.load_state_dict(snapshot[0])
        opt.state.clear()
        variants[name]()
        loss, norm = (float(x) for x in last[name])
        diffs[name] = max(abs(loss - ref_loss), abs(norm - ref_norm) / max(ref_norm, 1.0))
    diffs[BASELINE] = 0.0
    if world > 1:
        from bench_distributed_cpu import slowest

        diffs = slowest(diffs)
    ms = interleaved_world(variants, rounds=cfg["rounds"], reps=cfg["reps"], warmup=1)
    tokens = w.replicas * B * T
    rows = []
    for name in variants:
        t = ms[name]
        rows.append({"world": "1 (single process)" if single else world, "variant": name, "ms/step": t,
                     "tokens/s": tokens / (t / 1e3), "vs baseline": ms[BASELINE] / t, "vs moefx eager":
                     ms["moefx eager"] / t, "first-step diff vs baseline": diffs[name]})
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"rows": rows, "compile": compile_s, "loss": ref_loss, "norm": ref_norm}, fh)


def throughput(args) -> str:
    from _timing import table
    from bench_distributed_cpu import D, EXPERTS, LAYERS, _run, machine_line

    rows, compiles, t0 = [], [], time.time()
    for world in args.worlds:
        cfg = {"single": world == 1, "B": args.B, "T": args.T, "rounds": args.rounds, "reps": args.reps,
               "compile": world in args.compile_worlds}
        res, wall = _run(_train_world, world, cfg, timeout=1800)
        rows += res["rows"]
        if res["compile"]:
            compiles.append({"world": "1 (single process)" if world == 1 else world,
                             "rank 0 (cold cache) s": res["compile"]["rank 0"],
                             "other ranks (after rank 0, max) s": res["compile"]["others (max)"]})
        print(f"train throughput, world {world}: done in {wall:.0f} s", flush=True)
    command = "python benchmarks/bench_train_cpu.py " + " ".join(args.argv)
    text = [f"# Training throughput on CPU: moefx vs a DeepSpeed-style eager baseline",
            f"`{command}` on {datetime.date.today().isoformat()}; {machine_line()}; one thread per process "
            f"(also the single process), ranks on this host (loopback gloo). Total {time.time() - t0:.0f} s.",
            f"{load_note()} World 4 runs 2 ranks per core.",
            f"Model: GPT-2 d={D}, {LAYERS} blocks, PR-MoE every 2nd block with {EXPERTS} experts (top-1, capacity "
            f"factor 1), ep = world; every process a micro-batch of {args.B}x{args.T} tokens of the shipped corpus. "
            f"One optimizer step = forward + cross-entropy + aux loss + backward + gradient reduction + global-norm "
            f"clip + AdamW (lr {LR}). tokens/s = tokens of the step over all replicas / median step time of the "
            f"slowest rank ({args.rounds} interleaved rounds x {args.reps} steps). 'vs baseline' = baseline time / "
            f"variant time (> 1: faster). 'first-step diff vs baseline' = max(|loss difference|, relative "
            f"gradient-norm difference) of the first step from equal weights.",
            table(rows, ["world", "variant", "ms/step", "tokens/s", "vs baseline", "vs moefx eager",
                         "first-step diff vs baseline"])]
    if compiles:
        text += ["Compile times: the first call of `torch.compile(fullgraph=True)` (inductor, forward and backward "
                 "graphs, plus one forward; fresh cache, rank 0 first, the others after it):",
                 table(compiles, ["world", "rank 0 (cold cache) s", "other ranks (after rank 0, max) s"])]
    verdict = []
    for world in sorted({str(r["world"]) for r in rows}):
        rs = {r["variant"]: r for r in rows if str(r["world"]) == world}
        parts = [f"{n} {rs[n]['vs baseline']:.2f}x ({'faster' if rs[n]['vs baseline'] > 1 else 'NOT faster'})"
                 for n in ("moefx eager", "moefx compiled") if n in rs]
        verdict.append(f"- world {world}: " + ", ".join(parts))
    text += ["Against the baseline:", "\n".join(verdict)]
    return "\n\n".join(text) + "\n"


# ------------------------------------------------------------------------- the real run

def _eval_sets(B: int, T: int, n: int) -> dict:
    """The validation windows: held-out ones (`Windows(train, B, T, seed=0, eval_tokens=val)`, what
    `moefx train --eval-every` evaluates: the corpus's validation files, which training never reads)
    and the same windowing over the training split (an in-sample reference)."""
    from moefx.train.tokens import Windows, open_split

    train, val = open_split(None)
    return {"held_out": Windows(train, B, T, seed=0, eval_tokens=val).eval_batches(n),
            "train_split": Windows(train, B, T, seed=0).eval_batches(n)}


def _losses_of(checkpoints: list, sets: dict) -> list[dict]:
    """Mean next-token cross-entropy of run_model (default plan, eval mode) on every set, for every
    checkpoint (None: the untrained model)."""
    import moefx
    from moefx.runtime.build import ModelSpec, build_reference
    from moefx.dist.checkpoint import load_full

    warnings.filterwarnings("ignore")
    out = []
    for ckpt in checkpoints:
        gm = build_reference(ModelSpec(name=RUN_NAME), moefx.Plan.default())
        if ckpt is not None:
            load_full(gm, ckpt, strict=False)       # a training checkpoint also holds optimizer state
        gm.eval()
        row = {}
        with torch.no_grad():
            for key, batches in sets.items():
                total = 0.0
                for ids, targets in batches:
                    logits = gm(ids)
                    logits = logits if isinstance(logits, torch.Tensor) else logits[0]
                    total += torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                               targets.reshape(-1)).item()
                row[key] = total / len(batches)
        out.append(row)
    return out


def real_run(args) -> str:
    from _timing import table
    from bench_distributed_cpu import machine_line

    out = args.run_prefix
    csv_path, svg_path = out + ".csv", out + ".svg"
    ckpt_dir = tempfile.mkdtemp(prefix="moefx-train-run-")
    flags = ["--steps", str(args.run_steps), "--batch", str(args.run_batch), "--seq", str(args.run_seq),
             "--lr", str(args.run_lr), "--warmup", str(args.run_warmup), "--eval-every", str(args.run_eval_every),
             "--eval-batches", str(EVAL_BATCHES), "--metrics-csv", os.path.relpath(csv_path, ROOT),
             "--loss-svg", os.path.relpath(svg_path, ROOT), "--no-progress"] + (["--compile"] * args.run_compile)
    extra = ["--checkpoint-dir", ckpt_dir, "--checkpoint-every", str(args.run_eval_every)]
    cmd = ["moefx", "train", RUN_NAME, *flags]
    shown = " ".join(shlex.quote(c) for c in cmd + extra[:1] + ["CKPT"] + extra[2:])
    print("running:", shown, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.time() - t0
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0:
        raise SystemExit(f"moefx train failed ({proc.returncode}):\n{tail}")
    summary = next((ln for ln in (proc.stdout + proc.stderr).splitlines()[::-1] if " ok " in ln),
                   proc.stdout.strip()[-500:])
    m = re.search(r"validation loss ([\d.]+)", summary)
    cli_final = float(m.group(1)) if m else float("nan")
    steps = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step"))
    sets = _eval_sets(args.run_batch, args.run_seq, EVAL_BATCHES)
    evals = _losses_of([None] + [os.path.join(ckpt_dir, d) for d in steps], sets)
    eval_rows = [{"step": 0 if ckpt is None else int(ckpt[4:]), HELD_COL: e["held_out"], TRAIN_COL: e["train_split"]}
                 for ckpt, e in zip([None] + steps, evals)]
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["loss"]) for r in rows]
    tps = [float(r["tokens_per_s"]) for r in rows[1:]]
    first10, last10 = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    untrained, held_out = evals[0]["held_out"], evals[-1]["held_out"]
    down = last10 < first10 - 0.5 and held_out < untrained - 0.5
    lines = [f"# A short real training run: `moefx train` on the shipped corpus",
             f"{datetime.date.today().isoformat()}; {machine_line()}; {torch.get_num_threads()} threads. {load_note()} "
             f"Wall time of the command: {wall:.0f} s (build, training, "
             "validations, checkpoints).",
             "Command (from the repository root; `bench_train_cpu.py --part run` runs it and adds `--checkpoint-dir "
             f"CKPT --checkpoint-every {args.run_eval_every}` (a temporary folder) so the validation losses of every "
             "--eval-every step can be recomputed from the weights: the CLI only reports the last one):",
             f"    {shown}",
             f"Model: `{RUN_NAME}` = NanoGPT {RUN_MODEL['n_layer']} blocks, d={RUN_MODEL['n_embd']}, "
             f"{RUN_MODEL['n_head']} heads, vocabulary {RUN_MODEL['vocab_size']} (the corpus's byte ids, no "
             "folding), converted with the built-in default plan (PR-MoE every 2nd block, 4 then 8 experts, "
             "residual, top-1, dropless, aux loss 0.01). Data: the shipped corpus (no --data; Python standard "
             f"library source, byte-level), {args.run_batch} x {args.run_seq} tokens per step, AdamW lr "
             f"{args.run_lr}, {args.run_warmup} warmup steps then cosine to 0.1x, clip 1.0.",
             "| | value |\n|---|---|\n"
             f"| steps | {len(rows)} |\n"
             f"| training loss, mean of the first 10 steps | {first10:.4f} |\n"
             f"| training loss, last step | {losses[-1]:.4f} |\n"
             f"| training loss, mean of the last 10 steps | {last10:.4f} |\n"
             f"| final validation loss, as the CLI reports it | {cli_final:.4f} |\n"
             f"| held-out validation loss, untrained -> final | {untrained:.4f} -> {held_out:.4f} |\n"
             f"| tokens/s, mean over steps 2.. (CSV) | {sum(tps) / max(len(tps), 1):.0f} |\n"
             f"| tokens/s, median (CSV) | {sorted(tps)[len(tps) // 2] if tps else float('nan'):.0f} |",
             f"Validation losses at every --eval-every step ({EVAL_BATCHES} batches of {args.run_batch} x "
             f"{args.run_seq}), recomputed here from the checkpoints: the held-out windows the CLI evaluates (the "
             "corpus's validation files; the last value must equal the CLI's final validation loss) and the same "
             "windowing over the training split:",
             table(eval_rows, ["step", HELD_COL, TRAIN_COL]),
             f"The CLI's summary line: `{summary.strip()}`",
             ("The loss goes down clearly: " if down else "**The loss does NOT go down clearly**: ")
             + f"training {first10:.2f} -> {last10:.2f} (first / last 10 steps), held-out validation "
             f"{untrained:.2f} -> {held_out:.2f} (ln 256 = 5.55 is a uniform guess over bytes).",
             f"Files: `{os.path.relpath(csv_path, ROOT)}` (one row per step), `{os.path.relpath(svg_path, ROOT)}` "
             "(loss curve with the validation points)."]
    return "\n\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "throughput", "run"), default="all")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="1 = one process (no process group)")
    p.add_argument("--compile-worlds", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--B", type=int, default=4, help="sequences per process (micro-batch)")
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="throughput only, worlds 1 2, compile at 1, B 2, 3 rounds")
    p.add_argument("--inductor-cache", default=None, help="inductor cache folder (default: a fresh one)")
    p.add_argument("--output", default=os.path.join(HERE, "results", "train_cpu.md"))
    p.add_argument("--run-prefix", default=os.path.join(HERE, "results", "train_run"),
                   help="the real run's files: PREFIX.md / .csv / .svg")
    p.add_argument("--run-steps", type=int, default=300)
    p.add_argument("--run-batch", type=int, default=16)
    p.add_argument("--run-seq", type=int, default=128)
    p.add_argument("--run-lr", type=float, default=2e-3)
    p.add_argument("--run-warmup", type=int, default=30)
    p.add_argument("--run-eval-every", type=int, default=50)
    p.add_argument("--run-compile", action="store_true", help="moefx train --compile")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.part, args.worlds, args.compile_worlds, args.B, args.rounds = "throughput", [1, 2], [1], 2, 3
        if args.output == os.path.join(HERE, "results", "train_cpu.md"):
            args.output = os.path.join(HERE, "results", "train_cpu_quick.md")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="moefx-bench-inductor-")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if args.part in ("all", "throughput"):
        text = throughput(args)
        print(text)
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as fh:
            fh.write(text)
        print(f"wrote {args.output}")
    if args.part in ("all", "run"):
        text = real_run(args)
        print(text)
        with open(args.run_prefix + ".md", "w") as fh:
            fh.write(text)
        print(f"wrote {args.run_prefix}.md")


if __name__ == "__main__":
    main()
