"""Flat and hierarchical all-to-all on real gloo ranks, against a single-process reference.

One spawned world of 8 ranks runs every scenario (2x4, 4x2, 1x8, 8x1 on the whole world, 2x2 on
each half, 1x2 / 2x1 on pairs); one world of 2 checks the default-group path. Every rank builds the
whole problem from a shared seed, computes the reference (what flat routing must deliver, and
the gradients of a weighted sum through it) locally and compares bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_world

from moefx.runtime.all_to_all import (HierarchicalSplits, exchange_counts, flat_all_to_all, hierarchical_all_to_all,
                                      hierarchical_all_to_all_inverse, hierarchical_splits, permute_chunks)


def make_problem(p: int, seed: int, dim: int = 3, dtype=torch.float32):
    """Send-count matrix S[s][d] (with zero splits and an all-zero source), inputs x_s, weights W_d."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randint(0, 4, (p, p), generator=g)
    S[torch.rand(p, p, generator=g) < 0.25] = 0
    S[seed % p] = 0                              # one rank sends nothing at all
    xs = [torch.randn(int(S[s].sum()), dim, generator=g).to(dtype) for s in range(p)]
    ws = [torch.randn(int(S[:, d].sum()), dim, generator=g).to(dtype) for d in range(p)]
    return S, xs, ws


def reference(S, xs, ws, me: int):
    """Flat routing result for rank `me`, and d(sum_d <y_d, W_d>)/dx_me, in one process."""
    p = S.shape[0]
    leaves = [x.clone().requires_grad_() for x in xs]
    chunks = [torch.split(leaves[s], S[s].tolist()) for s in range(p)]
    ys = [torch.cat([chunks[s][d] for s in range(p)]) for d in range(p)]
    sum((y * w).sum() for y, w in zip(ys, ws)).backward()
    return ys[me].detach(), leaves[me].grad


def _groups(ranks, nodes, g):
    """Create (on every rank, same order) the whole group, its node groups and inter groups."""
    import torch.distributed as dist
    whole = dist.new_group(ranks)
    intra = [dist.new_group([ranks[n * g + i] for i in range(g)]) for n in range(nodes)]
    inter = [dist.new_group([ranks[n * g + i] for n in range(nodes)]) for i in range(g)]
    return whole, intra, inter


