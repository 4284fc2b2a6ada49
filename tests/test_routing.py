"""Routing mapping table: hand-checked tables, exactness against DeepSpeed's gating, the torch
dispatch / combine path, RTS and noisy gating."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moefx.nn import routing as R
from moefx.nn.routing import Routing, combine, dispatch, expert_capacity, route
from moefx.nn.table import rank_within_groups


@pytest.fixture(scope="module")
def ds():
    """deepspeed.moe.sharded_moe (in the test extra; a missing install fails, it does not skip)."""
    import deepspeed.moe.sharded_moe as sharded_moe

    return sharded_moe


def _route(logits, k, cf=1.0, mc=0, drop=True, **kw):
    return route(logits, top_k=k, capacity_factor=cf, min_capacity=mc, drop_tokens=drop, impl="torch", **kw)


def _p(row, e):
    """softmax(row)[e], computed by hand in float64."""
    z = sum(math.exp(v) for v in row)
    return math.exp(row[e]) / z


def _check_weights(r: Routing, expected):
    torch.testing.assert_close(r.weight, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def _check_aux(r: Routing, logits, first, E, k=1):
    S = len(logits)
    me = [sum(_p(row, e) for row in logits) / S for e in range(E)]
    ce = [sum(1 for f in first if f == e) / S for e in range(E)]
    want = E * sum(m * c for m, c in zip(me, ce))
    assert r.aux_loss.item() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Hand-checked tables (S = 6 tokens)
# --------------------------------------------------------------------------------------------

TOP1 = [[2, 0, 0], [0, 2, 0], [1, 0, 0], [3, 0, 0], [0, 0, 2], [1, 0, 0]]


def test_top1_table_by_hand():
    logits = torch.tensor(TOP1, dtype=torch.float32)
    r = _route(logits, 1, cf=1.0)  # capacity = ceil(6 / 3 * 1.0) = 2
    assert r.capacity == 2
    assert r.expert.tolist() == [[0], [1], [0], [0], [2], [0]]
    # expert 0 gets tokens 0, 2, 3, 5: the first two keep slots 0 and 1, tokens 3 and 5 are dropped
    assert r.slot.tolist() == [[0], [0], [1], [-1], [0], [-1]]
    assert r.counts.tolist() == [2, 1, 1]
    _check_weights(r, [[_p(TOP1[0], 0)], [_p(TOP1[1], 1)], [_p(TOP1[2], 0)], [0.0], [_p(TOP1[4], 2)], [0.0]])
    _check_aux(r, TOP1, [0, 1, 0, 0, 2, 0], 3)


def test_top1_dropless_by_hand():
    logits = torch.tensor(TOP1, dtype=torch.float32)
    r = _route(logits, 1, cf=1.0, mc=5, drop=False)  # capacity = largest load (4), min_capacity ignored
    assert r.capacity == 4
    assert r.slot.tolist() == [[0], [0], [1], [2], [0], [3]]
    assert r.counts.tolist() == [4, 1, 1]
    _check_weights(r, [[_p(row, e)] for row, e in zip(TOP1, [0, 1, 0, 0, 2, 0])])


def test_top1_unit_weight_has_value_one_and_gradient():
    logits = torch.tensor(TOP1, dtype=torch.float32, requires_grad=True)
    r = _route(logits, 1, cf=1.0, unit_top1=True)
    assert r.weight.detach().squeeze(1).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    (g,) = torch.autograd.grad(r.weight.sum(), logits)
    assert g[0].abs().sum() > 0 and g[3].abs().sum() == 0  # kept tokens get a gradient, dropped not


TOP2 = [[3, 2, 0], [3, 0, 2], [2, 3, 0], [3, 2, 0], [3, 0, 2], [3, 2, 0]]


def test_top2_table_by_hand():
    logits = torch.tensor(TOP2, dtype=torch.float32)
    r = _route(logits, 2, cf=1.0)  # capacity = ceil(6 / 3 * 2.0) = 4
    assert r.capacity == 4
    assert r.expert.tolist() == [[0, 1], [0, 2], [1, 0], [0, 1], [0, 2], [0, 1]]
    # first choices: expert 0 <- tokens 0, 1, 3, 4, 5 (token 5 is 5th: dropped), expert 1 <- token 2.
    # second choices start after ALL first choices of the expert, counted before dropping:
    # expert 1 <- tokens 0, 3, 5 at 1, 2, 3; expert 2 <- tokens 1, 4 at 0, 1; expert 0 <- token 2 at 5 (dropped)
    assert r.slot.tolist() == [[0, 1], [1, 0], [0, -1], [2, 2], [3, 1], [-1, 3]]
    assert r.counts.tolist() == [4, 4, 2]
    a, b = math.exp(3), math.exp(2)
    ab = [a / (a + b), b / (a + b)]
    _check_weights(r, [ab, ab, [1.0, 0.0], ab, ab, [0.0, 1.0]])
    _check_aux(r, TOP2, [0, 0, 1, 0, 0, 0], 3)  # top-2 l_aux uses the first choices only


def test_top2_dropless_by_hand():
    r = _route(torch.tensor(TOP2, dtype=torch.float32), 2, mc=4, drop=False)
    # loads over both choices: expert 0 = 5 first + 1 second = 6, expert 1 = 1 + 3, expert 2 = 0 + 2
    assert r.capacity == 6
    assert r.slot.tolist() == [[0, 1], [1, 0], [0, 5], [2, 2], [3, 1], [4, 3]]
    assert r.counts.tolist() == [6, 4, 2]
    a, b = math.exp(3), math.exp(2)
    _check_weights(r, [[a / (a + b), b / (a + b)]] * 6)


TOP3 = [[3, 2, 1, 0]] * 4 + [[0, 3, 2, 1]] * 2


def test_top3_table_by_hand():
    logits = torch.tensor(TOP3, dtype=torch.float32)
    r = _route(logits, 3, cf=0.5)  # capacity = ceil(6 / 4 * (0.5 * 3)) = ceil(2.25) = 3
    assert r.capacity == 3
    assert r.expert.tolist() == [[0, 1, 2]] * 4 + [[1, 2, 3]] * 2
    # token order over all choices: experts 0, 1, 2 fill up with tokens 0-2; token 3 loses all
    # three choices; tokens 4, 5 keep only expert 3
    assert r.slot.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [-1, -1, -1], [-1, -1, 0], [-1, -1, 1]]
    assert r.counts.tolist() == [3, 3, 3, 2]
    a, b, c = math.exp(3), math.exp(2), math.exp(1)
    abc = [a / (a + b + c), b / (a + b + c), c / (a + b + c)]
    _check_weights(r, [abc] * 3 + [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # top-k l_aux: E * sum(me * ce) / k with ce over all k choices
    me = [sum(_p(row, e) for row in TOP3) / 6 for e in range(4)]
    ce = [4 / 6, 1.0, 1.0, 2 / 6]
    assert r.aux_loss.item() == pytest.approx(4 * sum(m * x for m, x in zip(me, ce)) / 3, rel=1e-6)
    rd = _route(logits, 3, drop=False)
    assert rd.capacity == 6 and rd.slot[:, 1].tolist() == [0, 1, 2, 3, 4, 5]


def test_ties_go_to_the_lowest_expert_and_first_tokens_survive():
    logits = torch.zeros(6, 3)  # every probability ties
    r = _route(logits, 1, cf=1.0)
    assert r.expert.squeeze(1).tolist() == [0] * 6
    assert r.slot.squeeze(1).tolist() == [0, 1, -1, -1, -1, -1]
    r3 = _route(logits, 3, cf=1.0)
    assert r3.expert.tolist() == [[0, 1, 2]] * 6  # not torch.topk's unspecified tie order


def test_expert_capacity_is_evaluated_in_float32():
    # float64: 10 / 3 * 3.3000000000000003 = 11.000000000000002 -> 12; DeepSpeed (float32) gets 11
    assert expert_capacity(10, 3, 3, 1.1, 0) == 11
    assert expert_capacity(20, 6, 3, 1.1, 0) == 11
    assert expert_capacity(6, 3, 1, 1.0, 4) == 4  # min_capacity
    assert expert_capacity(4096, 64, 2, 1.25, 4) == 160


def test_expert_capacity_matches_deepspeed(ds):
    class Shape:  # DeepSpeed's _capacity only reads gates.shape
        def __init__(self, S, E):
            self.shape = (S, E)

    g = torch.Generator().manual_seed(0)
    factors = [0.5, 1.0, 1.1, 1.2, 1.25, 1.3, 2.0] + torch.rand(8, generator=g).mul(3).add(0.05).tolist()
    for S in list(range(1, 120, 7)) + torch.randint(1, 100_000, (15,), generator=g).tolist():
        for E in (1, 3, 6, 7, 64, 100):
            for cf in factors:
                for k in (1, 2, 3):
                    want = int(ds._capacity(Shape(S, E), torch.tensor(cf * k), torch.tensor(2)))
                    assert expert_capacity(S, E, k, cf, 2) == want, (S, E, cf, k)


# --------------------------------------------------------------------------------------------
# Exactness against DeepSpeed
# --------------------------------------------------------------------------------------------


def _ds_sparse(ds, logits, k, cf, mc, drop):
    """DeepSpeed's routes: (l_aux, capacity, expert or -1 [S, k], location [S, k], gate [S, k])."""
    lg = logits.clone()
    if k == 1:
        out = ds.top1gating(lg, cf, mc, drop_tokens=drop, use_rts=False, sparse_routes=True)
    elif k == 2:
        out = ds.top2gating(lg, cf, mc, drop_tokens=drop, top2_2nd_expert_sampling=False, sparse_routes=True)
    else:
        out = ds.topkgating(lg, k, cf, mc, drop_tokens=drop, drop_policy="position", sparse_routes=True)
    l_aux, cap, _, idx, loc, gates, _ = out
    return l_aux, int(cap), idx.long().t(), loc.long().t(), gates.t()


