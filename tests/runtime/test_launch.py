"""torchrun launching: argv, happy path, fail-fast with a readable message, two nodes on one host."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moefx.errors import MoefxError
from moefx.runtime.launch import LaunchFailed, free_port, launch, start, torchrun_argv
from moefx.dist.worker import init_from_env

HERE = Path(__file__).resolve().parent
OK, FAIL = str(HERE / "_worker_ok.py"), str(HERE / "_worker_fail.py")


def test_torchrun_argv_static_and_module():
    argv = torchrun_argv(["w.py", "--x", "1"], nnodes=2, nproc_per_node=4, node_rank=1, master_port=1234)
    assert argv[:4] == ["--nnodes=2", "--nproc-per-node=4", "--max-restarts=0", "--monitor-interval=0.1"]
    assert "--node-rank=1" in argv and "--master-addr=127.0.0.1" in argv and "--master-port=1234" in argv
    assert argv[-3:] == ["w.py", "--x", "1"]
    argv = torchrun_argv(["-m", "pkg.main", "a"], rdzv_backend="c10d", master_port=99, rdzv_id="job")
    assert "--rdzv-endpoint=127.0.0.1:99" in argv and "--rdzv-id=job" in argv and "--node-rank=0" not in argv
    assert argv[-3:] == ["--module", "pkg.main", "a"]
    with pytest.raises(ValueError, match="node_rank"):
        torchrun_argv(["w.py"], nnodes=2, node_rank=2)
    with pytest.raises(ValueError, match="master_port"):
        start(["w.py"], nnodes=2)


def test_init_from_env_outside_torchrun(monkeypatch):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(MoefxError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        init_from_env()


@pytest.mark.dist
def test_launch_all_reduce():
    r = launch([OK], nproc_per_node=2, timeout=60).check()
    assert "rank 0/2 node 0 all_reduce 1" in r.output and "rank 1/2 node 0 all_reduce 1" in r.output
    assert r.failures == {} and r.summary().startswith("ok")


@pytest.mark.dist
def test_launch_fails_fast_and_names_the_rank():
    r = launch([FAIL], nproc_per_node=2, timeout=60)
    assert r.returncode != 0 and not r.timed_out      # torchrun stopped rank 0, which waited for rank 1
    assert "moefx: rank 1 failed: ValueError: boom from the test worker" in r.output
    assert r.failures == {1: "ValueError: boom from the test worker"}   # rank 0 only "aborted"
    assert r.root_cause_rank == 1
    assert "all_reduce returned" not in r.output
    with pytest.raises(LaunchFailed, match="rank 1 failed: ValueError: boom"):
        r.check()


@pytest.mark.dist
def test_two_nodes_on_one_host():
    port = free_port()
    a = start([OK], nnodes=2, nproc_per_node=1, node_rank=0, master_port=port)
    b = start([OK], nnodes=2, nproc_per_node=1, node_rank=1, master_port=port)
    ra, rb = a.wait(60).check(), b.wait(60).check()
    assert "rank 0/2 node 0 all_reduce 1" in ra.output
    assert "rank 1/2 node 1 all_reduce 1" in rb.output


@pytest.mark.dist
def test_two_nodes_failure_stops_both():
    port = free_port()
    a = start([FAIL], nnodes=2, nproc_per_node=1, node_rank=0, master_port=port)
    b = start([FAIL], nnodes=2, nproc_per_node=1, node_rank=1, master_port=port)
    ra, rb = a.wait(60), b.wait(60)
    assert rb.failures == {1: "ValueError: boom from the test worker"}
    assert ra.returncode != 0 and rb.returncode != 0
    assert not (ra.timed_out or rb.timed_out)
    assert "moefx: rank 0 aborted after a peer failed" in ra.output


@pytest.mark.dist
def test_timeout_kills_the_whole_launch():
    from moefx.runtime.launch import _descendants
    h = start([OK, "--sleep", "60"], nproc_per_node=2)
    tree, deadline = [], time.monotonic() + 30        # a loaded machine takes a while to start both workers
    while len(tree) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        tree = _descendants(h.proc.pid)               # agent's workers (own sessions) and helpers
    assert len(tree) >= 2, f"torchrun did not start its two workers in 30 s: {tree}"
    r = h.wait(timeout=3)
    assert r.timed_out and r.returncode != 0
    deadline = time.monotonic() + 5                   # SIGKILL is immediate; reaping by init is not
    while [pid for pid in [h.proc.pid] + tree if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in [h.proc.pid] + tree if _alive(pid)]   # nothing of the launch survives


def _alive(pid: int) -> bool:
    """Running (a killed child not yet reaped by its new parent is a zombie: 'Z', not alive)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.dist
def test_a_busy_master_port_is_named_and_no_temporary_folder_is_left(tmp_path, monkeypatch):
    import socket
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))          # where the launches' folders go
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = launch([OK], nproc_per_node=2, master_port=busy.getsockname()[1], timeout=60)
    assert r.returncode != 0 and not r.failures
    assert "torchrun failed before any worker ran" in r.summary() and "EADDRINUSE" in r.summary()
    assert "the --master-port is taken" in r.summary()
    assert launch([OK], nproc_per_node=2, timeout=60).ok
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("moefx-launch-")]   # neither left one
    r = launch([FAIL], nproc_per_node=2, timeout=60)                  # a failure with logs keeps them, and says where
    assert r.log_dir and os.path.isdir(r.log_dir) and f"per-rank logs in {r.log_dir}" in r.summary()
