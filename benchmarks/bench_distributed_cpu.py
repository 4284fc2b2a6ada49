"""Distributed MoE on CPU / gloo: per-rank memory, all-to-all bytes per layer, and forward / training
throughput of moefx (eager and compiled) against a DeepSpeed-style eager expert-parallel baseline,
worlds 2, 4, 8, all in one run. A script, not a test.

    python benchmarks/bench_distributed_cpu.py                      # ~10 min on 2 cores
    python benchmarks/bench_distributed_cpu.py --quick              # ~3 min: smaller, fewer rounds
    python benchmarks/bench_distributed_cpu.py --compile-worlds 2 4 8   # inductor at world 8 too (slow)

Every rank is a process on this host (loopback gloo, one thread per rank, `dist_utils.run_world`).

(1) memory: NanoGPT d=512, 4 blocks, PR-MoE (residual) every 2nd block with 64 then 128 experts
    (the pyramid; 1.6 GB of fp32 once converted), `--init seeded`. "after": each rank built by `moefx.runtime.build.build_rank`
    (capture, convert and partition on meta, then only the rank's shards materialised), one forward;
    its tensor MB, RSS at start and peak RSS. "before": what every rank held with the old runtime,
    measured two ways: one process holding the whole converted model (`build_reference`), and a
    world of 2 where every rank converts the whole dense model (`moefx.convert`) and then
    `moefx.distribute`s it (the old path; its per-rank peak does not depend on the world size).
(2) bytes per MoE layer per rank (`moefx.runtime.stats.collective_bytes`: the exact tensors handed to
    the dispatch all-to-all) for GPT-2 d=256 (the throughput model), capacity (drop_tokens) and
    dropless routing: flat EP (tp = 1, every rank its own batch) vs tp = 2 with the TP ranks sending
    every token (coordinated_a2a = false) vs TP-coordinated (each TP rank sends its 1/tp share).
(3) throughput: GPT-2 (d=256, 4 blocks, 4 heads, vocab 1024), PR-MoE every 2nd block with 8 experts
    (top-1, capacity factor 1, tokens dropped past capacity, DeepSpeed's combine weight p; router
    weights drawn at random so tokens spread over the experts), ep = world, each rank its own batch
    of B x T tokens. Variants:
    - "baseline": a plain per-rank replica of the HF model (eager) whose MoE blocks' MLP is a
      DeepSpeed-style MoE layer written here (DSMoEMLP): top-1 gate building [S, E, C] one-hot
      combine weights and DeepSpeed's l_aux, einsum dispatch, an even all_to_all_single (wrapped in
      an autograd function, as DeepSpeed does) to the experts' ranks, local experts (bmm), the
      inverse all-to-all, einsum combine, PR-MoE residual mix; training reduces gradients as
      DeepSpeed's engine does (dense ones all-reduced over the world in one flat bucket, expert ones
      over the expert-data-parallel group, here of size 1). Weights are the converted model's, so
      its logits, loss and gradient norm must match moefx's (checked, printed).
    - "moefx eager": `moefx.distribute(converted, plan)`: the rank's GraphModule (the current
      runtime), flat all-to-all; "moefx compiled": the same under
      `torch.compile(fullgraph=True)` (inductor, CPU). Compiled only at `--compile-worlds` (default
      2 and 4: at world 8, eight inductor compiles on 2 cores take minutes). Rank 0 compiles first
      into a fresh inductor cache and the other ranks start compiling once it is done (they mostly
      hit its cache); both times are reported.
    - forward: under no_grad, eval-mode graph; training step: train-mode graph, forward + next-token
      cross-entropy + aux loss, backward, gradient reduction (`moefx.dist.grads.reduce_gradients`).
    Throughput = world * B * T / (slowest rank's median time per call). All variants of a world are
    timed round by round (`_timing.interleaved_ms`: A B C D E F, A B C ...), so noise from the
    shared machine hits them alike; ratios are against the baseline of the same run.
(a) all-to-all: flat vs hierarchical (`_eager_a2a.py`), even splits, the count exchange
    left out of both (precomputed `HierarchicalSplits`).
Results: printed and written to benchmarks/results/distributed_cpu.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE, os.path.join(ROOT, "tests", "runtime")):   # dist_utils.run_world: a fast gloo world
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _timing import load_note  # noqa: E402  (the load average is taken at import)

D, LAYERS, HEADS, VOCAB, EXPERTS = 256, 4, 4, 1024, 8
MOE = {"experts": EXPERTS, "every": 2, "top_k": 1, "residual": True, "drop_tokens": True,
       "capacity_factor": 1.0, "eval_capacity_factor": 1.0, "combine_weight": "prob"}
ROW_BYTES = D * 4
BASELINE = "baseline (DeepSpeed-style eager EP)"

# the memory model: ~1.6 GB of fp32 once converted
BIG = {"n_layer": 4, "n_head": 8, "n_embd": 512, "vocab_size": 256, "block_size": 64}
BIG_MOE = {"experts": [64, 128], "every": 2, "top_k": 1, "residual": True, "drop_tokens": True}
BIG_NAME = "bench_distributed_cpu:big_model"


def big_model():
    """The memory table's dense model (a `package.module:function` model for ModelSpec / moefx CLIs)."""
    from moefx.models.nanogpt import NanoGPT, NanoGPTConfig

    return NanoGPT(NanoGPTConfig(**BIG)).eval(), (torch.randint(0, BIG["vocab_size"], (2, 8)),)


