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
    argv = worker_argv("gpt2-tiny", "p.toml", check=True, batch=4, extra=["--fail-rank", "1", "--iters", "2"])
    assert argv[:3] == ["-m", "moefx.runtime.run_model", "gpt2-tiny"]
    args = build_parser().parse_args(argv[2:])
    assert (args.model, args.plan, args.check, args.compile, args.iters, args.batch, args.seq, args.fail_rank) == \
        ("gpt2-tiny", "p.toml", True, False, 2, 4, 8, 1)


def test_launch_refuses_a_plan_of_another_world_size(tmp_path, capsys):
    plan = _plan(tmp_path, "ep4.toml", "nodes = 1\ndevices_per_node = 4\nep = 4\n")
    assert main(["launch", "--nproc-per-node", "2", "--plan", plan, "gpt2-tiny"]) == 2
    err = capsys.readouterr().err
    assert "nodes * devices_per_node = 1 * 4 = 4 ranks" in err and "nnodes * nproc_per_node = 1 * 2 = 2" in err
    plan = _plan(tmp_path, "two.toml", "nodes = 2\ndevices_per_node = 1\nep = 2\n")
    assert main(["launch", "--nnodes", "2", "--plan", plan, "gpt2-tiny"]) == 2
    assert "master_port" in capsys.readouterr().err


def test_launch_validates_plan_model_and_options_before_starting_workers(tmp_path, capsys, monkeypatch):
    import moefx.runtime.launch as L

    monkeypatch.setattr(L, "start", lambda *a, **k: pytest.fail("a worker was started"))
    plan = _plan(tmp_path, "ep3.toml", "nodes = 1\ndevices_per_node = 3\nep = 3\n")
    assert main(["launch", "--nproc-per-node", "3", "--plan", plan, "gpt2-tiny"]) == 2
    assert "MoE layer 0 has 4 experts, not divisible by its ep = 3" in capsys.readouterr().err
    plan = _plan(tmp_path, "ep2.toml", "nodes = 1\ndevices_per_node = 2\nep = 2\n")
    assert main(["launch", "--nproc-per-node", "2", "--plan", plan, "gpt2-tiny", "--iters", "x"]) == 2
    assert "refuses its options" in capsys.readouterr().err
    assert main(["launch", "--nproc-per-node", "2", "--plan", plan, "no-such-model"]) == 2
    assert "cannot load model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.dist
def test_launch_fails_fast_naming_the_rank(tmp_path):
    plan = _plan(tmp_path, "ep2.toml", "nodes = 1\ndevices_per_node = 2\nep = 2\n")
    r = _moefx("launch", "--nproc-per-node", "2", "--plan", plan, "nanogpt-tiny", "--check", "--fail-rank", "1",
               "--timeout", "100")
    assert r.returncode != 0 and r.returncode != 124   # rank 0 waits in an all-to-all: torchrun must stop it
    assert "moefx: rank 1 failed: RuntimeError: --fail-rank 1" in r.stdout
    assert "moefx launch: FAILED" in r.stderr and "rank 1 failed: RuntimeError" in r.stderr
    assert "rank 0/2: ok" not in r.stdout
    # one line per rank, no tracebacks: those are in the ranks' log files
    assert "Traceback" not in r.stdout + r.stderr and "=====" not in r.stdout + r.stderr
    assert "moefx launch:   rank 1 failed: RuntimeError: --fail-rank 1" in r.stderr


