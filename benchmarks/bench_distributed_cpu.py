"""Distributed MoE on CPU / gloo: flat vs hierarchical all-to-all, and moefx's partitioned graph vs
a DeepSpeed-style eager expert-parallel baseline. A script, not a test.

    python benchmarks/bench_distributed_cpu.py               # worlds 2, 4, 8 (a few minutes on 2 cores)
    python benchmarks/bench_distributed_cpu.py --worlds 2 4 --iters 5

Meshes (nodes x devices_per_node, all on this host, loopback gloo, one thread per rank):
world 2 = 2 x 1 for the all-to-all table and 1 x 2 for the model, world 4 = 2 x 2, world 8 = 2 x 4.

(a) all-to-all: `moefx.runtime.flat_all_to_all` over the world vs `hierarchical_all_to_all`
    (intra-node a2a, then inter-node a2a, with the layout transforms), even splits of 1 KiB rows,
    the count exchange left out of both (precomputed `HierarchicalSplits`); median over reps of
    the slowest rank's time per call.
(b) end-to-end inference: GPT-2 (d=256, 4 blocks, 4 heads, vocab 1024), PR-MoE every 2nd block with
    8 experts (top-1, capacity factor 1, tokens dropped past capacity, DeepSpeed's combine weight p;
    router weights drawn at random so tokens spread over the experts), ep = world, each rank its
    own batch of B x T tokens. Variants:
    - "baseline": a plain per-rank replica of the HF model (eager) whose MoE blocks' MLP is a
      DeepSpeed-style MoE layer written here: top-1 gate building [S, E, C] one-hot combine
      weights, einsum dispatch, one even `torch.distributed.all_to_all_single` to the experts'
      ranks, local experts (bmm), the inverse all_to_all_single, einsum combine, PR-MoE residual
      mix. Weights are the converted model's, so its logits must match moefx's (checked).
    - "moefx flat" / "moefx hier": `moefx.distribute(converted, plan)` (the rank's GraphModule with
      count exchange + uneven functional all-to-all nodes, mapping-table dispatch/combine), with
      hierarchical_a2a false / true (true needs >= 2 nodes of >= 2 devices).
    Throughput = world * B * T / (slowest rank's time per forward), variants interleaved round by
    round, median over rounds; ratios are against the baseline of the same run.
Results: printed and written to benchmarks/results/distributed_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "runtime"))   # dist_utils.run_world: a fast gloo world

D, LAYERS, HEADS, VOCAB, EXPERTS = 256, 4, 4, 1024, 8
MOE = {"experts": EXPERTS, "every": 2, "top_k": 1, "residual": True, "drop_tokens": True,
       "capacity_factor": 1.0, "eval_capacity_factor": 1.0, "combine_weight": "prob"}
ROW_BYTES = D * 4


# ------------------------------------------------------------------------- DeepSpeed-style baseline

class DSMoEMLP(torch.nn.Module):
    """DeepSpeed-MoE's eager layer (top-1 TopKGate + MOELayer + PR-MoE residual), expert parallel.

    Holds this rank's experts [first, first + E/ep); tokens travel by all_to_all_single in the
    [E, C, d] layout DeepSpeed uses (ep chunks of E/ep experts each)."""

    def __init__(self, mlp, layer, group, ep: int, rank: int):
        super().__init__()
        E = layer.num_experts
        self.E, self.ep, self.group = E, ep, group
        self.mlp = mlp
        self.router_w = layer.router.weight.detach().clone()
        g = layer.gate
        self.capacity_factor, self.min_capacity = g.eval_capacity_factor, g.min_capacity
        ex = layer.experts.select(rank * E // ep, (rank + 1) * E // ep)
        self.w1, self.b1 = ex.up_weight[0].detach(), ex.up_bias[0].detach()
        self.w2, self.b2 = ex.down_weight.detach(), ex.down_bias.detach()
        self.middle = ex.middle          # the FFN's own activation ops (GPT-2's tanh GELU), copied by convert
        self.coef = layer.coef

    def gate(self, tokens):
        from moefx.nn.routing import expert_capacity

        logits = tokens.float() @ self.router_w.float().t()
        probs = torch.softmax(logits, dim=1)
        S, E = probs.shape
        C = expert_capacity(S, E, 1, self.capacity_factor, self.min_capacity)
        mask = torch.nn.functional.one_hot(probs.argmax(dim=1), E)
        loc = torch.cumsum(mask, dim=0) - 1
        mask = mask * (loc < C)
        loc_s = (loc * mask).sum(dim=1)
        gate_s = (probs * mask).sum(dim=1)
        combine = (gate_s[:, None] * mask)[:, :, None] * torch.nn.functional.one_hot(loc_s, C).to(probs.dtype)[:, None, :]
        return combine, C                                                        # [S, E, C]

    def forward(self, h):
        import torch.distributed as dist

        B, T, d = h.shape
        tokens = h.reshape(-1, d)
        combine, C = self.gate(tokens)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(tokens.dtype), tokens)   # [E, C, d]
        El = self.E // self.ep
        recv = torch.empty_like(dispatched)
        dist.all_to_all_single(recv, dispatched.contiguous(), group=self.group)          # [ep, El, C, d]
        x = recv.reshape(self.ep, El, C, d).transpose(0, 1).reshape(El, self.ep * C, d)
        y = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)
        y = self.middle(y)
        y = torch.baddbmm(self.b2.unsqueeze(1), y, self.w2)
        y = y.reshape(El, self.ep, C, d).transpose(0, 1).contiguous()
        back = torch.empty_like(y)
        dist.all_to_all_single(back, y, group=self.group)
        moe_out = torch.einsum("sec,ecm->sm", combine.to(tokens.dtype), back.reshape(self.E, C, d))
        c = torch.softmax(self.coef(tokens), dim=-1)
        out = moe_out * c[:, 0:1] + self.mlp(h).reshape(-1, d) * c[:, 1:2]
        return out.reshape(B, T, d)


def build(seed: int = 0):
    """The dense HF model, the converted PR-MoE GraphModule (random router weights) and a batch maker."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import moefx

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=LAYERS, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa",
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = GPT2LMHeadModel(config).eval()
    example = (torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # drop_tokens=True is intended here
        gm = moefx.convert(model, moefx.Plan.from_dict({"moe": MOE}), example)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, gm


def baseline_model(model, gm, group, ep: int, rank: int):
    import copy

    from moefx.nn.moe import MoELayer

    base = copy.deepcopy(model)
    for name, layer in gm.named_children():
        if isinstance(layer, MoELayer):
            block = base.transformer.h[layer.block]
            block.mlp = DSMoEMLP(block.mlp, layer, group, ep, rank)
    return base.eval()


def batch(rank: int, B: int, T: int):
    return (torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(100 + rank)),)


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


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