def check_scenario(rank, ranks, nodes, g, groups, seed, dtype=torch.float32):
    if rank not in ranks:
        return
    whole, intra, inter = groups
    me = ranks.index(rank)
    S, xs, ws = make_problem(len(ranks), seed, dtype=dtype)
    send, recv = S[me].tolist(), S[:, me].tolist()
    ref_y, ref_grad = reference(S, xs, ws, me)
    what = f"{nodes}x{g} on {ranks}, seed {seed}, {dtype}"

    # counts: row d of what I send <-> row s of what I receive
    got = exchange_counts(S[me].clone(), whole)
    assert got.tolist() == recv, what
    got2 = exchange_counts(torch.stack([S[me], 2 * S[me]], 1), whole)       # [P, k] form
    assert got2.tolist() == [[r, 2 * r] for r in recv], what

    # flat
    x = xs[me].clone().requires_grad_()
    y = flat_all_to_all(x, send, recv, whole)
    assert torch.equal(y, ref_y), f"flat {what}"
    (y * ws[me]).sum().backward()
    assert torch.equal(x.grad, ref_grad), f"flat grad {what}"

    # hierarchical == flat, bit for bit, gradients too
    ig, eg = intra[me // g], inter[me % g]
    hs = hierarchical_splits(send, recv, ig, nodes, g)
    assert hs == HierarchicalSplits.from_matrix(S, me, nodes, g), what
    xh = xs[me].clone().requires_grad_()
    yh = hierarchical_all_to_all(xh, send, recv, ig, eg, nodes, g, splits=hs)
    assert torch.equal(yh, ref_y), f"hierarchical {what}: {yh} vs {ref_y}"
    (yh * ws[me]).sum().backward()
    assert torch.equal(xh.grad, ref_grad), f"hierarchical grad {what}"
    # without precomputed splits (exchanges counts itself)
    assert torch.equal(hierarchical_all_to_all(xs[me], send, recv, ig, eg, nodes, g), ref_y), what

    # combine direction: inverse (reverse route) and forward route with swapped splits both
    # return exactly the original rows; the round trip's gradient is the identity.
    x2 = xs[me].clone().requires_grad_()
    y2 = hierarchical_all_to_all(x2, send, recv, ig, eg, nodes, g, splits=hs)
    back = hierarchical_all_to_all_inverse(y2 * 2, hs, ig, eg)
    assert torch.equal(back, xs[me] * 2), f"inverse {what}"
    assert torch.equal(flat_all_to_all(ref_y * 2, recv, send, whole), xs[me] * 2), what
    swapped = hierarchical_all_to_all(ref_y * 2, recv, send, ig, eg, nodes, g)
    assert torch.equal(swapped, xs[me] * 2), f"swapped splits {what}"
    wx = torch.randn(x2.shape, generator=torch.Generator().manual_seed(seed + me)).to(dtype)
    (back * wx).sum().backward()
    assert torch.equal(x2.grad, 2 * wx), f"round-trip grad {what}"


def scenarios_world8(rank, world):
    import torch.distributed as dist
    full = list(range(8))
    cases = [(full, 2, 4), (full, 4, 2), (full, 1, 8), (full, 8, 1),
             ([0, 1, 2, 3], 2, 2), ([4, 5, 6, 7], 2, 2), ([0, 1], 1, 2), ([2, 3], 2, 1)]
    made = [(r, n, g, _groups(r, n, g)) for r, n, g in cases]          # every rank creates every group
    for seed in (0, 1):
        for i, (r, n, g, groups) in enumerate(made):
            check_scenario(rank, r, n, g, groups, seed=10 * seed + i)
    # other dtypes (bit-exact movement, no arithmetic): float64 on 2x4, bfloat16 on the 2x2 halves
    check_scenario(rank, full, 2, 4, made[0][3], seed=7, dtype=torch.float64)
    check_scenario(rank, [0, 1, 2, 3], 2, 2, made[4][3], seed=8, dtype=torch.bfloat16)
    check_scenario(rank, [4, 5, 6, 7], 2, 2, made[5][3], seed=9, dtype=torch.bfloat16)
    # all-empty exchange: every split zero
    ig, eg = made[0][3][1][rank // 4], made[0][3][2][rank % 4]
    z = torch.zeros(0, 5)
    out = hierarchical_all_to_all(z, [0] * 8, [0] * 8, ig, eg, 2, 4)
    assert out.shape == (0, 5)
    dist.barrier()


def scenarios_world2(rank, world):
    # default group (group=None) and the 1-rank shortcuts
    S, xs, ws = make_problem(2, seed=4)
    send, recv = S[rank].tolist(), S[:, rank].tolist()
    ref_y, _ = reference(S, xs, ws, rank)
    assert exchange_counts(S[rank].clone()).tolist() == recv
    assert torch.equal(flat_all_to_all(xs[rank], send, recv), ref_y)
    with pytest.raises(ValueError, match="send_splits sum"):
        flat_all_to_all(xs[rank][:0], [1, 1], recv)


@pytest.mark.dist
def test_all_to_all_world8():
    run_world(scenarios_world8, 8, timeout=120)


@pytest.mark.dist
def test_all_to_all_world2():
    run_world(scenarios_world2, 2)


def test_permute_chunks_roundtrip():
    x = torch.arange(10.).reshape(10, 1)
    sizes, order = [3, 0, 2, 5], [2, 0, 3, 1]
    y = permute_chunks(x, sizes, order)
    assert y.flatten().tolist() == [3, 4, 0, 1, 2, 5, 6, 7, 8, 9]
    inv = [order.index(i) for i in range(4)]
    assert torch.equal(permute_chunks(y, [sizes[i] for i in order], inv), x)


def test_reference_is_flat_routing():
    S, xs, ws = make_problem(3, seed=5)
    y1, _ = reference(S, xs, ws, 1)
    assert y1.shape[0] == int(S[:, 1].sum())
