"""`moefx launch`: the CLI wrapping moefx.runtime.launch around python -m moefx.runtime.run_model."""
from __future__ import annotations

import subprocess
import sys

import pytest

from moefx.cli import main
from moefx.runtime.launch import free_port
from moefx.runtime.run_model import build_parser, worker_argv

MOE = """
[moe]
experts = [4, 8]
every = 2
top_k = 1
residual = true
drop_tokens = false
"""


def _plan(tmp_path, name: str, parallel: str) -> str:
    path = tmp_path / name
    path.write_text(MOE + "\n[parallel]\n" + parallel)
    return str(path)


def _moefx(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moefx.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_worker_argv_round_trips_through_the_worker_parser():
    argv = worker_argv("gpt2-tiny", "p.toml", check=True, steps=2, batch=4, extra=["--fail-rank", "1"])
    assert argv[:3] == ["-m", "moefx.runtime.run_model", "gpt2-tiny"]
    args = build_parser().parse_args(argv[2:])
    assert (args.model, args.plan, args.check, args.compile, args.steps, args.batch, args.seq, args.fail_rank) == \
        ("gpt2-tiny", "p.toml", True, False, 2, 4, 8, 1)


def test_launch_refuses_a_plan_of_another_world_size(tmp_path, capsys):
    plan = _plan(tmp_path, "ep4.toml", "nodes = 1\ndevices_per_node = 4\nep = 4\n")
    assert main(["launch", "--nproc-per-node", "2", "--plan", plan, "gpt2-tiny"]) == 2
    err = capsys.readouterr().err
    assert "nodes * devices_per_node = 1 * 4 = 4 ranks" in err and "nnodes * nproc_per_node = 1 * 2 = 2" in err
    plan = _plan(tmp_path, "two.toml", "nodes = 2\ndevices_per_node = 1\nep = 2\n")
    assert main(["launch", "--nnodes", "2", "--plan", plan, "gpt2-tiny"]) == 2
    assert "master_port" in capsys.readouterr().err


@pytest.mark.dist
def test_launch_check_ep2(tmp_path):
    plan = _plan(tmp_path, "ep2.toml", "nodes = 1\ndevices_per_node = 2\nep = 2\n")
    r = _moefx("launch", "--nproc-per-node", "2", "--plan", plan, "gpt2-tiny", "--check", "--timeout", "100")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}/2: ok max|diff|=" in r.stdout
    assert "moefx launch: 2 rank(s) ok" in r.stdout


@pytest.mark.dist
def test_launch_fails_fast_naming_the_rank(tmp_path):
    plan = _plan(tmp_path, "ep2.toml", "nodes = 1\ndevices_per_node = 2\nep = 2\n")
    r = _moefx("launch", "--nproc-per-node", "2", "--plan", plan, "nanogpt-tiny", "--check", "--fail-rank", "1",
               "--timeout", "100")
    assert r.returncode != 0 and r.returncode != 124   # rank 0 waits in an all-to-all: torchrun must stop it
    assert "moefx: rank 1 failed: RuntimeError: --fail-rank 1" in r.stdout
    assert "moefx launch: FAILED" in r.stderr and "rank 1 failed: RuntimeError" in r.stderr
    assert "rank 0/2: ok" not in r.stdout


@pytest.mark.dist
def test_two_nodes_on_one_host_train_and_check(tmp_path):
    plan = _plan(tmp_path, "nodes2.toml", "nodes = 2\ndevices_per_node = 1\nep = 2\n")
    port = str(free_port())
    common = ["launch", "--nnodes", "2", "--nproc-per-node", "1", "--master-port", port, "--plan", plan,
              "nanogpt-tiny", "--check", "--steps", "2", "--timeout", "100"]
    procs = [subprocess.Popen([sys.executable, "-m", "moefx.cli", *common, "--node-rank", str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for n, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert f"rank {n}/2: ok max|diff|=" in out and "2 training steps" in out
        assert f"moefx launch: node {n}/2: 1 rank(s) ok" in out
