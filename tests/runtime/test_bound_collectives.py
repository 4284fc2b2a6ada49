"""The bound all-to-all pair on 2 gloo ranks: the forward issues at the start and waits at the wait; the
backward issues the gradient's reverse trip at the wait's backward and waits at the start's, so
the backward of what ran between them runs while the gradient is in flight; the gradients equal
torch's all_to_all_single formula."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_world  # noqa: E402

pytestmark = pytest.mark.dist


class _Mark(torch.autograd.Function):
    """Identity that logs its backward (stands for the residual MLP between issue and wait)."""

    log: list = []

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        _Mark.log.append("mlp backward")
        return g


def _check(rank, world):
    import torch.distributed as dist

    from moefx.nn import bound_collectives as B

    pg = dist.group.WORLD.group_name
    real = B._C10D
    log = _Mark.log

    class Recording:                     # torch's functional ops, each call logged
        def all_to_all_single(self, *a):
            log.append("issue")
            return real.all_to_all_single(*a)

        def wait_tensor(self, t):
            log.append("wait")
            return real.wait_tensor(t)

    # uneven: rank 0 sends 1 row to itself and 3 to rank 1, rank 1 sends 2 and keeps 2
    out_splits, in_splits = ([1, 2], [1, 3]) if rank == 0 else ([3, 2], [2, 2])
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(sum(in_splits), 3, generator=g, requires_grad=True)
    z = torch.randn(5, generator=g, requires_grad=True)
    w = torch.randn(sum(out_splits), 3, generator=g)
    B._C10D = Recording()
    try:
        t = B.all_to_all_start(x, out_splits, in_splits, pg)
        m = _Mark.apply(z)
        y = B.all_to_all_wait(t, out_splits, in_splits, pg)
        assert log == ["issue", "wait"]
        log.clear()
        ((y * w).sum() + m.sum()).backward()
    finally:
        B._C10D = real
    # the wait's backward issues, the MLP's backward runs, the start's backward waits
    assert log == ["issue", "mlp backward", "wait"], log
    # the same numbers as torch's own formula
    x2 = x.detach().clone().requires_grad_(True)
    y2 = real.wait_tensor(real.all_to_all_single(x2, out_splits, in_splits, pg))
    (y2 * w).sum().backward()
    assert torch.equal(y.detach(), y2.detach())
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(z.grad, torch.ones(5))


def test_the_backward_of_an_issued_all_to_all_overlaps_too():
    run_world(_check, 2, timeout=120)
