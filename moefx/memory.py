"""Will a training step fit? The activation memory of a step, estimated from a captured graph, against
what the device has available, so that a job refuses an impossible --batch / --seq before its first
forward instead of paging the machine to a halt."""
from __future__ import annotations

import os

import torch
from torch import fx

from .errors import MoefxError

__all__ = ["activation_bytes", "available_bytes", "check_step_fits", "local_ranks"]


def _hinted_numel(t: torch.Tensor) -> int | None:
    """numel of a (fake) tensor whose sizes may be symbolic, from their example values; None if unknown."""
    n = 1
    for s in t.shape:
        if isinstance(s, torch.SymInt):
            s = s.node.hint
            if s is None:
                return None
        n *= int(s)
    return n


def activation_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every intermediate tensor a forward of `gm` computes, at the shapes it was captured with
    (from each node's meta value). Training keeps most of them for the backward, so this is what a
    step holds at its peak, give or take the backward's own temporaries."""
    total = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else (vals,):
            if isinstance(v, torch.Tensor):
                n = _hinted_numel(v)
                total += (n or 0) * v.element_size()
    return total


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take on `device`: free CUDA memory, or the host's MemAvailable;
    None when unknown (another OS, another device type)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_step_fits(gm: fx.GraphModule, device: torch.device, *, batch: int, seq: int, share: float = 1.0,
                    ranks_here: int = 1) -> None:
    """MoefxError naming the numbers when a training step of `gm` (captured at batch x seq tokens)
    cannot fit: its activations x share (this rank's part, e.g. 1 / tp) x ranks_here (ranks of this
    host sharing its memory, on the CPU) above what `device` has available."""
    need = activation_bytes(gm) * share
    have = available_bytes(device)
    if have is None or need == 0:
        return
    host = ranks_here if device.type == "cpu" else 1
    if need * host > have:
        per = f" x {host} ranks on this host" if host > 1 else ""
        raise MoefxError(f"a training step of --batch {batch} x --seq {seq} tokens holds about {_gib(need)} of "
                         f"activations{per} (estimated from the graph), more than the {_gib(have)} {device.type} "
                         f"memory available: lower --batch or --seq (--grad-accum keeps the tokens per step)")


def local_ranks() -> int:
    """Ranks of this job on this host (torchrun's LOCAL_WORLD_SIZE; 1 outside a launch)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