def _a2a_rows(rank, world, nodes, sizes_kib, reps):
    from moefx.parallel import validate_parallel
    from moefx.plan import ParallelPlan
    from moefx.runtime.all_to_all import HierarchicalSplits, flat_all_to_all, hierarchical_all_to_all
    from moefx.runtime.mesh import build_mesh

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


def _model_rows(rank, world, nodes, B, T, iters, rounds):
    import torch.distributed as dist

    import moefx

    G = world // nodes
    model, gm = build()
    variants = {}
    base = baseline_model(model, gm, dist.group.WORLD, world, rank)
    variants["baseline (DeepSpeed-style eager EP)"] = base
    hiers = [False, True] if nodes > 1 and G > 1 else [False]
    for hier in hiers:
        plan = moefx.Plan.from_dict({"moe": MOE, "parallel": {"nodes": nodes, "devices_per_node": G, "ep": world,
                                                               "hierarchical_a2a": hier}})
        variants["moefx " + ("hier" if hier else "flat")] = moefx.distribute(gm, plan)
    inputs = batch(rank, B, T)
    outs = {}
    with torch.no_grad():
        for name, m in variants.items():
            outs[name] = _logits(m(*inputs))
            m(*inputs)                                                                # warm-up
        ref = outs["baseline (DeepSpeed-style eager EP)"]
        diffs = {k: (v - ref).abs().max().item() for k, v in outs.items()}
        times = {k: [] for k in variants}
        for _ in range(rounds):
            for name, m in variants.items():
                times[name].append(_timed(lambda: m(*inputs), iters))
    d = torch.tensor([max(diffs.values())])
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    base_t = statistics.median(times["baseline (DeepSpeed-style eager EP)"])
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        rows.append({"world": world, "mesh": f"{nodes}x{G}", "variant": name, "ms/forward": t * 1e3,
                     "tokens/s": world * B * T / t, "vs baseline": base_t / t,
                     "max abs diff vs baseline": d.item() if name != "baseline (DeepSpeed-style eager EP)" else 0.0})
    return rows


