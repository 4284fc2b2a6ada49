"""Spawn a small gloo world on loopback and run a function on every rank (tests only).

    def check(rank, world, arg): ...            # module level, so spawn can pickle it
    run_world(check, 4, arg)                    # raises if any rank raised, or on timeout

Every rank gets an initialised default process group (gloo, tcp://127.0.0.1:<free port>) whose
collective timeout is `timeout`, so a rank left waiting on a dead peer errors instead of hanging.
Workers are forked from a forkserver that preloads torch and moefx.runtime, so a world starts in
well under a second; still, share one world across many checks.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.multiprocessing as mp

from moefx.runtime.launch import free_port


def _entry(rank: int, fn, world: int, port: int, timeout: float, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _preload() -> None:
    # forkserver: one server process imports torch once (before any OpenMP thread exists, so forking
    # it is safe); every worker is then a cheap fork of it instead of a fresh interpreter. The first
    # eager functional collective imports torch._dynamo (seconds), so the server preloads it too.
    import multiprocessing.forkserver as fs
    if getattr(fs._forkserver, "_forkserver_pid", None) is None:
        mp.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "pytest", "moefx.runtime",
                                   "dist_utils"])


def run_world(fn, world: int, *args, timeout: float = 60.0) -> float:
    """Run fn(rank, world, *args) on `world` spawned gloo ranks; return the wall time in seconds.

    Raises the first worker's exception (as torch.multiprocessing.ProcessRaisedException, with its
    traceback and rank) or TimeoutError after `timeout` seconds (all workers are then killed).
    """
    t0 = time.monotonic()
    _preload()
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), timeout, args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = t0 + timeout
    while not ctx.join(timeout=0.2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join()
            raise TimeoutError(f"gloo world of {world} ranks running {fn.__name__} did not finish in {timeout}s")
    return time.monotonic() - t0
