"""Small-scale reproduction of DeepSpeed-MoE's quality claims (PR-MoE, MoS, staged KD, upcycling).

Trains byte-level nanoGPT-style models on the Python standard library's own source files (offline,
deterministic for a given Python version) on the CPU, seeds fixed, and prints one table:

  (a) dense            the base model
  (b) MoE              top-1, every other block, 8 experts (standard MoE)
  (c) PR-MoE           residual MLP + top-1 expert, pyramid 4 -> 8 experts
  (d) PR-MoS students  (c) shrunk by one block, trained with no KD / full KD / staged KD
  (e) upcycling        PR-MoE upcycled from the trained dense model, continued for K steps,
                       vs the dense model continued for the same K steps

Each row: validation loss (nats/byte), total and active parameters, training tokens/s.
Writes benchmarks/results/quality.md and a loss-curve plot benchmarks/results/quality.svg.

    python benchmarks/quality/run.py            # full run (about 15-20 minutes on 2 cores)
    python benchmarks/quality/run.py --quick    # smoke run (about a minute)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import moefx
from moefx.facts import facts
from moefx.data import fixed_eval_batches, lm_batches, load_corpus
from moefx.train.distill import distill
from moefx.fileio import write_atomic
from moefx.models import NanoGPT, NanoGPTConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


@dataclass
class Config:
    n_layer: int = 6
    n_embd: int = 96
    n_head: int = 4
    seq: int = 64
    batch: int = 16
    steps: int = 600          # (a), (b), (c) from scratch
    student_steps: int = 300  # (d)
    kd_stop: int = 150        # staged KD switches KD off here
    extra_steps: int = 200    # (e)
    lr: float = 2e-3
    eval_batches: int = 24
    corpus_bytes: int = 3_000_000
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(n_layer=4, n_embd=48, steps=60, student_steps=40, kd_stop=20, extra_steps=30, eval_batches=4,
                   corpus_bytes=400_000)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def evaluate(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model(ids), ids).item() for (ids,) in batches]
    model.train()
    return sum(losses) / len(losses)


def train(model, batches, steps: int, lr: float, eval_batches, eval_every: int, label: str):
    """AdamW with a cosine schedule; returns (eval curve [(step, loss)], tokens/s)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    curve, tokens, seconds = [], 0, 0.0
    for step in range(steps):
        (ids,) = batches[step % len(batches)]
        t0 = time.perf_counter()
        loss = lm_loss(model(ids), ids) + moefx.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        tokens += ids.numel()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, eval_batches)))
            print(f"  [{label}] step {step + 1:5d}  train {loss.item():.3f}  val {curve[-1][1]:.3f}",
                  file=sys.stderr)
    return curve, tokens / seconds


def _clone(gm):
    import copy

    return copy.deepcopy(gm)


def counts(model) -> tuple[int, int]:
    c = moefx.count_params(model)
    return c.total, c.active


