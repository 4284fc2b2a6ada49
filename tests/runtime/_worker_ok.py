"""Launch-test worker: all_reduce of ranks; prints what it saw. `--sleep S` sleeps first (timeouts)."""
import os
import sys
import time

import torch
import torch.distributed as dist

from moefx.dist.worker import init_from_env, worker


@worker
def main():
    rank, world = init_from_env(timeout=30)
    if "--sleep" in sys.argv:
        time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    print(f"rank {rank}/{world} node {os.environ['GROUP_RANK']} all_reduce {t.item():g}", flush=True)


if __name__ == "__main__":
    main()