# ------------------------------------------------------------------------- DeepSpeed-style baseline

class _AllToAll(torch.autograd.Function):
    """An even all_to_all_single autograd can go through (the gradient of an even all-to-all is the
    same all-to-all of the gradient): how DeepSpeed's MOELayer moves tokens in training."""

    @staticmethod
    def forward(ctx, group, x):
        import torch.distributed as dist

        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, _AllToAll.apply(ctx.group, grad)


class DSMoEMLP(nn.Module):
    """DeepSpeed-MoE's eager layer (top-1 TopKGate + MOELayer + PR-MoE residual), expert parallel.

    Holds this rank's experts [first, first + E/ep) as parameters (marked `allreduce = False`, as
    DeepSpeed marks expert parameters); tokens travel by all_to_all_single in the [E, C, d] layout
    DeepSpeed uses (ep chunks of E/ep experts each). group None / ep 1: one process, no all-to-all.
    `l_aux` holds the latest forward's load-balancing loss (DeepSpeed's top1gating formula)."""

    def __init__(self, mlp, layer, group, ep: int, rank: int):
        super().__init__()
        E = layer.num_experts
        self.E, self.ep, self.group = E, ep, group
        self.mlp = mlp
        self.router = nn.Parameter(layer.router.weight.detach().clone())
        g = layer.gate
        self.train_capacity, self.eval_capacity, self.min_capacity = (g.capacity_factor, g.eval_capacity_factor,
                                                                      g.min_capacity)
        ex = layer.experts.select(rank * E // ep, (rank + 1) * E // ep)
        self.w1, self.b1 = nn.Parameter(ex.up_weight[0].detach()), nn.Parameter(ex.up_bias[0].detach())
        self.w2, self.b2 = nn.Parameter(ex.down_weight.detach()), nn.Parameter(ex.down_bias.detach())
        for p in (self.w1, self.b1, self.w2, self.b2):
            p.allreduce = False
        self.middle = ex.middle          # the FFN's own activation ops (GPT-2's tanh GELU), copied by convert
        self.coef = copy.deepcopy(layer.coef)
        self.l_aux = None

    def gate(self, tokens):
        from moefx.nn.routing import expert_capacity

        logits = tokens.float() @ self.router.float().t()
        probs = torch.softmax(logits, dim=1)
        S, E = probs.shape
        cf = self.train_capacity if self.training else self.eval_capacity
        C = expert_capacity(S, E, 1, cf, self.min_capacity)
        mask = torch.nn.functional.one_hot(probs.argmax(dim=1), E)
        self.l_aux = torch.sum(probs.mean(dim=0) * mask.float().mean(dim=0)) * E
        loc = torch.cumsum(mask, dim=0) - 1
        mask = mask * (loc < C)
        loc_s = (loc * mask).sum(dim=1)
        gate_s = (probs * mask).sum(dim=1)
        combine = (gate_s[:, None] * mask)[:, :, None] * torch.nn.functional.one_hot(loc_s, C).to(probs.dtype)[:, None, :]
        return combine, C                                                        # [S, E, C]

    def forward(self, h):
        B, T, d = h.shape
        tokens = h.reshape(-1, d)
        combine, C = self.gate(tokens)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(tokens.dtype), tokens)   # [E, C, d]
        El = self.E // self.ep
        recv = _AllToAll.apply(self.group, dispatched) if self.ep > 1 else dispatched      # [ep, El, C, d]
        x = recv.reshape(self.ep, El, C, d).transpose(0, 1).reshape(El, self.ep * C, d)
        y = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)
        y = self.middle(y)
        y = torch.baddbmm(self.b2.unsqueeze(1), y, self.w2)
        y = y.reshape(El, self.ep, C, d).transpose(0, 1).contiguous()
        back = _AllToAll.apply(self.group, y) if self.ep > 1 else y
        moe_out = torch.einsum("sec,ecm->sm", combine.to(tokens.dtype), back.reshape(self.E, C, d))
        c = torch.softmax(self.coef(tokens), dim=-1)
        out = moe_out * c[:, 0:1] + self.mlp(h).reshape(-1, d) * c[:, 1:2]
        return out.reshape(B, T, d)


