"""How every tensor a pass creates is computed from its sources: the recipe of a global tensor.

A converted model's tensors are either the dense model's own (copied or shared) or new ones the
PR-MoE pass makes: stacked expert weights (copies of the dense FFN, optionally with noise, or a
fresh random init) and the router / residual-coefficient weights (a seeded uniform init). The
pass records one recipe per new tensor (`facts(gm).recipes`: global name -> recipe) and
builds the values with the same recipe, so a rank that materialises only its own piece of a
tensor (`build(read, experts=..., narrow=...)`) gets exactly the values the single-process model
holds, without ever holding the whole tensor: expert e's noise comes from its own seeded
generator, and the dense weight it copies is read as the slice the piece needs.

`read(name, narrow)` is the source: the dense tensor `name`, narrowed by `narrow` ({dim: (lo,
hi)} of that tensor) when given; a safetensors folder reads only those bytes.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Reader = Callable[[str, dict], Tensor]   # (name, {dim: (lo, hi)}) -> tensor


def seeded(*key) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (same numbers on every machine and rank)."""
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, key)).encode()))


@dataclass(frozen=True)
class StackExperts:
    """E experts' stacked copy of one dense tensor: value[e] = prepare(dense) (+ noise), [E, ...].

    source: the dense tensor's name; transpose: store it transposed (a linear's [out, in] weight
    as the [in, out] matrix experts multiply by); chunk: (dim, index, parts) of the dense tensor
    to take first (one half of a fused gate/up projection); init: "upcycle" (copies, plus
    `noise` * std(dense) seeded noise when noise > 0) or "random" (seeded normal with the dense
    tensor's std for matrices, `fill` for vectors: 0 for biases, 1 for a norm's weight);
    key: (seed, layer, tag) of the seeded generators, one per expert.
    """

    source: str
    experts: int
    transpose: bool = False
    chunk: tuple[int, int, int] | None = None
    init: str = "upcycle"
    noise: float = 0.0
    key: tuple = ()
    fill: float = 0.0

    def _source_narrow(self, expert_shape_narrow: dict[int, tuple[int, int]], dense_shape: tuple[int, ...]) -> dict:
        """The slice of the dense tensor that a slice of one expert's tensor reads."""
        out: dict[int, tuple[int, int]] = {}
        if self.chunk is not None:
            dim, index, parts = self.chunk
            size = dense_shape[dim] // parts
            out[dim] = (index * size, (index + 1) * size)
        for d, (lo, hi) in expert_shape_narrow.items():
            src = (1 - d) if self.transpose else d
            base = out.get(src, (0, dense_shape[src]))[0]
            out[src] = (base + lo, base + hi)
        return out

    def build(self, read: Reader, dense_shape: tuple[int, ...], *, experts: range | None = None,
              narrow: dict[int, tuple[int, int]] | None = None, dtype: torch.dtype | None = None,
              device=None) -> Tensor:
        """Experts `experts` (default all) of the stacked tensor, each narrowed by `narrow` ({dim of
        one expert's tensor: (lo, hi)}): shape [len(experts), *narrowed expert shape]."""
        experts = range(self.experts) if experts is None else experts
        narrow = dict(narrow or {})
        needs_full = self.init == "random" or self.noise > 0
        full = read(self.source, self._source_narrow({}, dense_shape)) if needs_full else None
        part = read(self.source, self._source_narrow(narrow, dense_shape)) if not needs_full else None
        if full is not None:
            full = full.t() if self.transpose else full
            std = float(full.detach().float().std()) if full.dim() > 1 and full.numel() > 1 else 0.0
            part = full
            for d, (lo, hi) in narrow.items():
                part = part.narrow(d, lo, hi - lo)
        else:
            part = part.t() if self.transpose else part
            std = 0.0
        dtype = dtype or part.dtype
        pieces = []
        for e in experts:
            if self.init == "random":
                if full.dim() > 1:
                    value = torch.randn(full.shape, generator=seeded(*self.key, e)) * std
                    for d, (lo, hi) in narrow.items():
                        value = value.narrow(d, lo, hi - lo)
                else:
                    value = torch.full(part.shape, float(self.fill))
            elif self.noise > 0 and full.dim() > 1:
                noise = torch.randn(full.shape, generator=seeded(*self.key, e)) * (self.noise * std)
                for d, (lo, hi) in narrow.items():
                    noise = noise.narrow(d, lo, hi - lo)
                value = part.detach().float() + noise
            else:
                value = part.detach()
            pieces.append(value.to(device=device if device is not None else part.device, dtype=dtype))
        if not pieces:
            return torch.empty((0, *part.shape), dtype=dtype, device=device if device is not None else part.device)
        return torch.stack(pieces)

    def shape(self, dense_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The full stacked shape [E, ...] for a dense tensor of `dense_shape`."""
        shape = list(dense_shape)
        if self.chunk is not None:
            dim, _, parts = self.chunk
            shape[dim] //= parts
        if self.transpose:
            shape = shape[::-1]
        return (self.experts, *shape)


@dataclass(frozen=True)
class Uniform:
    """nn.Linear's default init, uniform in +-1/sqrt(fan_in), from a generator seeded by `key`."""

    shape: tuple[int, ...]
    fan_in: int
    key: tuple = ()

    def build(self, *, narrow: dict[int, tuple[int, int]] | None = None, dtype=torch.float32, device=None) -> Tensor:
        bound = 1 / math.sqrt(self.fan_in)
        value = torch.empty(self.shape).uniform_(-bound, bound, generator=seeded(*self.key))
        for d, (lo, hi) in (narrow or {}).items():
            value = value.narrow(d, lo, hi - lo)
        return value.to(device=device, dtype=dtype)




@dataclass(frozen=True)
class Copy:
    """A copy of the dense tensor `source` (constants a pass moves into a new module)."""

    source: str

    def build(self, read: Reader, *, dtype=None, device=None) -> Tensor:
        value = read(self.source, {})
        return value.detach().clone().to(device=device, dtype=dtype or value.dtype)


Recipe = StackExperts | Uniform | Copy
