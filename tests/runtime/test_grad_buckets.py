"""GradBuckets: gradients reduced in buckets during backward equal reduce_gradients' after it, on real
gloo ranks (EP x TP x DP, distinct experts, a different batch per replica), and the buckets really
leave during backward."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_world  # noqa: E402

pytestmark = pytest.mark.dist

PLAN = {"moe": {"experts": [4, 8], "every": 2, "top_k": 2, "residual": True, "drop_tokens": False,
                "init_noise": 0.2},
        "parallel": {"nodes": 1, "devices_per_node": 4, "tp": 2, "ep": 2}}


def _check(rank, world):
    import warnings

    import moefx
    from moefx.dist.grads import GradBuckets, reduce_gradients
    from moefx.facts import facts
    from moefx.models import load_model

    warnings.simplefilter("ignore")
    model, _ = load_model("gpt2-tiny")
    plan = moefx.Plan.from_dict(PLAN)
    torch.manual_seed(0)
    local = moefx.distribute(moefx.convert(model, plan, load_model("gpt2-tiny")[1]), plan)
    replica = facts(local).parallel.dp_rank(rank)
    (ids,) = load_model("gpt2-tiny", seed=100 + replica)[1]

    def backward():
        local.zero_grad(set_to_none=True)
        out = local(ids)
        (out.logits.pow(2).mean() + moefx.aux_loss(local)).backward()

    backward()
    reduce_gradients(local)
    want = {n: p.grad.clone() for n, p in local.named_parameters()}

    buckets = GradBuckets(local, bucket_mb=0.02)          # ~20 KB: many buckets on a tiny model
    keys = {(g, d) for g, d, _ in buckets.buckets}
    assert len(buckets.buckets) > len(keys) + 4, (len(buckets.buckets), keys)
    buckets.arm()
    backward()
    assert buckets.next > 0, "no bucket left during backward"
    buckets.finish()
    for n, p in local.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-8, msg=f"rank {rank}: {n}")
    # not armed: backward leaves the gradients alone, as during gradient accumulation
    backward()
    assert buckets.next == 0 and not buckets.launched
    with pytest.raises(RuntimeError, match="without arm"):
        buckets.finish()
    buckets.remove()


def test_bucketed_reduction_during_backward_equals_the_reduction_after_it():
    run_world(_check, 4, timeout=240)