def _ours_exact(logits, k, cf, mc, drop, keep="topk"):
    """The torch path; top1_keep="topk" picks DeepSpeed's survivors of overfull top-1 experts."""
    probs = F.softmax(logits, dim=1)
    e, s, c, n = R._special_table(logits.detach(), k, cf, mc, drop, False, None, probs=probs.detach(),
                                  top1_keep=keep)
    return e, s, c, n, R._combine_weights(probs, e, s, k, False), R._aux_loss(probs, e, k)


def _random_logits(g, S, E, k, kind):
    if kind == "ties":  # many exact ties: argmax semantics (first index, probs vs logits) matter
        return torch.randint(0, 3, (S, E), generator=g).float()
    if k > 2:  # distinct logits: torch.topk's tie order is unspecified
        return (torch.randperm(S * E, generator=g).float() / (S * E) * 8 - 4).view(S, E)
    return torch.randn(S, E, generator=g)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_tables_match_deepspeed_bit_for_bit(ds, k):
    g = torch.Generator().manual_seed(100 + k)
    cases = 0
    for _ in range(25):
        S = int(torch.randint(4, 160, (1,), generator=g))
        E = int(torch.randint(max(k, 2), 17, (1,), generator=g))
        for cf in (0.5, 1.0, 1.25):
            for drop in (True, False):
                for kind in ("randn", "ties") if k <= 2 else ("randn",):
                    logits = _random_logits(g, S, E, k, kind)
                    mc = int(torch.randint(0, 5, (1,), generator=g))
                    l_aux, cap, idx, loc, gates = _ds_sparse(ds, logits, k, cf, mc, drop)
                    e, s, c, n, w, aux = _ours_exact(logits, k, cf, mc, drop)
                    kept = s >= 0
                    assert c == cap
                    assert torch.equal(torch.where(kept, e, -1), idx)
                    assert torch.equal(s.clamp(min=0), loc)
                    assert torch.equal(w, gates)
                    assert torch.equal(aux, l_aux)
                    assert torch.equal(n, torch.bincount(e[kept], minlength=E))
                    cases += 1
    assert cases >= 150


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dense_combine_weights_match_deepspeed(ds, k):
    """DeepSpeed's einsum-path outputs (combine_weights [S, E, C], dispatch_mask) from our table."""
    g = torch.Generator().manual_seed(7)
    for drop in (True, False):
        S, E = 40, 5
        logits = _random_logits(g, S, E, k, "randn")
        lg = logits.clone()
        if k == 1:
            l_aux, cw, mask, _ = ds.top1gating(lg, 1.0, 2, drop_tokens=drop, use_rts=False)
        elif k == 2:
            l_aux, cw, mask, _ = ds.top2gating(lg, 1.0, 2, drop_tokens=drop, top2_2nd_expert_sampling=False)
        else:
            l_aux, cw, mask, _ = ds.topkgating(lg, k, 1.0, 2, drop_tokens=drop, drop_policy="position")
        e, s, c, n, w, aux = _ours_exact(logits, k, 1.0, 2, drop)
        ours = torch.zeros(S, E, c)
        kept = s >= 0
        tok = torch.arange(S)[:, None].expand_as(s)
        ours[tok[kept], e[kept], s[kept]] = w[kept]
        assert torch.equal(ours, cw)
        assert torch.equal(ours.bool(), mask)
        assert torch.equal(aux, l_aux)


