"""Ranks hold only their shards: a model several times what one rank may use launches on 4 ranks,
and each rank's peak resident memory stays below its tensors plus a margin measured on the same
job with a tiny model. The test watches its own processes and stops them before the machine runs
out of memory."""
from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import pytest

import moefx
from moefx.runtime.launch import _descendants, start

HERE = Path(__file__).resolve().parent
PLAN = "[moe]\nexperts = 64\nevery = 1\ntop_k = 1\ndrop_tokens = false\n[parallel]\nnodes = 1\ndevices_per_node = 4\n" \
       "ep = 4\n"
LIMIT_MB = 12_000       # the whole launch; the machine has 24 GB
WORKING_MB = 256        # one layer's working memory on top of the tensors (a [16, 512, 2048] stack being built)
LINE = re.compile(r"rank (\d)/4: ok .* peak RSS (\d+) MB, tensors ([\d.]+) MB")


def _rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    return total / 2**20


def _launch(model: str, plan: str, *extra: str) -> dict[int, tuple[float, float]]:
    """rank -> (peak RSS MB, tensor MB) of a 4-rank forward job, killed if the launch nears LIMIT_MB."""
    h = start(["-m", "moefx.runtime.run_model", model, "--plan", plan, "--iters", "1", *extra], nproc_per_node=4,
              cwd=str(HERE.parents[1]))
    peak = 0.0
    while h.proc.poll() is None:
        used = _rss_mb([h.proc.pid] + _descendants(h.proc.pid))
        peak = max(peak, used)
        if used > LIMIT_MB:
            h.kill()
            pytest.fail(f"the launch of {model} used {used:.0f} MB (> {LIMIT_MB}): ranks hold more than their shards")
        time.sleep(0.2)
    r = h.wait(60)
    assert r.ok, r.summary() + "\n" + r.output[-3000:]
    found = {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in LINE.finditer(r.output)}
    assert sorted(found) == [0, 1, 2, 3], r.output[-2000:]
    return found


@pytest.mark.dist
@pytest.mark.slow
def test_four_ranks_hold_only_their_shards(tmp_path):
    plan = tmp_path / "ep4.toml"
    plan.write_text(PLAN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sys
        sys.path.insert(0, str(HERE))
        from _big_model import build

        model, inputs = build()
        full_mb = moefx.count_params(moefx.convert(model, moefx.Plan.from_file(plan), inputs)).total * 4 / 2**20
        del model
    base = _launch("nanogpt-tiny", str(plan))
    big = _launch("tests.runtime._big_model:build", str(plan), "--init", "seeded")
    for rank in range(4):
        (rss0, _), (rss, tensors) = base[rank], big[rank]
        assert full_mb > 3 * tensors, f"rank {rank} holds {tensors:.0f} MB of a {full_mb:.0f} MB model"
        assert rss - rss0 <= tensors + WORKING_MB, (f"rank {rank}: peak RSS {rss:.0f} MB vs {rss0:.0f} MB for the tiny "
                                                    f"model: {rss - rss0:.0f} MB more for {tensors:.0f} MB of tensors")