def _world(rank, world, cfg, out_path):
    torch.set_num_threads(1)
    nodes = 2 if world >= 2 else 1
    a2a = _a2a_rows(rank, world, nodes, cfg["sizes_kib"], cfg["reps"])
    model_nodes = 1 if world == 2 else 2
    e2e = _model_rows(rank, world, model_nodes, cfg["B"], cfg["T"], cfg["iters"], cfg["rounds"])
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"a2a": a2a, "e2e": e2e}, fh)


def _single_process(B, T, iters):
    """Context: the converted model in one process, one thread, on one rank's batch."""
    torch.set_num_threads(1)
    _, gm = build()
    inputs = batch(0, B, T)
    with torch.no_grad():
        gm(*inputs)
        t0 = time.perf_counter()
        for _ in range(iters):
            gm(*inputs)
    t = (time.perf_counter() - t0) / iters
    return t, B * T / t


def main(argv=None):
    from _timing import table
    from dist_utils import run_world

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--sizes-kib", type=int, nargs="+", default=[64, 1024, 8192], help="a2a bytes per rank")
    p.add_argument("--reps", type=int, default=5, help="a2a: repetitions (3 calls each)")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--iters", type=int, default=3, help="forwards per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output", default=os.path.join(HERE, "results", "distributed_cpu.md"))
    args = p.parse_args(argv)
    cfg = {"sizes_kib": args.sizes_kib, "reps": args.reps, "B": args.B, "T": args.T, "iters": args.iters,
           "rounds": args.rounds}
    a2a, e2e = [], []
    t_start = time.time()
    for world in args.worlds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            path = fh.name
        wall = run_world(_world, world, cfg, path, timeout=900)
        res = json.load(open(path))
        os.unlink(path)
        a2a += res["a2a"]
        e2e += res["e2e"]
        print(f"world {world}: done in {wall:.0f} s", flush=True)
    t1, tps1 = _single_process(args.B, args.T, max(args.iters, 3))

    command = " ".join(["python benchmarks/bench_distributed_cpu.py", *(argv or sys.argv[1:])])
    head = (f"# Distributed MoE on CPU (gloo, loopback)\n\n"
            f"`{command}`; "
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"one thread per rank, every rank a process on this host (worlds > cores are oversubscribed: compare "
            f"ratios within a world, not absolute numbers across worlds). Total {time.time() - t_start:.0f} s.\n")
    a2a_md = table(a2a, ["world", "mesh", "KiB/rank", "flat ms", "hier ms", "hier/flat"])
    e2e_md = table(e2e, ["world", "mesh", "variant", "ms/forward", "tokens/s", "vs baseline",
                         "max abs diff vs baseline"])
    text = (head + "\n## (a) all-to-all: flat vs hierarchical (moefx.runtime.all_to_all)\n\n"
            "Even splits of 1 KiB rows; time per call of the slowest rank, median of reps. Hierarchical = "
            "intra-node a2a + inter-node a2a + two layout permutes; on one host every 'link' is loopback, "
            "so it cannot win here (it exists for slow inter-node links).\n\n" + a2a_md +
            f"\n\n## (b) end-to-end inference: GPT-2 d={D}, {LAYERS} blocks, {EXPERTS} experts every 2nd block, "
            f"ep = world, {args.B}x{args.T} tokens per rank\n\n"
            "'vs baseline' = baseline time / variant time (> 1: faster than the baseline), same world, same run. "
            f"Single process, whole converted model, 1 thread, one rank's batch: {t1 * 1e3:.1f} ms/forward, "
            f"{tps1:.0f} tokens/s.\n\n" + e2e_md + "\n")
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        fh.write(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
