"""Local layout steps around the expert-parallel all-to-all (no communication here).

Graph targets of the expert_parallel and hierarchical_a2a passes. EP rank i of a layer holds
experts [i * epr, (i + 1) * epr) (epr = experts per rank) or, with expert slicing (ep = s * E),
slice i % s of expert i // s, so each expert's rows go to its s ranks.

Capacity layers (drop_tokens = true) exchange the [E, C, d] buffer as it is: every rank sends
epr * C rows to every EP rank (C is the same on every rank of the group: the same token count),
so the split sizes are static and no count is exchanged::

    rows   = capacity_send(buf, s)              [E * s * C, d], grouped by destination
    x      = all_to_all(rows, splits, splits)   rows from every source, source-major
    local  = capacity_local(x, ep, n)           [n, ep * C, d]: this rank's n experts (or slices)
    y_rows = capacity_unlocal(y, ep)            back to source-major rows
    back   = all_to_all(y_rows, splits, splits)
    y_buf  = capacity_unpack(back, E, s)        [E, C, d] (expert slices' partial sums added)

Dropless layers send exactly the routed tokens: the rows sorted by expert (`sorted_slots`: row =
offset of the expert + slot), with uneven splits from the count matrix every EP rank gathers
(`exchange`: the one host synchronisation of the layer)::

    slots  = sorted_slots(routing)              [S, k] rows of the flat [1, S * k, d] buffer
    m      = all_gather_rows(counts)            [ep, E] counts of every EP rank (device)
    xc     = exchange(m, ...)                   Exchange: splits, local loads (host ints)
    x      = all_to_all(send_rows(...), xc.recv, xc.send)
    e, c   = local_table(m, xc, ...)            received row -> (local expert, slot)
    buf    = dispatch(x, e, c)                  [n, max local load, d] -> experts -> combine back
    back   = all_to_all(y_rows, xc.send, xc.recv)

With tensor parallelism coordinated (`ResolvedParallel.coordinated`), each TP rank first keeps
its chunk of the slots (capacity) or of the sorted rows (dropless) and the expert outputs are
all-gathered over the TP group afterwards.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------ capacity layers


def capacity_send(buf: Tensor, slicing: int) -> Tensor:
    """[E, C, d] -> rows grouped by destination; each expert repeated `slicing` times."""
    d = buf.shape[-1]
    if slicing > 1:
        buf = buf.repeat_interleave(slicing, dim=0)
    return buf.reshape(-1, d)


def capacity_splits(buf: Tensor, ep: int, slicing: int) -> list[int]:
    """Rows sent to (and received from) each of the `ep` EP ranks: E * s / ep experts of C rows."""
    E, C, _ = buf.shape
    return [(E * slicing // ep) * C] * ep


def capacity_local(x: Tensor, ep: int, n: int) -> Tensor:
    """Source-major rows [(src, n, C), d] -> [n, (src, C), d]: this rank's n experts."""
    d = x.shape[-1]
    return x.reshape(ep, n, -1, d).transpose(0, 1).reshape(n, -1, d)


def capacity_unlocal(y: Tensor, ep: int) -> Tensor:
    """Inverse of capacity_local: [n, (src, C), d] -> source-major rows."""
    n, _, d = y.shape
    return y.reshape(n, ep, -1, d).transpose(0, 1).reshape(-1, d)


def capacity_unpack(rows: Tensor, num_experts: int, slicing: int) -> Tensor:
    """Rows back from the experts -> [E, C, d]; expert slices' partial outputs summed."""
    d = rows.shape[-1]
    if slicing > 1:
        return rows.reshape(num_experts, slicing, -1, d).sum(dim=1)
    return rows.reshape(num_experts, -1, d)


# ------------------------------------------------------------------------------------ dropless layers


def sorted_slots(expert: Tensor, slot: Tensor, counts: Tensor) -> Tensor:
    """Row of every choice in the expert-sorted flat buffer: offset of its expert + its slot."""
    offsets = torch.cumsum(counts, 0) - counts
    return _take(offsets, expert) + slot