def baseline_aux(base: nn.Module, coef: float = 0.01) -> torch.Tensor:
    """coef * sum of the DSMoEMLP layers' l_aux from the latest forward (moefx's aux_loss_coef default)."""
    terms = [m.l_aux for m in base.modules() if isinstance(m, DSMoEMLP) and m.l_aux is not None]
    return coef * sum(terms) if terms else torch.zeros(())


def baseline_reduce(base: nn.Module, group=None) -> None:
    """DeepSpeed engine's gradient averaging: dense gradients all-reduced over the data-parallel group
    (the world) in one flat bucket and divided by its size; expert gradients over the expert-data-parallel
    group (world / ep = 1 rank here: no communication) and divided by the data-parallel size."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size(group) if dist.is_initialized() else 1
    dense = []
    for p in base.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if getattr(p, "allreduce", True):
            dense.append(p.grad)
        elif world > 1:
            p.grad.div_(world)
    if world > 1:
        flat = _flatten_dense_tensors(dense)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, r in zip(dense, _unflatten_dense_tensors(flat, dense)):
            g.copy_(r)


def baseline_grad_norm(base: nn.Module) -> torch.Tensor:
    """Global 2-norm of the baseline's reduced gradients: dense ones (equal on every rank) once, expert
    shards summed over the ranks."""
    import torch.distributed as dist

    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for p in base.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if getattr(p, "allreduce", True):
            dense += sq
        else:
            expert += sq
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(expert)
    return (dense + expert).sqrt()


def baseline_clip(base: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the baseline's gradients to global norm <= max_norm (DeepSpeed's clip over all ranks)."""
    from moefx.dist.grads import scale_gradients

    norm = baseline_grad_norm(base)
    scale_gradients(base.parameters(), norm, max_norm)
    return norm


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=LAYERS, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=256,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa",
                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def build(seed: int = 0, *, train: bool = False, moe: dict | None = None):
    """The dense HF model and the converted PR-MoE GraphModule (train: captured in train mode), router
    weights drawn at random (seed + 1) so tokens spread over the experts."""
    from transformers import GPT2LMHeadModel

    import moefx

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    example = (torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # drop_tokens=True is intended here
        gm = moefx.convert(model, moefx.Plan.from_dict({"moe": moe or MOE}), example, train=train)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, gm


def baseline_model(model, gm, group, ep: int, rank: int):
    """The HF model with the DSMoEMLP of `gm`'s MoE layers (their rank-`rank` experts) in its MoE blocks."""
    from moefx.nn.moe import MoELayer

    base = copy.deepcopy(model)
    for name, layer in gm.named_children():
        if isinstance(layer, MoELayer):
            block = base.transformer.h[layer.block]
            block.mlp = DSMoEMLP(block.mlp, layer, group, ep, rank)
    return base.eval()


def batch(rank: int, B: int, T: int, vocab: int = VOCAB):
    """(input_ids,) of replica `rank` and its next-token targets."""
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(100 + rank))
    return (ids[:, :-1].contiguous(),), ids[:, 1:].contiguous()


def logits_of(out):
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def lm_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------- compile, staggered