def test_top1_default_differs_from_deepspeed_only_in_which_overflow_tokens_survive(ds):
    g = torch.Generator().manual_seed(3)
    overflowed = 0
    for _ in range(20):
        S, E = int(torch.randint(20, 200, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        logits = torch.randn(S, E, generator=g)
        l_aux, cap, idx, loc, gates = _ds_sparse(ds, logits, 1, 1.0, 0, True)
        r = _route(logits, 1, cf=1.0)
        assert r.capacity == cap and torch.equal(r.aux_loss, l_aux)
        loads = torch.bincount(r.expert[:, 0], minlength=E)
        assert torch.equal(r.counts, loads.clamp(max=cap))
        assert torch.equal(torch.bincount(idx[idx >= 0], minlength=E), r.counts)  # as many survive
        both = (r.slot >= 0) & (idx >= 0)
        assert torch.equal(r.weight[both], gates[both])
        if bool((loads <= cap).all()):
            assert torch.equal(r.slot, loc.masked_fill(idx < 0, -1))
        else:
            overflowed += 1
            # ours: the first `cap` tokens of every expert, slots in token order
            first = rank_within_groups(r.expert[:, 0], E) < cap
            assert torch.equal(r.slot[:, 0] >= 0, first)
    assert overflowed > 0


def test_tie_survivors_like_deepspeed_on_request(ds):
    logits = torch.zeros(6, 3)
    l_aux, cap, idx, loc, gates = _ds_sparse(ds, logits, 1, 1.0, 0, True)
    e, s, c, n, w, aux = _ours_exact(logits, 1, 1.0, 0, True, keep="topk")
    assert torch.equal(torch.where(s >= 0, e, -1), idx) and torch.equal(s.clamp(min=0), loc)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_gradients_match_deepspeed(ds, k):
    g = torch.Generator().manual_seed(11)
    S, E = 64, 6
    base = _random_logits(g, S, E, k, "randn")
    probe = torch.randn(S, k, generator=g)
    a = base.clone().requires_grad_(True)
    l_aux, _, idx, _, gates = _ds_sparse(ds, a, k, 1.0, 0, True)
    (ga,) = torch.autograd.grad((gates * probe).sum() + l_aux, a)
    b = base.clone().requires_grad_(True)
    e, s, c, n, w, aux = _ours_exact(b, k, 1.0, 0, True)  # top-1: DeepSpeed's survivors
    (gb,) = torch.autograd.grad((w * probe).sum() + aux, b)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    r = _route(base.clone().requires_grad_(True), k, cf=1.0)  # the public path has a gradient too
    assert r.weight.requires_grad and r.aux_loss.requires_grad


def test_dispatch_combine_match_deepspeed_einsum(ds):
    g = torch.Generator().manual_seed(5)
    S, E, d = 50, 4, 8
    for k in (1, 2):
        logits = torch.randn(S, E, generator=g)
        x = torch.randn(S, d, generator=g)
        lg = logits.clone()
        if k == 1:
            _, cw, mask, _ = ds.top1gating(lg, 1.0, 0, drop_tokens=True, use_rts=False)
        else:
            _, cw, mask, _ = ds.top2gating(lg, 1.0, 0, drop_tokens=True, top2_2nd_expert_sampling=False)
        e, s, c, n, w, aux = _ours_exact(logits, k, 1.0, 0, True)
        r = Routing(e, s, w, c, n, aux)
        buf = dispatch(x, r, E, impl="torch")
        torch.testing.assert_close(buf, torch.einsum("sec,sm->ecm", mask.float(), x))
        y = torch.tanh(buf) + 1  # empty slots produce non-zero outputs too
        torch.testing.assert_close(combine(y, r, impl="torch"), torch.einsum("sec,ecm->sm", cw, y))


# --------------------------------------------------------------------------------------------
# The torch dispatch / combine path
# --------------------------------------------------------------------------------------------


def _naive(x, r, E):
    S, d = x.shape
    buf = torch.zeros(E, r.capacity, d, dtype=x.dtype)
    for s in range(S):
        for j in range(r.slot.shape[1]):
            if r.slot[s, j] >= 0:
                buf[r.expert[s, j], r.slot[s, j]] = x[s]
    y = buf * 2 + 1
    out = torch.zeros(S, d, dtype=x.dtype)
    for s in range(S):
        for j in range(r.slot.shape[1]):
            if r.slot[s, j] >= 0:
                out[s] += r.weight[s, j].to(x.dtype) * y[r.expert[s, j], r.slot[s, j]]
    return buf, y, out


@pytest.mark.parametrize("k,drop", [(1, True), (2, True), (3, False), (2, False)])
def test_dispatch_combine_against_loops(k, drop):
    g = torch.Generator().manual_seed(k)
    S, E, d = 37, 5, 6
    logits = torch.randn(S, E, generator=g)
    logits[:, 0] += 1.5  # crowd expert 0 so tokens drop
    r = _route(logits, k, cf=0.8, drop=drop)
    assert drop == bool((r.slot < 0).any())
    x = torch.randn(S, d, generator=g)
    buf, y, out = _naive(x, r, E)
    assert torch.equal(dispatch(x, r, E, impl="torch"), buf)
    torch.testing.assert_close(combine(y, r, impl="torch"), out)


def test_dispatch_combine_gradcheck():
    g = torch.Generator().manual_seed(0)
    S, E, d, k = 9, 3, 4, 2
    r = _route(torch.randn(S, E, generator=g), k, cf=0.5)  # capacity 3: some choices dropped
    assert (r.slot < 0).any()
    x = torch.randn(S, d, dtype=torch.double, requires_grad=True, generator=g)
    w = r.weight.detach().double().requires_grad_(True)
    y = torch.randn(E, r.capacity, d, dtype=torch.double, requires_grad=True, generator=g)
    torch.autograd.gradcheck(lambda t: dispatch(t, r, E, impl="torch"), (x,))
    torch.autograd.gradcheck(lambda t, ww: combine(t, r._replace(weight=ww), impl="torch"), (y, w))


def test_empty_inputs():
    r = _route(torch.zeros(0, 4), 2, drop=False)
    assert r.capacity == 0 and r.expert.shape == (0, 2) and r.counts.tolist() == [0] * 4
    assert dispatch(torch.zeros(0, 3), r, 4, impl="torch").shape == (4, 0, 3)
    assert combine(torch.zeros(4, 0, 3), r, impl="torch").shape == (0, 3)


# --------------------------------------------------------------------------------------------
# RTS, noisy gating, ep_group
# --------------------------------------------------------------------------------------------


def _check_valid(r: Routing, E: int):
    kept = r.slot >= 0
    assert bool((r.slot < r.capacity).all())
    assert torch.equal(r.counts, torch.bincount(r.expert[kept], minlength=E))
    assert bool((r.counts <= r.capacity).all())
    rows = (r.expert * r.capacity + r.slot)[kept]
    assert rows.unique().numel() == rows.numel()  # slots unique per expert
    assert bool((r.weight[~kept] == 0).all())


def test_rts_keeps_a_random_subset_with_token_order_slots():
    torch.manual_seed(0)
    S, E = 64, 4
    logits = torch.randn(S, E)
    logits[:, 1] += 3  # expert 1 overflows
    r = _route(logits, 1, cf=1.0, use_rts=True)
    _check_valid(r, E)
    loads = torch.bincount(r.expert[:, 0], minlength=E)
    assert torch.equal(r.counts, loads.clamp(max=r.capacity))
    kept1 = (r.expert[:, 0] == 1) & (r.slot[:, 0] >= 0)
    assert r.slot[kept1, 0].tolist() == list(range(int(kept1.sum())))  # survivors in token order
    first = rank_within_groups(r.expert[:, 0], E) < r.capacity
    assert not torch.equal(r.slot[:, 0] >= 0, first)  # not simply the first tokens
    # DeepSpeed has no RTS for top-2: the flag changes nothing there
    assert torch.equal(_route(logits, 2, cf=1.0, use_rts=True).slot, _route(logits, 2, cf=1.0).slot)


def test_rsample_noise_changes_choices_and_keeps_valid_tables():
    torch.manual_seed(0)
    S, E = 200, 8
    logits = torch.randn(S, E) * 0.1
    r = _route(logits, 1, cf=1.0, noisy_gate="rsample")
    _check_valid(r, E)
    assert not torch.equal(r.expert, logits.argmax(1, keepdim=True))
    kept = r.slot >= 0
    p = F.softmax(logits, 1).gather(1, r.expert)
    assert torch.equal(r.weight[kept], p[kept])  # weight: the un-noised probability of the pick
    r2 = _route(logits, 2, cf=1.0, noisy_gate="rsample")  # no effect beyond top-1, like DeepSpeed
    assert torch.equal(r2.expert, _route(logits, 2, cf=1.0).expert)
    with pytest.raises(ValueError):
        _route(logits, 1, noisy_gate="jitter")


def test_dropless_capacity_is_the_local_largest_load():
    # distributed dropless layers send exactly the routed rows, so no capacity is agreed between ranks
    logits = torch.tensor(TOP1, dtype=torch.float32)
    r = _route(logits, 1, drop=False)
    assert r.capacity == 4 and r.counts.tolist() == [4, 1, 1] and bool((r.slot >= 0).all())
