"""Overlap of the expert all-to-alls with the residual MLP (`overlap_a2a`), on a simulated two-node
cluster. A script, not a test; needs root for the network namespaces (`_netns_cluster.py`).

    python benchmarks/bench_overlap_cpu.py                          # 2 x 2 ranks at 1 Gbit/s, ~6 min
    python benchmarks/bench_overlap_cpu.py --layouts 2x2 2x4 --rate 1gbit 250mbit

Each layout N x G is N network namespaces ("nodes") of G gloo ranks, joined by a bridge whose ports
are rate-limited (tc tbf), so an all-to-all pays for the bytes that cross nodes as it would between
machines, while ranks of one node talk over loopback. "loopback" runs every rank in this namespace
(no limit), for reference. The model is the GPT-2 of `bench_distributed_cpu.py` (d = --d, 4
blocks), PR-MoE every 2nd block with 8 experts, top-1, dropless, residual, ep = world (flat
all-to-all), each rank its own batch of B x T tokens. Variants, timed in turn round after round
(`_timing.interleaved_ms`, slowest rank's median):

- serial:      the residual plan with `disable = ["overlap_a2a"]`: each all-to-all waits at once
               and the dense MLP runs before the router, as DeepSpeed runs it;
- overlap:     the same plan with overlap_a2a: the dense MLP runs while the dispatch all-to-all is in
               flight, the coefficient while the combine all-to-all is;
- no residual: the plan without the residual MLP, serial, to price the dense MLP:
               mlp = serial - no residual (the MLP, its coefficient and the mix);
- overlap + grad buckets (training step only): overlap, and the gradients all-reduced in buckets of
               --bucket-mb during backward (`moefx.dist.grads.GradBuckets`) instead of after it.
Every training step ends with its gradients reduced (the serial and overlap variants by
`reduce_gradients` after backward).

saved = serial - overlap is the exposed all-to-all time the overlap removed; the goal is
saved >= mlp / 2 where the transfer is at least that long. Eager rank graphs (the node order is the
schedule); forward under no_grad, training step = forward + loss + backward. Results: printed and
written to benchmarks/results/overlap_cpu.md.
"""
from __future__ import annotations

import argparse
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

MOE = {"experts": 8, "every": 2, "top_k": 1, "residual": True, "drop_tokens": False}


def _plan(world: int, residual: bool, overlap: bool):
    import moefx

    d = {"moe": {**MOE, "residual": residual},
         "parallel": {"nodes": 1, "devices_per_node": world, "ep": world}}
    if not overlap:
        d["disable"] = ["overlap_a2a"]
    return moefx.Plan.from_dict(d)


def worker(a) -> None:
    """One rank: build the three variants, time them in turn, rank 0 writes the medians as JSON."""
    import bench_distributed_cpu as bd
    import torch
    import torch.distributed as dist

    import moefx
    from moefx.dist.grads import GradBuckets, reduce_gradients
    from moefx.dist.mesh import build_mesh
    from moefx.distribute import resolve

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=600))
    warnings.simplefilter("ignore")
    bd.D = a.d
    variants = {"serial": (True, False), "overlap": (True, True), "no residual": (False, False)}
    graphs = {}
    mesh = None
    for train in (False, True):
        for name, (residual, overlap) in variants.items():
            _, gm = bd.build(0, train=train, moe={**MOE, "residual": residual})
            plan = _plan(a.world, residual, overlap)
            if mesh is None:
                mesh = build_mesh(resolve(gm, plan.parallel, a.world))
            graphs[name, train] = moefx.distribute(gm, plan, mesh=mesh).train(train)
    (ids,), targets = bd.batch(a.rank, a.batch, a.seq)

    def forward(local):
        def run():
            with torch.no_grad():
                local(ids)
        return run

    def step(local, buckets=None):
        def run():
            loss = bd.lm_loss(bd.logits_of(local(ids)), targets) + moefx.aux_loss(local)
            if buckets is not None:
                buckets.arm()
            loss.backward()
            if buckets is not None:
                buckets.finish()
            else:
                reduce_gradients(local)
            local.zero_grad(set_to_none=True)
        return run

    out = {"forward": bd.interleaved_world({name: forward(graphs[name, False]) for name in variants},
                                           rounds=a.rounds, reps=a.reps, warmup=2)}
    steps = {name: step(graphs[name, True]) for name in variants}
    steps["overlap + grad buckets"] = step(graphs["overlap", True], GradBuckets(graphs["overlap", True],
                                                                                a.bucket_mb))
    out["training step"] = bd.interleaved_world(steps, rounds=a.rounds, reps=a.reps, warmup=2)
    if a.rank == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _argv(a, rank: int, world: int, master: str, port: int, out: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(rank), "--world", str(world),
            "--master", master, "--port", str(port), "--out", out, "--d", str(a.d), "--batch", str(a.batch),
            "--seq", str(a.seq), "--rounds", str(a.rounds), "--reps", str(a.reps), "--bucket-mb", str(a.bucket_mb)]


