"""Local layout steps around the expert-parallel all-to-all (no communication here).

A rank's dispatch buffer is [E, C, d]: E experts, C slots each (C may differ between ranks). EP
rank i of a layer holds experts [i * E/ep, (i + 1) * E/ep) (`experts_per_rank` = epr), or with
expert slicing (ep = s * E) slice i % s of expert i // s, so each expert's rows go to its s ranks.

    rows   = ep_pack(buf, s)                      [E * s * C, d], grouped by destination EP rank
    send   = ep_send_counts(buf, ep, s)           rows per destination
    recv   = CountExchange(send, rows)            rows per source (ints)
    x      = AllToAll(rows, send, recv)           rows from every source, source-major
    local  = ep_to_expert_major(x, recv, epr)     [epr, sum of sources' C, d] -> experts
    y_rows = ep_from_expert_major(y, recv, epr)   back to source-major rows
    back   = AllToAll(y_rows, recv, send)
    out    = ep_unpack(back, buf, s)              [E, C, d] (slices summed)
"""
from __future__ import annotations

import torch
from torch import Tensor


def ep_pack(buf: Tensor, slicing: int = 1) -> Tensor:
    """[E, C, d] -> rows grouped by destination; each expert repeated `slicing` times."""
    E, C, d = buf.shape
    if slicing > 1:
        buf = buf.repeat_interleave(slicing, dim=0)
    return buf.reshape(-1, d)


def ep_send_counts(buf: Tensor, ep: int, slicing: int = 1) -> list[int]:
    """Rows this rank sends to each of the `ep` EP ranks."""
    E, C, _ = buf.shape
    return [(E * slicing // ep) * C] * ep


def ep_to_expert_major(x: Tensor, recv: list[int], experts_per_rank: int) -> Tensor:
    """Source-major rows [(src, expert, C_src), d] -> [expert, (src, C_src), d]."""
    d = x.shape[-1]
    chunks = torch.split(x, list(recv), dim=0)
    per_src = [c.reshape(experts_per_rank, -1, d) for c in chunks]
    return torch.cat(per_src, dim=1)


def ep_from_expert_major(y: Tensor, recv: list[int], experts_per_rank: int) -> Tensor:
    """Inverse of ep_to_expert_major: [expert, (src, C_src), d] -> source-major rows."""
    d = y.shape[-1]
    caps = [c // experts_per_rank for c in recv]
    parts = torch.split(y, caps, dim=1)
    return torch.cat([p.reshape(-1, d) for p in parts], dim=0)


def ep_unpack(rows: Tensor, buf: Tensor, slicing: int = 1) -> Tensor:
    """Rows back from the experts -> [E, C, d] like `buf`; expert slices' partial outputs summed."""
    E, C, d = buf.shape
    if slicing > 1:
        return rows.reshape(E, slicing, C, d).sum(dim=1)
    return rows.reshape(E, C, d)