class StaggeredCompile:
    """Compile a rank's graph with rank 0 first: the first call of a compiled rank graph runs its
    collectives, so ranks cannot simply take turns; instead rank 0 compiles into the (fresh) inductor
    cache and, when Dynamo reports the compile done (before the graph runs), tells the others through
    the default store to start theirs, which mostly hit rank 0's cache. Returns the seconds of this
    rank's first call (compilation and one run)."""

    def __init__(self):
        import torch._dynamo.callback as cb

        self.label, self.t0, self.done = None, None, {}
        cb.on_compile_end(self._end)

    def _end(self, *_):
        import torch.distributed as dist

        if self.label is None or self.label in self.done:
            return
        self.done[self.label] = time.perf_counter() - self.t0
        if dist.get_rank() == 0:
            dist.distributed_c10d._get_default_store().set(f"moefx-bench/compiled/{self.label}", "1")

    def first_call(self, label: str, fn) -> float:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            dist.distributed_c10d._get_default_store().wait([f"moefx-bench/compiled/{label}"])
        self.label, self.t0 = label, time.perf_counter()
        fn()
        self.label = None
        # the whole first call (compilation of every graph Dynamo makes, plus one run): compile-end
        # callbacks also fire for small inner graphs, so the first of them can come long before the end
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------------- timing inside a world

def _timed(fn, iters: int) -> float:
    """Seconds per call of the slowest rank (barrier before; all-reduce MAX after)."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def slowest(values: dict) -> dict:
    """name -> max over ranks of this rank's value (same order on every rank)."""
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def interleaved_world(variants: dict, rounds: int, reps: int, warmup: int) -> dict:
    """`_timing.interleaved_ms` on every rank (no time budget: every rank makes the same calls, which
    their collectives need), then each variant's slowest rank's median ms."""
    import torch.distributed as dist

    from _timing import interleaved_ms

    dist.barrier()
    return slowest(interleaved_ms(variants, rounds=rounds, reps=reps, warmup=warmup, budget_s=float("inf")))


