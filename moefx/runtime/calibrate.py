"""Measure the communication costs of this job's groups: the profile the hierarchical-a2a decision uses.

    python -m moefx.runtime.calibrate --nodes N --devices-per-node G -o profile.json   (under torchrun)
    moefx calibrate --nnodes N --nproc-per-node G -o profile.json                     (launches it)

Every rank times all-to-alls of a tiny and of a large message over the world, the node's ranks
(intra) and the ranks with its local index on the other nodes (inter), and a local copy. The
slowest rank's median counts. The model of `moefx.cost.CostProfile` is fitted to them:

    t_small(world) = launch + (G - 1) alpha_intra + (p - G) alpha_inter
    t_small(intra) = launch + (G - 1) alpha_intra        t_small(inter) = launch + (N - 1) alpha_inter
    t_large(group) - t_small(group) = V (q - 1) / (q beta)   (q ranks in the group, V bytes per rank)

and rank 0 writes it (atomically). On one host every "link" is loopback, so the fitted profile
makes flat all-to-alls win; a real multi-node cluster with slower links between nodes gets the
hierarchical one where it pays.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..cost import NO_PEERS, CostProfile
from ..dist.mesh import build_mesh
from ..dist.worker import init_from_env, worker
from ..parallel import INTER_NODE, INTRA_NODE, WORLD, ResolvedParallel

__all__ = ["Timings", "measure_timings", "fit_profile", "measure_profile", "main"]

SMALL = 64          # bytes per destination
LARGE = 1 << 20     # bytes per rank in all


def _timed(fn, group, reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls, the slowest rank's (all-reduce MAX over `group`)."""
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _a2a_time(group, nbytes_per_rank: int, device, reps: int) -> float:

    q = dist.get_world_size(group)
    if q == 1:
        return 0.0
    rows = max(1, nbytes_per_rank // 4 // q)
    x = torch.zeros(rows * q, dtype=torch.float32, device=device)

    def run():
        out = funcol.all_to_all_single(x, [rows] * q, [rows] * q, group)
        funcol.wait_tensor(out)

    run()
    return _timed(run, dist.group.WORLD, reps)


@dataclass(frozen=True)
class Timings:
    """What calibration measures (seconds, the slowest rank's medians): all-to-alls of SMALL bytes
    per destination and of LARGE bytes per rank over the "world" / "intra" / "inter" groups, and a
    local copy of LARGE bytes."""

    small: dict[str, float]
    large: dict[str, float]
    copy: float


def measure_timings(mesh, device=None, reps: int = 7) -> Timings:
    """Time the all-to-alls and the copy on the job's mesh (`moefx.dist.mesh.Mesh`; collective:
    every rank calls it)."""
    device = device or torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    groups = {"world": mesh.group(WORLD), "intra": mesh.group(INTRA_NODE), "inter": mesh.group(INTER_NODE)}
    small = {k: _a2a_time(g, SMALL * dist.get_world_size(g), device, reps) for k, g in groups.items()}
    large = {k: _a2a_time(g, LARGE, device, reps) for k, g in groups.items()}
    x = torch.zeros(LARGE // 4, device=device)
    return Timings(small, large, _timed(lambda: x.clone(), dist.group.WORLD, reps))


def fit_profile(nodes: int, devices_per_node: int, t: Timings, source: str) -> CostProfile:
    """The CostProfile whose alpha-beta model best explains the timings `t` of nodes x
    devices_per_node ranks (see the module docstring; latencies clamped at 0)."""
    N, G = nodes, devices_per_node
    p = N * G
    A = torch.tensor([[1.0, G - 1, p - G], [1.0, G - 1, 0.0], [1.0, 0.0, N - 1]], dtype=torch.float64)
    b = torch.tensor([t.small["world"], t.small["intra"], t.small["inter"]], dtype=torch.float64)
    launch, a_intra, a_inter = (max(float(v), 0.0) for v in torch.linalg.lstsq(A, b[:, None]).solution[:, 0])

    def beta(kind: str, q: int) -> float:
        extra = max(t.large[kind] - t.small[kind], 1e-9)
        return LARGE * (q - 1) / (q * extra) if q > 1 else NO_PEERS

    return CostProfile(launch=launch, alpha_intra=a_intra, alpha_inter=a_inter, beta_intra=beta("intra", G),
                       beta_inter=beta("inter", N), beta_mem=LARGE / max(t.copy, 1e-9), source=source)


def measure_profile(mesh, device=None, reps: int = 7) -> CostProfile:
    """Fit a CostProfile to timings of the job's mesh (collective: every rank calls it)."""
    r = mesh.resolved
    t = measure_timings(mesh, device, reps)
    return fit_profile(r.nodes, r.devices_per_node, t,
                       f"measured on {r.nodes} x {r.devices_per_node} ranks ({dist.get_backend()})")


def main(argv: list[str] | None = None) -> None:

    p = argparse.ArgumentParser(prog="python -m moefx.runtime.calibrate",
                                description="measure this job's communication costs (run under torchrun)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    p.add_argument("--devices-per-node", type=int, required=True, help="ranks per node")
    p.add_argument("--output", "-o", required=True, help="where rank 0 writes the profile (JSON)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement")
    args = p.parse_args(argv)

    @worker
    def run():
        rank, world = init_from_env()
        if args.nodes * args.devices_per_node != world:
            raise ValueError(f"--nodes {args.nodes} x --devices-per-node {args.devices_per_node} != {world} ranks")
        resolved = ResolvedParallel(world=world, nodes=args.nodes, devices_per_node=args.devices_per_node, tp=1,
                                    dp=world)
        profile = measure_profile(build_mesh(resolved), reps=args.reps)
        if rank == 0:
            profile.save(args.output)
            print(f"moefx calibrate: {profile.describe()}", flush=True)

    run()


if __name__ == "__main__":
    sys.exit(main())
