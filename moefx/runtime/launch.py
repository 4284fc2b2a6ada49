"""Launch per-rank workers with torchrun, and the worker-side helpers.

Launcher side: `launch(["train.py", "--steps", "10"], nnodes=1, nproc_per_node=4)` runs
`python -m torch.distributed.run ... train.py --steps 10` and returns a `LaunchResult` (exit code,
captured output, which ranks failed and why). `start(...)` returns a handle without waiting, so
several "nodes" can be launched from one host (static rendezvous: one launch per node, each with
its `node_rank`, all with the same master address and port)::

    a = start(["w.py"], nnodes=2, nproc_per_node=1, node_rank=0, master_port=29600)
    b = start(["w.py"], nnodes=2, nproc_per_node=1, node_rank=1, master_port=29600)
    ra, rb = a.wait(60), b.wait(60)

Worker side: `init_from_env()` initialises the default process group from torchrun's environment
(gloo on CPU, nccl with CUDA) with a collective timeout; `@worker` wraps the entry function so a
failure prints one readable line, "moefx: rank R failed: ValueError: ...", records the error for
torchrun's summary, and exits non-zero.

Fail-fast: torchrun (max_restarts = 0) stops the remaining workers of a node as soon as one exits
non-zero (SIGTERM, then SIGKILL after its shutdown timeout) and exits non-zero itself. Workers on
other nodes notice at their next collective (gloo: "Connection closed by peer", reported as
"moefx: rank R aborted after a peer failed"; nccl: at the collective timeout of `init_from_env`).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

from ..errors import MoefxError

__all__ = ["torchrun_argv", "launch", "start", "Launch", "LaunchResult", "LaunchFailed", "init_from_env",
           "worker", "free_port"]

_FAILED = re.compile(r"moefx: rank (\d+) failed: (.*)")
_ROOT_RANK = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)", re.S)
# Messages a collective raises on the surviving ranks when a peer dies.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "Socket Timeout", "timed out", "Broken pipe", "NCCL communicator was aborted")


class LaunchFailed(MoefxError, RuntimeError):
    """A launched job exited non-zero (`LaunchResult.check()`)."""


def free_port() -> int:
    """A TCP port free on localhost right now (for single-host launches and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(target_argv: Sequence[str], nnodes: int = 1, nproc_per_node: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", master_port: int = 29500, *, rdzv_backend: str = "static",
                  rdzv_id: str = "moefx", max_restarts: int = 0, monitor_interval: float = 0.1,
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The argument list of `torch.distributed.run` (after the program name).

    target_argv: a script and its arguments, or ["-m", "module", args...].
    rdzv_backend "static": the node with node_rank 0 hosts the store at master_addr:master_port;
    "c10d": dynamic rendezvous at that endpoint (node ranks assigned by torchrun, `rdzv_id` names
    the job).
    """
    target = list(target_argv)
    if not target:
        raise ValueError("launch: target_argv is empty; give a script (and its arguments) or ['-m', module]")
    if nnodes < 1 or nproc_per_node < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"launch: need nnodes >= 1, nproc_per_node >= 1 and 0 <= node_rank < nnodes; got "
                         f"nnodes={nnodes}, nproc_per_node={nproc_per_node}, node_rank={node_rank}")
    argv = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
            f"--monitor-interval={monitor_interval}"]
    if rdzv_backend == "static":
        argv += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    else:
        argv += [f"--rdzv-backend={rdzv_backend}", f"--rdzv-endpoint={master_addr}:{master_port}",
                 f"--rdzv-id={rdzv_id}"]
    argv += list(extra_args)
    if target[0] == "-m":
        if len(target) < 2:
            raise ValueError("launch: target_argv ['-m'] needs a module name")
        argv += ["--module"] + target[1:]
    else:
        argv += target
    return argv


@dataclass
class LaunchResult:
    """What one launch (one node's torchrun) did.

    failures: rank -> message, from the workers' "moefx: rank R failed: ..." lines.
    root_cause_rank: the first failing rank according to torchrun's summary (None if it printed none).
    """

    returncode: int
    output: str
    elapsed: float
    argv: list = field(default_factory=list)
    timed_out: bool = False
    failures: dict = field(default_factory=dict)
    root_cause_rank: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def failed_ranks(self) -> list[int]:
        return sorted(self.failures)

    def summary(self) -> str:
        if self.ok:
            return f"ok in {self.elapsed:.1f}s"
        why = "; ".join(f"rank {r} failed: {m}" for r, m in sorted(self.failures.items())) or \
            (f"rank {self.root_cause_rank} failed first" if self.root_cause_rank is not None else "no worker message")
        return (f"exit code {self.returncode}{' (timed out)' if self.timed_out else ''} after "
                f"{self.elapsed:.1f}s: {why}")

    def check(self) -> "LaunchResult":
        """Raise LaunchFailed with a readable summary (and the output's tail) unless the launch succeeded."""
        if not self.ok:
            tail = "\n".join(self.output.splitlines()[-40:])
            raise LaunchFailed(f"launch {' '.join(self.argv)}: {self.summary()}\n--- output tail ---\n{tail}")
        return self


def _parse(output: str) -> tuple[dict, int | None]:
    failures: dict[int, str] = {}
    for m in _FAILED.finditer(output):
        failures.setdefault(int(m.group(1)), m.group(2).strip())
    root = _ROOT_RANK.search(output)
    return failures, (int(root.group(1)) if root else None)


class Launch:
    """A running torchrun (one node). `wait(timeout)` -> LaunchResult; on timeout the whole process
    group of that torchrun (agent and workers) is killed."""

    def __init__(self, argv: list[str], env: dict, capture: bool, cwd: str | None):
        self.argv = argv
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *argv], env=env, cwd=cwd,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None,
            text=True, start_new_session=True)

    def wait(self, timeout: float | None = None) -> LaunchResult:
        timed_out = False
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            out, _ = self.proc.communicate()
        out = out or ""
        failures, root = _parse(out)
        rc = self.proc.returncode if not timed_out else (self.proc.returncode or -signal.SIGKILL)
        return LaunchResult(returncode=rc, output=out, elapsed=time.monotonic() - self._t0, argv=self.argv,
                            timed_out=timed_out, failures=failures, root_cause_rank=root)

    def kill(self) -> None:
        """SIGKILL this launch: the torchrun agent and every process below it, by id.

        torchrun starts each worker in a session of its own, so killing the agent's process group
        alone would leave the workers running (and holding the output pipe open)."""
        for pid in [self.proc.pid] + _descendants(self.proc.pid):
            try:
                if os.getpgid(pid) == pid:      # a session / group leader: take its group with it
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _descendants(pid: int) -> list[int]:
    """Child, grandchild, ... process ids of `pid` (Linux /proc; empty elsewhere)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids: list[int] = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        out += kids
        todo += kids
    return out


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    # Workers must import moefx even when it is not installed: put its parent folder on the path.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def start(target_argv: Sequence[str], nnodes: int = 1, nproc_per_node: int = 1, node_rank: int = 0,
          master_addr: str = "127.0.0.1", master_port: int | None = None, *, rdzv_backend: str = "static",
          rdzv_id: str = "moefx", max_restarts: int = 0, monitor_interval: float = 0.1,
          extra_args: Sequence[str] = (), env: dict | None = None, capture: bool = True,
          cwd: str | None = None) -> Launch:
    """Start `python -m torch.distributed.run` for one node without waiting (see `launch`)."""
    if master_port is None:
        if nnodes > 1:
            raise ValueError("launch: with nnodes > 1 every node's launch needs the same explicit master_port")
        master_port = free_port()
    argv = torchrun_argv(target_argv, nnodes, nproc_per_node, node_rank, master_addr, master_port,
                         rdzv_backend=rdzv_backend, rdzv_id=rdzv_id, max_restarts=max_restarts,
                         monitor_interval=monitor_interval, extra_args=extra_args)
    return Launch(argv, _env(env), capture, cwd)


def launch(target_argv: Sequence[str], nnodes: int = 1, nproc_per_node: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None, *, timeout: float | None = None,
           **kwargs) -> LaunchResult:
    """Run `target_argv` under torchrun for this node and wait (at most `timeout` seconds).

    master_port None picks a free port (single node only). Workers fail fast (max_restarts = 0).
    Extra keyword arguments go to `start` (rdzv_backend, rdzv_id, env, capture, cwd, extra_args, ...).
    Returns a LaunchResult; call `.check()` to raise on failure.
    """
    return start(target_argv, nnodes, nproc_per_node, node_rank, master_addr, master_port, **kwargs).wait(timeout)


# ----------------------------------------------------------------------------- worker side

def init_from_env(backend: str | None = None, timeout: float = 120.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment; returns (rank, world_size).

    backend None -> "nccl" when CUDA is available (and binds LOCAL_RANK's device), else "gloo".
    `timeout` (seconds) bounds every collective, so a lost peer ends in an error instead of a hang.
    Calling it again in an initialised process returns the existing rank and world size.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MoefxError(f"init_from_env: {', '.join(missing)} not set; start this script with "
                         f"moefx.runtime.launch(...) or torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def _describe(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def worker(fn: Callable) -> Callable:
    """Decorate a worker's entry function: on an exception print the traceback and one line
    "moefx: rank R failed: <Type>: <message>" (or "aborted after a peer failed" when the error is a
    collective losing its peer), record it for torchrun's error summary, and exit with code 1.
    On success the default process group is destroyed (if this process created one)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        rank = os.environ.get("RANK", "?")
        try:
            out = fn(*args, **kwargs)
        except SystemExit as e:
            if e.code in (0, None):
                raise
            print(f"moefx: rank {rank} failed: SystemExit({e.code})", file=sys.stderr, flush=True)
            raise
        except BaseException as e:
            text = str(e)
            traceback.print_exc()
            if any(s in text for s in _PEER_GONE):
                print(f"moefx: rank {rank} aborted after a peer failed: {_describe(e)}", file=sys.stderr, flush=True)
            else:
                print(f"moefx: rank {rank} failed: {_describe(e)}", file=sys.stderr, flush=True)
            raise
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()                  # no rank tears its groups down while a peer still uses them
            dist.destroy_process_group()
        return out

    recorded = record(inner)

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        try:
            return recorded(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException:
            sys.exit(1)

    return entry