def run(cfg: Config) -> str:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(2)
    train_tokens, val_tokens = load_corpus(max_bytes=cfg.corpus_bytes, seed=cfg.seed)
    total_steps = cfg.steps + cfg.extra_steps
    batches = lm_batches(train_tokens, cfg.batch, cfg.seq, total_steps, seed=cfg.seed)
    val = fixed_eval_batches(val_tokens, cfg.batch, cfg.seq, cfg.eval_batches)
    every = max(cfg.steps // 10, 1)
    gpt_cfg = NanoGPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=256,
                            block_size=cfg.seq)
    example = (batches[0][0],)
    rows, curves = [], {}

    def record(name, model, curve, tps, note="", start=0):
        """One table row; the curve is plotted from `start` (continued runs start where their base ended)."""
        total, active = counts(model)
        rows.append((name, curve[-1][1], total, active, tps, note))
        curves[name] = [(start + s, v) for s, v in curve]

    # (a) dense
    torch.manual_seed(cfg.seed)
    dense = NanoGPT(gpt_cfg)
    dense_init = {k: v.clone() for k, v in dense.state_dict().items()}
    curve, tps = train(dense, batches[:cfg.steps], cfg.steps, cfg.lr, val, every, "dense")
    record("(a) dense", dense, curve, tps)

    n_moe = cfg.n_layer // 2
    moe_plan = {"experts": 8, "every": 2, "top_k": 1, "residual": False, "init": "random",
                "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "seed": cfg.seed}
    pr_plan = {"experts": {"levels": [4, 8], "boundaries": [0.6]} if n_moe > 2 else [4, 8], "every": 2, "top_k": 1,
               "residual": True, "init": "random", "capacity_factor": 1.25, "eval_capacity_factor": 2.0,
               "seed": cfg.seed}

    def from_scratch(plan_moe):
        base = NanoGPT(gpt_cfg)
        base.load_state_dict(dense_init)  # same non-expert init as the dense run
        return moefx.convert(base, {"moe": plan_moe}, example)

    # (b) standard MoE, (c) PR-MoE
    moe = from_scratch(moe_plan)
    curve, tps = train(moe, batches[:cfg.steps], cfg.steps, cfg.lr, val, every, "MoE")
    record("(b) MoE top-1, 8 experts", moe, curve, tps)
    pr = from_scratch(pr_plan)
    curve, tps = train(pr, batches[:cfg.steps], cfg.steps, cfg.lr, val, every, "PR-MoE")
    record("(c) PR-MoE (residual, pyramid)", pr, curve, tps)

    # (d) PR-MoS students: (c) minus one block, no KD / full KD / staged KD. Students start from the
    # trained teacher's blocks and train student_steps more, so the fair reference is the teacher
    # trained for the same extra steps on the same batches.
    student_layers = cfg.n_layer - 1
    sb = lm_batches(train_tokens, cfg.batch, cfg.seq, cfg.student_steps, seed=cfg.seed + 1)
    teacher_more = _clone(pr)
    curve, tps = train(teacher_more, sb, cfg.student_steps, cfg.lr / 2, val, max(cfg.student_steps // 6, 1),
                       "teacher+")
    record(f"(c') PR-MoE teacher +{cfg.student_steps}", teacher_more, curve, tps, "reference for (d)", cfg.steps)
    for name, kd_stop in (("no KD", 0), ("full KD", None), ("staged KD", cfg.kd_stop)):
        student = moefx.shrink(pr, moefx.Plan.from_dict({"student": {"layers": student_layers}}))
        t0 = time.perf_counter()
        result = distill(pr, student, sb, steps=cfg.student_steps, kd_stop=kd_stop, kd_alpha=1.0,
                         temperature=1.0, lr=cfg.lr / 2, eval_batches=val,
                         eval_every=max(cfg.student_steps // 6, 1), progress=False, seed=cfg.seed,
                         lr_schedule=lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.student_steps)),
                         grad_clip=1.0)
        tps = cfg.student_steps * cfg.batch * cfg.seq / (time.perf_counter() - t0)
        curve = [(e["step"], e["eval_loss"]) for e in result.eval_history]
        keep = facts(student).student_keep
        record(f"(d) PR-MoS {student_layers}L, {name}", student, curve, tps, f"kept blocks {keep}", cfg.steps)

    # (e) upcycling from the trained dense model vs continuing dense
    extra = batches[cfg.steps:]
    cont = NanoGPT(gpt_cfg)
    cont.load_state_dict(dense.state_dict())
    curve, tps = train(cont, extra, cfg.extra_steps, cfg.lr / 4, val, max(cfg.extra_steps // 5, 1), "dense+")
    record(f"(e) dense continued +{cfg.extra_steps}", cont, curve, tps, start=cfg.steps)
    up = moefx.convert(dense, {"moe": {**pr_plan, "init": "upcycle", "init_noise": 0.01, "drop_tokens": True}},
                       example)
    curve, tps = train(up, extra, cfg.extra_steps, cfg.lr / 4, val, max(cfg.extra_steps // 5, 1), "upcycled")
    record(f"(e) PR-MoE upcycled +{cfg.extra_steps}", up, curve, tps, start=cfg.steps)

    table = _table(rows)
    claims = _claims(rows)
    write_atomic(RESULTS / "quality.svg", _svg(curves))
    return table + "\n\n" + claims


def _table(rows) -> str:
    out = ["| run | val loss (nats/byte) | params total | params active/token | train tokens/s | note |",
           "|---|---:|---:|---:|---:|---|"]
    for name, loss, total, active, tps, note in rows:
        out.append(f"| {name} | {loss:.4f} | {total / 1e6:.2f}M | {active / 1e6:.2f}M | {tps:,.0f} | {note} |")
    return "\n".join(out)


def _claims(rows) -> str:
    by = {r[0]: r for r in rows}
    get = lambda prefix: next(r for k, r in by.items() if k.startswith(prefix))  # noqa: E731
    moe, pr, teacher = get("(b)"), get("(c)"), get("(c')")
    students = [r for k, r in by.items() if k.startswith("(d)")]
    no_kd, full, staged = students
    dense_c, up = [r for k, r in by.items() if k.startswith("(e)")]
    lines = ["Claims (as measured in this run):",
             f"- PR-MoE vs MoE quality: {pr[1]:.4f} vs {moe[1]:.4f} with {pr[2] / moe[2]:.2f}x the parameters "
             f"-> {'holds' if pr[1] <= moe[1] + 0.01 and pr[2] < moe[2] else 'does not hold'}",
             f"- staged KD vs full KD at the end: {staged[1]:.4f} vs {full[1]:.4f} -> "
             f"{'holds' if staged[1] < full[1] else 'does not hold'} (no KD: {no_kd[1]:.4f})",
             f"- student keeps teacher quality: best student {min(s[1] for s in students):.4f} vs teacher "
             f"trained as long {teacher[1]:.4f} (student loss is "
             f"{100 * (min(s[1] for s in students) / teacher[1] - 1):+.1f}% vs the teacher's)",
             f"- upcycling vs continuing dense: {up[1]:.4f} vs {dense_c[1]:.4f} -> "
             f"{'holds' if up[1] < dense_c[1] else 'does not hold'}"]
    return "\n".join(lines)


def _svg(curves: dict, width: int = 760, height: int = 420) -> str:
    """A dependency-free line chart of the validation curves."""
    pts = [(s, v) for c in curves.values() for s, v in c]
    xmax = max(s for s, _ in pts)
    ymin, ymax = min(v for _, v in pts), max(v for _, v in pts)
    ymax = min(ymax, ymin + 2.0)
    L, R, T, B = 60, 230, 20, 40
    sx = lambda s: L + (width - L - R) * s / xmax  # noqa: E731
    sy = lambda v: T + (height - T - B) * (1 - (min(v, ymax) - ymin) / max(ymax - ymin, 1e-9))  # noqa: E731
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="black"/>',
           f'<text x="{(width - R) / 2}" y="{height - 4}">step (continued runs start where their base run ended)</text>',
           f'<text x="4" y="{T + 10}">val loss</text>']
    for i in range(5):
        v = ymin + (ymax - ymin) * i / 4
        out.append(f'<text x="8" y="{sy(v) + 4:.1f}">{v:.2f}</text>')
        s = xmax * i / 4
        out.append(f'<text x="{sx(s) - 8:.1f}" y="{height - B + 14}">{s:.0f}</text>')
    for i, (name, c) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in c)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        out.append(f'<text x="{width - R + 8}" y="{T + 14 * (i + 1)}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = p.parse_args()
    cfg = Config.quick() if args.quick else Config()
    t0 = time.perf_counter()
    report = run(cfg)
    header = (f"# Quality reproduction ({'quick' if args.quick else 'full'} run)\n\n{cfg}\n\n"
              f"torch {torch.__version__}, Python {sys.version.split()[0]}, "
              f"{torch.get_num_threads()} threads, wall {time.perf_counter() - t0:.0f} s\n\n")
    print(header + report)
    if not args.quick:
        write_atomic(RESULTS / "quality.md", header + report + "\n")


if __name__ == "__main__":
    main()
