"""A generator's tensors: zeros for its KV cache, the prefill graph materialised from a source and
the decode graph tied to it (one set of weights, one cache)."""
from __future__ import annotations

from torch import fx

from ..tensors import share_tensors
from ..weights.materialize import materialize
from ..weights.sources import Source, ZerosSource
from .cache import is_cache_buffer

__all__ = ["cache_source", "fill_generator"]


def cache_source(prefill: fx.GraphModule):
    """Zeros for the KV-cache buffers of an (unpartitioned) generation graph: a ZerosSource of their
    global shapes."""
    caches = {n: b for n, b in prefill.named_buffers() if is_cache_buffer(n)}
    return ZerosSource({n: tuple(b.shape) for n, b in caches.items()}, {n: b.dtype for n, b in caches.items()})


def fill_generator(prefill: fx.GraphModule, decode: fx.GraphModule, source: Source, buffers: Source | None,
                   device) -> None:
    """Materialise the prefill graph's tensors from `source` / `buffers`, then tie the decode graph to
    them (one set of weights, one cache) and retarget its device literals."""
    materialize(prefill, source, device=device, buffers=buffers)
    share_tensors(decode, prefill)
    materialize(decode, source, device=device, buffers=buffers)
