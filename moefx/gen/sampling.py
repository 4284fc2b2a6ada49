"""Picking the next token from logits: greedy, or sampling with temperature / top-k / top-p.

The order is Hugging Face's (temperature, then top-k, then top-p on what is left), and sampling
draws from a `torch.Generator` the caller seeds, so a seeded run repeats exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoefxError

__all__ = ["Sampling", "next_tokens"]


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: do_sample False = greedy (argmax); else temperature > 0, top_k (None or
    >= 1), top_p in (0, 1]."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise MoefxError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise MoefxError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MoefxError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - sampling.top_p)
        drop_sorted[:, -1] = False                       # keep at least the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