@pytest.mark.dist
def test_two_nodes_on_one_host_check(tmp_path):
    plan = _plan(tmp_path, "nodes2.toml", "nodes = 2\ndevices_per_node = 1\nep = 2\n")
    port = str(free_port())
    common = ["launch", "--nnodes", "2", "--nproc-per-node", "1", "--master-port", port, "--plan", plan,
              "nanogpt-tiny", "--check", "--timeout", "100"]
    procs = [subprocess.Popen([sys.executable, "-m", "moefx.cli", *common, "--node-rank", str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for n, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert f"rank {n}/2: ok max|diff|=" in out
        assert f"moefx launch: node {n}/2: 1 rank(s) ok" in out


@pytest.mark.dist
def test_a_stalled_rank_is_named_not_the_one_that_timed_out(tmp_path):
    plan = _plan(tmp_path, "ep2.toml", "nodes = 1\ndevices_per_node = 2\nep = 2\n")
    r = _moefx("launch", "--nproc-per-node", "2", "--plan", plan, "nanogpt-tiny", "--stall-rank", "1",
               "--collective-timeout", "10", "--timeout", "100")
    assert r.returncode != 0, r.stdout[-2000:]
    assert "rank 1 stopped making progress" in r.stderr, r.stderr[-3000:]
    assert "moefx launch:   rank 0 aborted after a peer failed" in r.stderr


def _launch_tree(pid: int) -> list[int]:
    from moefx.runtime.launch import _descendants

    return [pid] + _descendants(pid)


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.dist
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])   # SIGINT takes the SIGTERM path (forward_signals)
def test_stopping_moefx_launch_leaves_no_process_of_it(tmp_path, sig):
    import signal
    import threading
    import time

    plan = _plan(tmp_path, "ep2.toml", "nodes = 1\ndevices_per_node = 2\nep = 2\n")
    proc = subprocess.Popen([sys.executable, "-m", "moefx.cli", "launch", "--nproc-per-node", "2", "--plan", plan,
                             "nanogpt-tiny", "--stall-rank", "1", "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = []
    reader = threading.Thread(target=lambda: live.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 90
    tree = []
    while time.monotonic() < deadline:             # wait until both workers run
        tree = _launch_tree(proc.pid)
        if len(tree) >= 4:
            break
        time.sleep(0.5)
    assert len(tree) >= 4, f"the launch did not start its workers: {tree}"
    while time.monotonic() < deadline and not any("[moe]" in line for line in live):
        time.sleep(0.25)
    assert any(line.startswith("moefx: plan") for line in live), live   # rank 0's lines show while it runs
    time.sleep(1.0)
    tree = _launch_tree(proc.pid)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    if sig != "SIGKILL":
        assert f"moefx launch: stopped ({sig}); every rank was stopped" in err
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.25)
    assert not [p for p in tree if _alive(p)], "processes of the launch survived"


@pytest.mark.dist
def test_calibrate_on_loopback_writes_a_profile_a_job_accepts(tmp_path):
    """Smoke test: `moefx calibrate` runs on loopback and writes a profile that `--profile` reads back.

    What the profile decides is not checked here: these timings come from a (possibly loaded) shared
    machine. The decision is checked on fixed timings below.
    """
    import dataclasses
    import json
    import math

    from moefx.cost import CostProfile
    from moefx.runtime.run_model import start_job

    out = tmp_path / "profile.json"
    r = _moefx("calibrate", "--nnodes", "1", "--nproc-per-node", "4", "--nodes", "2", "--devices-per-node", "2",
               "-o", str(out), "--reps", "3", "--timeout", "100")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"moefx calibrate: wrote {out}" in r.stdout
    assert sorted(json.loads(out.read_text())) == sorted(f.name for f in dataclasses.fields(CostProfile))
    profile = CostProfile.load(out)
    assert "measured on 2 x 2 ranks (gloo)" in profile.source
    latencies = (profile.launch, profile.alpha_intra, profile.alpha_inter)
    bandwidths = (profile.beta_intra, profile.beta_inter, profile.beta_mem)
    assert all(math.isfinite(v) and v >= 0 for v in latencies), profile
    # the fit clamps each latency term at 0, but launch + alpha_intra is the intra-node small-message time
    assert profile.launch + profile.alpha_intra > 0, profile
    assert all(math.isfinite(v) and v > 0 for v in bandwidths), profile
    # the job's --profile option reads it back, and the decision it feeds can be made
    plan = _plan(tmp_path, "hier.toml", 'nodes = 2\ndevices_per_node = 2\nep = 4\nhierarchical_a2a = "auto"\n')
    job = start_job(build_parser().parse_args(["gpt2-tiny", "--plan", plan, "--profile", str(out)]), distributed=False)
    assert job.profile == profile
    for kib in (1, 256):
        assert 0 < profile.flat_time(kib * 1024, 2, 2) < math.inf
        assert 0 < profile.hierarchical_time(kib * 1024, 2, 2) < math.inf
        assert isinstance(profile.choose_hierarchical(kib * 1024, 2, 2), bool)


LOOPBACK = dict(launch=2e-4, alpha_intra=5e-6, alpha_inter=5e-6, beta_intra=2e9, beta_inter=2e9, beta_mem=5e9)
SLOW_INTER = dict(LOOPBACK, alpha_inter=2e-3, beta_inter=2e8)      # two real nodes on a slow network


def test_hierarchical_decision_flat_on_loopback_and_hierarchical_across_slow_links():
    """The decision a calibrated profile drives, on fixed costs of 2 nodes x 2 ranks: on one host every
    link is loopback (inter-node costs = intra-node costs) and the hierarchical all-to-all's second call
    costs more than it saves at every size; across a slow inter-node link it wins for small and medium
    messages (it saves a slow message per rank) and loses for large ones (it moves and copies the data
    twice)."""
    from moefx.cost import CostProfile

    loopback = CostProfile(**LOOPBACK, source="fixed loopback-like costs")
    for kib in (1, 16, 256, 4096):
        assert not loopback.choose_hierarchical(kib * 1024, 2, 2), (kib, loopback)
    slow = CostProfile(**SLOW_INTER, source="fixed slow inter-node link")
    # hierarchical - flat = launch - alpha_inter + V (1/(4 beta_intra) + 2/beta_mem) < 0 for V < ~3.4 MB
    for kib in (1, 16, 256, 1024):
        assert slow.choose_hierarchical(kib * 1024, 2, 2), (kib, slow)
    for kib in (8192, 65536):
        assert not slow.choose_hierarchical(kib * 1024, 2, 2), (kib, slow)
    assert not slow.choose_hierarchical(1024, 1, 4)       # one node: nothing to save


def _fit(nodes: int, per_node: int, *, launch: float, alpha_intra: float, alpha_inter: float,
         beta_intra: float, beta_inter: float, beta_mem: float):
    """calibrate's fit on fixed timings (what the alpha-beta model gives for these costs) instead of
    timed all-to-alls: no process group, no noise."""
    from moefx.runtime.calibrate import LARGE, SMALL, Timings, fit_profile

    N, G = nodes, per_node
    p = N * G
    sizes = {"world": p, "intra": G, "inter": N}
    peers = {"world": (G - 1, p - G), "intra": (G - 1, 0), "inter": (0, N - 1)}

    def a2a_time(group: str, nbytes: int) -> float:
        q = sizes[group]
        if q == 1:
            return 0.0
        local, remote = peers[group]
        return (launch + local * alpha_intra + remote * alpha_inter
                + nbytes * local / (q * beta_intra) + nbytes * remote / (q * beta_inter))

    timings = Timings(small={g: a2a_time(g, SMALL * q) for g, q in sizes.items()},
                      large={g: a2a_time(g, LARGE) for g in sizes}, copy=LARGE / beta_mem)
    return fit_profile(N, G, timings, "measured on 2 x 2 ranks (fixed)")


def test_calibrate_fit_of_fixed_timings_recovers_the_costs_and_the_decision():
    """measure_profile on fixed timings: the fit gives back the costs the timings were made of, so a
    loopback machine's profile picks flat and a slow inter-node link's picks hierarchical for small
    messages."""
    import math

    for costs, hierarchical in ((LOOPBACK, [False, False]), (SLOW_INTER, [True, False])):
        profile = _fit(2, 2, **costs)
        assert profile.source == "measured on 2 x 2 ranks (fixed)"
        for key, want in costs.items():
            assert math.isclose(getattr(profile, key), want, rel_tol=0.02), (key, want, profile)
        assert [profile.choose_hierarchical(kib * 1024, 2, 2) for kib in (1, 65536)] == hierarchical, profile


@pytest.mark.dist
def test_triton_gating_runs_in_a_launched_job_and_equals_the_pytorch_path(tmp_path, monkeypatch):
    """gating = "triton" on CPU ranks with Triton's interpreter: the rank graphs are lowered for the
    job's device (not for meta, where they are built), every rank launches the kernels, and --check
    compares with a single-process model that gates with PyTorch."""
    plan = tmp_path / "triton.toml"
    plan.write_text(MOE.replace("[4, 8]", "[4, 4]") + "\n[lowering]\ngating = \"triton\"\n"
                    "\n[parallel]\nnodes = 1\ndevices_per_node = 2\nep = 2\n")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    r = _moefx("launch", "--nproc-per-node", "2", "--plan", str(plan), "gpt2-tiny", "--check", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2 and all(" ok max|diff|=" in line for line in lines), r.stdout
    launches = [int(line.split("gating triton (")[1].split()[0]) for line in lines]
    assert all(n > 0 for n in launches), lines


def test_dump_shows_the_lowering_a_cuda_target_gets_without_a_gpu(capsys):
    assert main(["dump", "gpt2-tiny", "--device", "meta", "--target", "cuda", "--format", "json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    impls = {n["impl"] for n in data["nodes"] if n.get("role") == "route"}
    assert impls == {"triton"}
    assert main(["dump", "gpt2-tiny", "--device", "meta", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {n["impl"] for n in data["nodes"] if n.get("role") == "route"} == {"torch"}
