"""Launch-test worker: rank 1 raises; the others wait in a collective (and must not hang)."""
import torch
import torch.distributed as dist

from moefx.dist.worker import init_from_env, worker


@worker
def main():
    rank, world = init_from_env(timeout=60)
    if rank == 1:
        raise ValueError("boom from the test worker")
    t = torch.ones(1)
    dist.all_reduce(t)   # never completes: rank 1 is gone
    print(f"rank {rank}: all_reduce returned {t.item()}", flush=True)


if __name__ == "__main__":
    main()