def _take(values: Tensor, index: Tensor) -> Tensor:
    """values[index] for a 1-D `values` and an index tensor of any shape (index_select: no Python indexing,
    which fake CUDA tensors on a CPU-only build do not support)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)


def zeros_like_expert(expert: Tensor) -> Tensor:
    """Every choice in "expert" 0 of the flat [1, S * k, d] buffer."""
    return torch.zeros_like(expert)


def total_rows(expert: Tensor) -> Tensor:
    """counts of the flat buffer: one "expert" holding all S * k rows."""
    return torch.full((1,), expert.numel(), dtype=torch.long, device=expert.device)


def flat_rows(buf: Tensor) -> Tensor:
    """[1, N, d] -> [N, d]."""
    return buf.reshape(-1, buf.shape[-1])


def unflat_rows(rows: Tensor) -> Tensor:
    """[N, d] -> [1, N, d]."""
    return rows.reshape(1, -1, rows.shape[-1])


def counts_in_chunk(counts: Tensor, n: int, parts: int, index: int) -> Tensor:
    """Per-expert rows of the sorted buffer of `n` rows that fall in chunk `index` of `parts`."""
    size = -(-n // parts)
    lo, hi = index * size, min(n, (index + 1) * size)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    return (torch.clamp(torch.minimum(ends, torch.full_like(ends, hi)) - torch.maximum(starts, torch.full_like(
        starts, lo)), min=0))


@dataclass(frozen=True)
class Exchange:
    """Every split of one dropless expert all-to-all, for this rank (host ints).

    send[j] / recv[j]: rows to / from EP rank j; rows[i][j]: rows EP rank i sends to EP rank j
    (for the hierarchical all-to-all); local[e]: rows this rank's expert e receives in all;
    local_max: the largest of them, at least 2 (the local buffer's capacity).
    """

    send: list
    recv: list
    rows: list
    local: list
    local_max: int

    @property
    def received(self) -> int:
        return sum(self.recv)


def exchange(matrix: Tensor, ep_rank: int, experts_per_rank: int, slicing: int) -> Exchange:
    """The splits of a dropless all-to-all from the gathered count matrix [ep, E] (counts of every EP
    rank's rows per expert). The one host synchronisation of a dropless layer."""
    m = matrix.tolist()
    ep = len(m)
    if slicing > 1:
        owner = [[j // slicing] for j in range(ep)]        # EP rank j holds a slice of expert j // s
    else:
        owner = [list(range(j * experts_per_rank, (j + 1) * experts_per_rank)) for j in range(ep)]
    for row in m:
        for v in row:
            torch._check(v >= 0)
    rows = [[sum(m[i][e] for e in owner[j]) for j in range(ep)] for i in range(ep)]
    mine = owner[ep_rank]
    local = [sum(m[i][e] for i in range(ep)) for e in mine]
    # at least 2 rows, as for a single-process dropless buffer (moefx.nn.routing.route): compilers
    # cannot guard on whether a data-dependent size is 1
    local_max = functools.reduce(torch.sym_max, local, 2) if local else 0
    return Exchange(send=rows[ep_rank], recv=[rows[i][ep_rank] for i in range(ep)], rows=rows, local=local,
                    local_max=local_max)


def send_index(counts: Tensor, slicing: int, total: int) -> Tensor:
    """With expert slicing, the sorted rows each destination gets: every expert's rows once per slice
    rank (index into the sorted rows, `total` = rows sent)."""
    E = counts.shape[0]
    starts = torch.cumsum(counts, 0) - counts
    reps = counts.repeat_interleave(slicing)                      # rows per destination
    dest_start = torch.cumsum(reps, 0) - reps
    src_start = starts.repeat_interleave(slicing)
    dest = torch.repeat_interleave(torch.arange(E * slicing, device=counts.device), reps, output_size=total)
    return torch.arange(total, device=counts.device) - _take(dest_start, dest) + _take(src_start, dest)


def send_rows(rows: Tensor, counts: Tensor, slicing: int, xc: Exchange) -> Tensor:
    """The rows to send, grouped by destination (the sorted rows; repeated per slice rank)."""
    total = sum(xc.send)
    if slicing > 1:
        return rows.index_select(0, send_index(counts, slicing, total))
    torch._check(total <= rows.shape[0])
    return rows.narrow(0, 0, total)


def unsend_rows(back: Tensor, counts: Tensor, slicing: int, xc: Exchange, n: int) -> Tensor:
    """Rows back from the experts -> [n, d] in sorted order (slices' partial outputs added; rows past
    what was sent, the padding of a TP chunk, are zero)."""
    total = sum(xc.send)
    if slicing > 1:
        out = back.new_zeros(n, back.shape[-1])
        return out.index_add(0, send_index(counts, slicing, total), back)
    torch._check(total <= n)
    return torch.cat([back, back.new_zeros(n - total, back.shape[-1])], dim=0)


def local_table(matrix: Tensor, ep_rank: int, experts_per_rank: int, slicing: int, xc: Exchange
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(expert [R, 1], slot [R, 1], counts [n]) of the R received rows in this rank's local buffer:
    rows arrive grouped by (source, local expert); a local expert's rows from earlier sources come
    first in its buffer."""
    if slicing > 1:
        c = matrix.narrow(1, ep_rank // slicing, 1)
    else:
        c = matrix.narrow(1, ep_rank * experts_per_rank, experts_per_rank)
    ep, n = c.shape
    R = xc.received
    flat = c.reshape(-1)
    dev = matrix.device
    blocks = torch.arange(ep * n, device=dev)
    block = torch.repeat_interleave(blocks, flat, output_size=R)
    block_start = torch.cumsum(flat, 0) - flat
    base = (torch.cumsum(c, 0) - c).reshape(-1)                  # rows of earlier sources, per (src, e)
    slot = torch.arange(R, device=dev) - _take(block_start, block) + _take(base, block)
    expert = block % n
    return expert.unsqueeze(1), slot.unsqueeze(1), c.sum(0)


# ------------------------------------------------------------------------------------ hierarchical steps


@dataclass(frozen=True)
class HierarchicalSplits:
    """Every split one rank needs for both directions of a hierarchical all-to-all over an EP group
    of nodes x devices_per_node ranks (rank = node * G + local).

    send / recv: the flat splits (length N * G, group order); mid[g][n']: rows local rank g of this
    node sends to (n', my local index), i.e. the chunks that pass through this rank.
    """

    nodes: int
    devices_per_node: int
    send: tuple
    recv: tuple
    mid: tuple

    @classmethod
    def from_matrix(cls, counts, rank: int, nodes: int, devices_per_node: int) -> "HierarchicalSplits":
        """From the full row-count matrix (counts[s][d] = rows group rank s sends to d; lists or a tensor)."""
        M = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        N, G = nodes, devices_per_node
        n, g_me = divmod(rank, G)
        mid = tuple(tuple(M[n * G + g][m * G + g_me] for m in range(N)) for g in range(G))
        return cls(N, G, tuple(M[rank]), tuple(M[s][rank] for s in range(N * G)), mid)

    def by_local_then_node(self) -> tuple[list, list[int]]:
        """Step 1: sizes of my send chunks in destination order, and the order (g', n')."""
        N, G = self.nodes, self.devices_per_node
        return list(self.send), [n * G + g for g in range(G) for n in range(N)]

    def intra_send(self) -> list:
        N, G = self.nodes, self.devices_per_node
        return [sum(self.send[n * G + g] for n in range(N)) for g in range(G)]

    def intra_recv(self) -> list:
        return [sum(row) for row in self.mid]

    def mid_sizes_order(self) -> tuple[list, list[int]]:
        """Step 3: received chunks come as (g, n'); reorder to (n', g)."""
        N, G = self.nodes, self.devices_per_node
        sizes = [self.mid[g][n] for g in range(G) for n in range(N)]
        return sizes, [g * N + n for n in range(N) for g in range(G)]

    def inter_send(self) -> list:
        N, G = self.nodes, self.devices_per_node
        return [sum(self.mid[g][n] for g in range(G)) for n in range(N)]

    def inter_recv(self) -> list:
        N, G = self.nodes, self.devices_per_node
        return [sum(self.recv[n * G + g] for g in range(G)) for n in range(N)]


def hierarchical_splits(xc: "Exchange | list", ep_rank: int, nodes: int, devices_per_node: int) -> HierarchicalSplits:
    """The hierarchical splits of an all-to-all: from a dropless `Exchange`, or from the (even) splits of
    a capacity layer (every rank sends the same rows to every rank)."""
    if isinstance(xc, Exchange):
        return HierarchicalSplits.from_matrix(xc.rows, ep_rank, nodes, devices_per_node)
    p = nodes * devices_per_node
    return HierarchicalSplits.from_matrix([list(xc)] * p, ep_rank, nodes, devices_per_node)


def permute_chunks(x: Tensor, sizes, order) -> Tensor:
    """Split rows of `x` into chunks of `sizes` and concatenate them in `order` (a layout transform).

    Pure indexing, so exact and differentiable; zero-size chunks are fine."""
    if list(order) == list(range(len(sizes))):
        return x
    parts = torch.split(x, list(sizes), dim=0)
    return torch.cat([parts[i] for i in order], dim=0)


def unpermute_chunks(x: Tensor, sizes, order) -> Tensor:
    """Undo `permute_chunks(., sizes, order)`: `x` holds the chunks in `order`; restore their order."""
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    return permute_chunks(x, [sizes[i] for i in order], inverse)


def hier_layout(x: Tensor, hs: HierarchicalSplits, stage: str, inverse: bool = False) -> Tensor:
    """The hierarchical all-to-all's local reorderings: stage "by_local" ((n', g') -> (g', n')) or
    "by_node" ((g, n') -> (n', g)); `inverse` undoes it (combine direction)."""
    sizes, order = hs.by_local_then_node() if stage == "by_local" else hs.mid_sizes_order()
    return unpermute_chunks(x, sizes, order) if inverse else permute_chunks(x, sizes, order)


def hier_step(hs: HierarchicalSplits, step: str) -> tuple[list, list]:
    """(send, recv) splits of one step of a hierarchical all-to-all: "intra" or "inter"."""
    return (hs.intra_send(), hs.intra_recv()) if step == "intra" else (hs.inter_send(), hs.inter_recv())


def field(obj, name: str):
    """Attribute `name` of `obj` (a graph node's Python value: Exchange / splits)."""
    return getattr(obj, name)