def _a2a_rows(rank, world, nodes, sizes_kib, reps):
    from moefx.parallel import validate_parallel
    from moefx.plan import ParallelPlan
    from _eager_a2a import HierarchicalSplits, flat_all_to_all, hierarchical_all_to_all
    from moefx.dist.mesh import build_mesh

    G = world // nodes
    resolved = validate_parallel(ParallelPlan(nodes=nodes, devices_per_node=G, ep=world), world, [world])
    mesh = build_mesh(resolved)
    rows = []
    for kib in sizes_kib:
        per_dest = max(1, kib * 1024 // ROW_BYTES // world)
        x = torch.randn(per_dest * world, D)
        send = [per_dest] * world
        splits = HierarchicalSplits.from_matrix([send] * world, rank, nodes, G)
        flat = lambda: flat_all_to_all(x, send, send, mesh.group("world"))  # noqa: E731
        hier = lambda: hierarchical_all_to_all(x, send, send, mesh.group("intra_node"), mesh.group("inter_node"),  # noqa: E731
                                               nodes, G, splits=splits)
        assert torch.equal(flat(), hier())
        times = {"flat": [], "hier": []}
        for _ in range(reps):
            times["flat"].append(_timed(flat, 3))
            times["hier"].append(_timed(hier, 3))
        f, h = (statistics.median(times[k]) * 1e3 for k in ("flat", "hier"))
        rows.append({"world": world, "mesh": f"{nodes}x{G}", "KiB/rank": per_dest * world * ROW_BYTES // 1024,
                     "flat ms": f, "hier ms": h, "hier/flat": h / f})
    return rows


# ------------------------------------------------------------------------- (2) bytes per layer

def _bytes_rows(rank, world, B, T):
    import torch.distributed as dist

    import moefx
    from moefx.facts import facts
    from moefx.runtime.stats import bytes_by_layer, collective_bytes

    rows = []
    for routing, moe in (("capacity", MOE), ("dropless", {**MOE, "drop_tokens": False})):
        _, gm = build(moe=moe)
        for label, tp, coordinated in (("flat EP (tp=1)", 1, True), ("tp=2, every TP rank sends", 2, False),
                                       ("tp=2, TP-coordinated", 2, True)):
            if world % tp:
                continue
            plan = moefx.Plan.from_dict({"moe": moe, "parallel": {"nodes": 1, "devices_per_node": world, "tp": tp,
                                                                   "ep": world, "hierarchical_a2a": False,
                                                                   "coordinated_a2a": coordinated}})
            local = moefx.distribute(gm, plan, tokens_per_rank=B * T)
            replica = facts(local).parallel.dp_rank(rank)       # TP peers share their replica's batch
            inputs, _ = batch(replica, B, T)
            sent = bytes_by_layer(collective_bytes(local, *inputs))
            per_rank = [None] * world
            dist.all_gather_object(per_rank, sent)
            if rank:
                continue
            layers = sorted(per_rank[0])
            replicas = world // tp
            for layer in layers:
                counts = [r[layer] for r in per_rank]
                total = sum(counts)
                rows.append({"world": world, "routing": routing, "plan": label, "MoE layer": layer,
                             "KiB sent/rank (mean)": statistics.mean(counts) / 1024,
                             "KiB sent/rank (max)": max(counts) / 1024, "KiB sent, world": total / 1024,
                             "distinct tokens": replicas * B * T,
                             "bytes / distinct token": total / (replicas * B * T)})
    return rows


# ------------------------------------------------------------------------- (3) throughput

def _model_rows(rank, world, B, T, rounds, reps, compile_: bool):
    import torch.distributed as dist

    import moefx
    from moefx.dist.grads import grad_norm, reduce_gradients

    model, gm = build()
    _, gm_train = build(train=True)
    plan = moefx.Plan.from_dict({"moe": MOE, "parallel": {"nodes": 1, "devices_per_node": world, "ep": world,
                                                           "hierarchical_a2a": False}})
    base = baseline_model(model, gm, dist.group.WORLD, world, rank)
    local = moefx.distribute(gm, plan, tokens_per_rank=B * T).eval()
    local_train = moefx.distribute(gm_train, plan, tokens_per_rank=B * T).train()
    inputs, targets = batch(rank, B, T)

    def fwd(m):
        def call():
            with torch.no_grad():
                return logits_of(m(*inputs))
        return call

    def base_fwd():
        base.eval()
        with torch.no_grad():
            return logits_of(base(*inputs))

    def base_step():
        base.train()
        base.zero_grad(set_to_none=True)
        loss = lm_loss(logits_of(base(*inputs)), targets) + baseline_aux(base)
        loss.backward()
        baseline_reduce(base)
        return loss.detach()

    def moefx_step(runner):
        def step():
            local_train.zero_grad(set_to_none=True)
            loss = lm_loss(logits_of(runner(*inputs)), targets) + moefx.aux_loss(local_train)
            loss.backward()
            reduce_gradients(local_train)
            return loss.detach()
        return step

    fwd_variants = {BASELINE: base_fwd, "moefx eager": fwd(local)}
    step_variants = {BASELINE: base_step, "moefx eager": moefx_step(local_train)}
    compile_s = {}
    if compile_:
        import torch._functorch.config as functorch_config

        functorch_config.force_non_lazy_backward_lowering = True   # the backward compiles with the forward
        stagger = StaggeredCompile()
        c_eval = torch.compile(local, fullgraph=True)
        c_train = torch.compile(local_train, fullgraph=True)
        fwd_variants["moefx compiled"] = fwd(c_eval)
        step_variants["moefx compiled"] = moefx_step(c_train)
        mine = {"forward": stagger.first_call("forward", fwd_variants["moefx compiled"]),
                "train step": stagger.first_call("train", step_variants["moefx compiled"])}
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        compile_s = {k: {"rank 0": per_rank[0][k], "others (max)": max((r[k] for r in per_rank[1:]), default=0.0)}
                     for k in mine}

    # correctness: logits, loss and gradient norm of every variant against the baseline
    diffs = {}
    ref = fwd_variants[BASELINE]()
    for name, f in fwd_variants.items():
        diffs[("forward", name)] = (f() - ref).abs().max().item()
    base_loss = base_step()
    base_norm = baseline_grad_norm(base)
    for name, f in step_variants.items():
        if name == BASELINE:
            diffs[("train step", name)] = 0.0
            continue
        loss = f()
        norm = grad_norm(local_train)
        diffs[("train step", name)] = max(abs(loss.item() - base_loss.item()),
                                          abs(norm.item() - base_norm.item()) / max(base_norm.item(), 1.0))
    diffs = dict(zip(diffs, slowest({f"{k[0]}/{k[1]}": v for k, v in diffs.items()}).values()))

    variants = {f"forward/{k}": v for k, v in fwd_variants.items()}
    variants.update({f"train step/{k}": v for k, v in step_variants.items()})
    ms = interleaved_world(variants, rounds=rounds, reps=reps, warmup=1)
    rows = []
    for what in ("forward", "train step"):
        base_ms = ms[f"{what}/{BASELINE}"]
        eager_ms = ms[f"{what}/moefx eager"]
        names = fwd_variants if what == "forward" else step_variants
        for name in names:
            t = ms[f"{what}/{name}"]
            rows.append({"world": world, "what": what, "variant": name, "ms/call": t,
                         "tokens/s": world * B * T / (t / 1e3), "vs baseline": base_ms / t,
                         "vs moefx eager": eager_ms / t, "max diff vs baseline": diffs[(what, name)]})
    return rows, compile_s


def _world(rank, world, cfg, out_path):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out = {}
    if cfg["a2a"]:
        out["a2a"] = _a2a_rows(rank, world, 2, cfg["sizes_kib"], cfg["reps_a2a"])
    out["bytes"] = _bytes_rows(rank, world, cfg["B"], cfg["T"])
    B = cfg["B8"] if world >= 8 else cfg["B"]
    out["e2e"], out["compile"] = _model_rows(rank, world, B, cfg["T"], cfg["rounds"], cfg["reps"],
                                             world in cfg["compile_worlds"])
    out["B"] = B
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(out, fh)


# ------------------------------------------------------------------------- (1) memory

def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _big_plan(world: int):
    import moefx

    return moefx.Plan.from_dict({"moe": BIG_MOE, "parallel": {"nodes": 1, "devices_per_node": world, "ep": world,
                                                               "hierarchical_a2a": False}})


def _memory_rank(rank, world, mode, out_path):
    """One rank's memory: mode "after" (build_rank, seeded), "old" (convert the whole model, then distribute)
    or "full" (build_reference: one process holding the whole converted model)."""
    import torch.distributed as dist

    import moefx
    from moefx.models import load_model
    from moefx.runtime.build import ModelSpec, build_rank, build_reference
    from moefx.runtime.run_model import tensor_bytes

    warnings.filterwarnings("ignore")
    start = _rss_now_mb()
    t0 = time.perf_counter()
    spec = ModelSpec(name=BIG_NAME, init="seeded", seq=8)
    if mode == "after":
        local, _ = build_rank(spec, _big_plan(world), tokens_per_rank=2 * 32)
    elif mode == "full":
        local = build_reference(spec, moefx.Plan.from_dict({"moe": BIG_MOE}))
    else:
        dense, example = load_model(BIG_NAME, seed=0)
        gm = moefx.convert(dense, moefx.Plan.from_dict({"moe": BIG_MOE}), example)
        local = moefx.distribute(gm, _big_plan(world), tokens_per_rank=2 * 32)
        del gm, dense
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        local(torch.randint(0, BIG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(rank)))
    row = {"rank": rank, "tensors MB": tensor_bytes(local) / 2**20, "RSS at start MB": start,
           "peak RSS MB": _peak_rss_mb(), "build s": build_s}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)