def _wait(procs, timeout: float) -> None:
    end = time.time() + timeout
    for p in procs:
        left = max(1.0, end - time.time())
        try:
            code = p.wait(timeout=left)
        except Exception:
            raise RuntimeError(f"a rank ran past {timeout:.0f} s")
        if code != 0:
            raise RuntimeError(f"a rank exited with code {code}")


def run_layout(a, layout: str, rate: str | None) -> dict:
    """Spawn one layout ("loopback" or "NxG") and return rank 0's medians."""
    from moefx.runtime.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        if layout == "loopback":
            world, port = a.world_loopback, free_port()
            procs = [subprocess.Popen(_argv(a, r, world, "127.0.0.1", port, out)) for r in range(world)]
            try:
                _wait(procs, a.timeout)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        else:
            from _netns_cluster import Cluster

            nodes, per_node = (int(x) for x in layout.split("x"))
            with Cluster(nodes, rate=rate) as c:
                world, port = nodes * per_node, 29611
                procs = [c.spawn(r // per_node, _argv(a, r, world, c.addr(0), port, out), {})
                         for r in range(world)]
                _wait(procs, a.timeout)
        with open(out) as f:
            return json.load(f)


def rows_of(layout: str, rate: str | None, result: dict) -> list[dict]:
    rows = []
    for mode, ms in result.items():
        serial, overlap, plain = ms["serial"], ms["overlap"], ms["no residual"]
        mlp, saved = serial - plain, serial - overlap
        bucketed = ms.get("overlap + grad buckets")
        rows.append({"layout": layout, "link": rate or "loopback", "mode": mode, "serial ms": serial,
                     "overlap ms": overlap, "no-residual ms": plain, "mlp ms": mlp, "saved ms": saved,
                     "saved / mlp": saved / mlp if mlp > 0 else float("nan"), "serial / overlap": serial / overlap,
                     "+ buckets ms": bucketed if bucketed is not None else "",
                     "serial / (overlap + buckets)": serial / bucketed if bucketed else ""})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=["loopback", "2x2"], help="loopback and/or NxG")
    p.add_argument("--rate", nargs="+", default=["1gbit"], help="tc tbf rates of the node links")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--world-loopback", type=int, default=4)
    p.add_argument("--bucket-mb", type=float, default=1.0, help="gradient bucket size of the bucketed variant")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--output", default="overlap_cpu.md", help="results file name under benchmarks/results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return

    from _timing import load_note, table

    note = load_note()
    rows = []
    for layout in a.layouts:
        for rate in ([None] if layout == "loopback" else a.rate):
            print(f"# {layout} {rate or ''}", flush=True)
            rows += rows_of(layout, rate, run_layout(a, layout, rate))
            print(json.dumps(rows[-2:]), flush=True)
    cols = ["layout", "link", "mode", "serial ms", "overlap ms", "no-residual ms", "mlp ms", "saved ms",
            "saved / mlp", "serial / overlap", "+ buckets ms", "serial / (overlap + buckets)"]
    text = "\n".join([
        "# Overlap of the expert all-to-alls with the residual MLP (CPU, gloo)", "",
        f"`python benchmarks/bench_overlap_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{datetime.date.today()}; {note}", "",
        f"GPT-2 d={a.d}, 4 blocks, PR-MoE every 2nd block (8 experts, top-1, dropless, residual), ep = world, "
        f"{a.batch} x {a.seq} tokens per rank, eager rank graphs, one thread per rank; slowest rank's median "
        f"over {a.rounds} interleaved rounds of {a.reps} calls. mlp = serial - no residual; saved = serial - "
        "overlap.", "",
        table(rows, cols), ""])
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", a.output), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