def _full_params_mb() -> float:
    """fp32 MB of the whole converted memory model, by counting (meta device, no memory)."""
    import moefx
    from moefx.runtime.build import ModelSpec, convert_meta

    gm, _ = convert_meta(ModelSpec(name=BIG_NAME, init="seeded"), moefx.Plan.from_dict({"moe": BIG_MOE}))
    return moefx.count_params(gm).total * 4 / 2**20


def _run(fn, world, *args, timeout):
    from dist_utils import run_world

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    try:
        wall = run_world(fn, world, *args, path, timeout=timeout)
        with open(path) as fh:
            return json.load(fh), wall
    finally:
        os.unlink(path)


def memory_rows(worlds):
    """(rows, full model MB): "before" (old path at world 2, the whole converted model in one process) and
    "after" (build_rank) at every world."""
    full_mb = _full_params_mb()
    rows = []
    for label, mode, world in [("before: whole converted model in one process", "full", 1),
                               ("before: old path (convert whole, then distribute)", "old", 2)] + \
                              [("after: build_rank (meta, own shards)", "after", w) for w in worlds]:
        ranks, _ = _run(_memory_rank, world, mode, timeout=900)
        for r in ranks:
            rows.append({"runtime": label, "world": world, **r, "peak - start MB": r["peak RSS MB"] - r["RSS at start MB"],
                         "tensors / full": r["tensors MB"] / full_mb})
        print(f"memory {label}, world {world}: done", flush=True)
    return rows, full_mb


def _summarise_memory(rows):
    """One row per (runtime, world): max over ranks."""
    out = {}
    for r in rows:
        key = (r["runtime"], r["world"])
        o = out.setdefault(key, {"runtime": r["runtime"], "world": r["world"], "tensors MB (max rank)": 0.0,
                                 "peak RSS MB (max rank)": 0.0, "peak - start MB (max rank)": 0.0,
                                 "tensors / full": 0.0, "RSS at start MB": r["RSS at start MB"], "build s": 0.0})
        o["tensors MB (max rank)"] = max(o["tensors MB (max rank)"], r["tensors MB"])
        o["peak RSS MB (max rank)"] = max(o["peak RSS MB (max rank)"], r["peak RSS MB"])
        o["peak - start MB (max rank)"] = max(o["peak - start MB (max rank)"], r["peak - start MB"])
        o["tensors / full"] = max(o["tensors / full"], r["tensors / full"])
        o["build s"] = max(o["build s"], r["build s"])
    return list(out.values())


# ------------------------------------------------------------------------- main

def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__}"


def verdict(e2e: list[dict]) -> list[str]:
    lines = []
    for world in sorted({r["world"] for r in e2e}):
        for what in ("forward", "train step"):
            rs = {r["variant"]: r for r in e2e if r["world"] == world and r["what"] == what}
            parts = []
            for name in ("moefx eager", "moefx compiled"):
                if name in rs:
                    x = rs[name]["vs baseline"]
                    parts.append(f"{name} {x:.2f}x ({'faster' if x > 1.0 else 'NOT faster'})")
            lines.append(f"- world {world}, {what}: " + ", ".join(parts))
    return lines


def main(argv=None):
    from _timing import table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--compile-worlds", type=int, nargs="*", default=[2, 4],
                   help="worlds that also time the torch.compile'd rank graph (inductor)")
    p.add_argument("--sizes-kib", type=int, nargs="+", default=[64, 1024, 8192], help="a2a bytes per rank")
    p.add_argument("--reps-a2a", type=int, default=5, help="a2a: repetitions (3 calls each)")
    p.add_argument("--B", type=int, default=4, help="sequences per rank")
    p.add_argument("--B8", type=int, default=2, help="sequences per rank at world >= 8 (oversubscribed)")
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--reps", type=int, default=2, help="timed calls per variant per round")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table")
    p.add_argument("--no-a2a", action="store_true", help="skip the flat vs hierarchical all-to-all table")
    p.add_argument("--quick", action="store_true", help="worlds 2 4, compile at 2, B 2, 3 rounds, 1 a2a size")
    p.add_argument("--inductor-cache", default=None, help="inductor cache folder (default: a fresh one, so compile "
                                                          "times are cold)")
    p.add_argument("--output", default=os.path.join(HERE, "results", "distributed_cpu.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.worlds, args.compile_worlds, args.B, args.B8, args.rounds = [2, 4], [2], 2, 2, 3
        args.sizes_kib, args.reps_a2a = [1024], 3
    cache = args.inductor_cache or tempfile.mkdtemp(prefix="moefx-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache        # read by the ranks (forked after this)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    cfg = {"sizes_kib": args.sizes_kib, "reps_a2a": args.reps_a2a, "B": args.B, "B8": args.B8, "T": args.T,
           "rounds": args.rounds, "reps": args.reps, "compile_worlds": args.compile_worlds, "a2a": not args.no_a2a}
    t_start = time.time()
    mem, full_mb = ([], None) if args.no_memory else memory_rows(args.worlds)
    a2a, e2e, nbytes, compiles, batches = [], [], [], {}, {}
    for world in args.worlds:
        res, wall = _run(_world, world, cfg, timeout=1800)
        a2a += res.get("a2a", [])
        e2e += res["e2e"]
        nbytes += res["bytes"]
        batches[world] = res["B"]
        if res["compile"]:
            compiles[world] = res["compile"]
        print(f"world {world}: done in {wall:.0f} s", flush=True)

    command = " ".join(["python benchmarks/bench_distributed_cpu.py", *(argv if argv is not None else sys.argv[1:])])
    total = time.time() - t_start
    text = [f"# Distributed MoE on CPU (gloo, loopback)\n",
            f"`{command}` on {datetime.date.today().isoformat()}; {machine_line()}; one thread per rank, every "
            f"rank a process on this host. Total {total:.0f} s.\n",
            f"{load_note()} Worlds larger than the core count are oversubscribed (world 8 = 4 ranks per core): "
            "compare ratios within a world, not absolute numbers across worlds.\n"]
    if mem:
        text += [f"\n## (1) Per-rank memory: before / after\n\n"
                 f"NanoGPT d={BIG['n_embd']}, {BIG['n_layer']} blocks, PR-MoE every 2nd block with "
                 f"{'/'.join(map(str, BIG_MOE['experts']))} experts (residual), ep = world, `--init seeded`; whole "
                 f"converted model = {full_mb:.0f} MB of fp32 tensors (counted). Each rank: build, then one forward "
                 "of 2x32 tokens. 'RSS at start' is the rank process before building (a fork of a server that has "
                 "imported torch and moefx); 'peak - start' is what building and the forward added. 'before' is "
                 "what every rank of the old runtime held (its per-rank peak does not depend on the world size: "
                 "every rank converted the whole model); 'after' is the per-rank build.\n\n",
                 table(_summarise_memory(mem), ["runtime", "world", "tensors MB (max rank)", "tensors / full",
                                                "RSS at start MB", "peak RSS MB (max rank)",
                                                "peak - start MB (max rank)", "build s"]),
                 "\n\nPer rank:\n\n",
                 table(mem, ["runtime", "world", "rank", "tensors MB", "peak RSS MB", "peak - start MB"]), "\n"]
    text += [f"\n## (2) All-to-all bytes per MoE layer: flat EP vs TP-coordinated\n\n"
             f"GPT-2 d={D} (the throughput model), {EXPERTS} experts, ep = world, {args.B}x{args.T} tokens per "
             "replica (TP peers share a replica's batch, so tp = 2 has half as many distinct tokens as ranks x "
             "batch). Bytes = the tensor each rank hands to its dispatch all-to-all (`moefx.runtime.stats`; the "
             "combine sends the same back). Capacity routing sends the whole [E, C, d] buffer (empty slots "
             "included); dropless sends exactly the routed rows. 'bytes / distinct token' = world total / distinct "
             "tokens: TP-coordinated sends each token once per TP group, as flat EP does, instead of once per TP "
             "rank.\n\n",
             table(nbytes, ["world", "routing", "plan", "MoE layer", "KiB sent/rank (mean)", "KiB sent/rank (max)",
                            "KiB sent, world", "distinct tokens", "bytes / distinct token"]), "\n"]
    text += [f"\n## (3) Throughput: forward and training step\n\n"
             f"GPT-2 d={D}, {LAYERS} blocks, {EXPERTS} experts every 2nd block, ep = world, tokens per rank "
             + ", ".join(f"world {w}: {batches[w]}x{args.T}" for w in args.worlds) +
             f". Median over {args.rounds} interleaved rounds x {args.reps} calls of the slowest rank; "
             "'vs baseline' = baseline time / variant time (> 1: faster than the baseline); 'max diff vs baseline' "
             "= max |logits difference| (forward) or max(|loss difference|, relative grad-norm difference) "
             "(training step), max over ranks. Training step = forward + cross-entropy + aux loss + backward + "
             "gradient reduction (no optimizer step; see bench_train_cpu.py for that). 'moefx compiled' only at "
             f"worlds {args.compile_worlds} (inductor compile of 8 ranks on 2 cores takes minutes; "
             "`--compile-worlds 2 4 8` for all).\n\n",
             table(e2e, ["world", "what", "variant", "ms/call", "tokens/s", "vs baseline", "vs moefx eager",
                         "max diff vs baseline"]), "\n"]
    if compiles:
        crow = [{"world": w, "graph": k, "rank 0 (cold cache) s": v["rank 0"],
                 "other ranks (after rank 0, max) s": v["others (max)"]}
                for w, c in compiles.items() for k, v in c.items()]
        text += ["\nCompile times (outside the timed region): the first call of `torch.compile(local, "
                 "fullgraph=True)`, inductor, compilation plus one run, fresh cache, rank 0 first, the others once "
                 "it is done; train step = forward and backward graphs:\n\n",
                 table(crow, ["world", "graph", "rank 0 (cold cache) s", "other ranks (after rank 0, max) s"]), "\n"]
    text += ["\nDoes moefx beat the DeepSpeed-style baseline (goal: faster at every world size)?\n\n",
             "\n".join(verdict(e2e)), "\n"]
    if a2a:
        text += ["\n## (a) all-to-all: flat vs hierarchical (benchmarks/_eager_a2a.py)\n\n"
                 "Even splits of 1 KiB rows; time per call of the slowest rank, median of reps. Hierarchical = "
                 "intra-node a2a + inter-node a2a + two layout permutes; on one host every 'link' is loopback, "
                 "so it cannot win here (it exists for slow inter-node links).\n\n",
                 table(a2a, ["world", "mesh", "KiB/rank", "flat ms", "hier ms", "hier/flat"]), "\n"]
    text = "\n".join(t.strip("\n") + "\n" for t in text)
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        fh.write(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
