"""Launch per-rank workers with torchrun, and the worker-side helpers.

Launcher side: `launch(["train.py", "--steps", "10"], nnodes=1, nproc_per_node=4)` runs
`python -m torch.distributed.run ... train.py --steps 10` and returns a `LaunchResult` (exit code,
captured output, which ranks failed and why, which rank stopped making progress). `start(...)`
returns a handle without waiting, so several "nodes" can be launched from one host (static
rendezvous: one launch per node, each with its `node_rank`, all with the same master address and
port)::

    a = start(["w.py"], nnodes=2, nproc_per_node=1, node_rank=0, master_port=29600)
    b = start(["w.py"], nnodes=2, nproc_per_node=1, node_rank=1, master_port=29600)
    ra, rb = a.wait(60), b.wait(60)

No orphans: the torchrun agent dies with the launching process (Linux parent-death signal, so
even a SIGKILL of the launcher takes it along), workers die with the agent, and SIGINT / SIGTERM
to the launcher (`forward_signals`, used by `launch` and `moefx launch`) are forwarded to the
whole launch: SIGTERM, a grace period, then SIGKILL of everything that is left.

The worker side (`init_from_env`, `@worker`, `progress`, `say`) is `moefx.dist.worker`; its
heartbeats and one-line failure reports are what this launcher reads.

Blame: a rank that waits for a dead or stuck peer fails with a collective error ("timed out",
"connection closed by peer", ...) and is reported as "aborted after a peer failed". When no rank
raised an error of its own, the heartbeats decide: the rank that stopped making progress (least
progress, or a heartbeat that stopped: a stopped process) is named as the cause.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..dist.worker import HEARTBEAT_ENV, LOG_ENV, die_with_parent
from ..errors import MoefxError

__all__ = ["torchrun_argv", "launch", "start", "Launch", "LaunchResult", "LaunchFailed", "free_port",
           "forward_signals"]

_FAILED = re.compile(r"moefx: rank (\d+) failed: (.*)")
_ABORTED = re.compile(r"moefx: rank (\d+) aborted after a peer failed: (.*)")
_ROOT_RANK = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)", re.S)
_AGENT_LINE = re.compile(r"^[WEIF]\d{4} \d\d:\d\d:\d\d")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception): .+$", re.M)


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


# ----------------------------------------------------------------------------------- results


@dataclass
class LaunchResult:
    """What one launch (one node's torchrun) did.

    failures: rank -> message, from the workers' "moefx: rank R failed: ..." lines (errors of their
    own); aborted: rank -> message of the ranks that lost a peer; root_cause_rank: the first
    failing rank according to torchrun's summary; blame: (rank, why) from the heartbeats when no
    rank failed on its own (a rank that hung or was stopped); log_dir: the ranks' log files.
    """

    returncode: int
    output: str
    elapsed: float
    argv: list = field(default_factory=list)
    timed_out: bool = False
    failures: dict = field(default_factory=dict)
    aborted: dict = field(default_factory=dict)
    root_cause_rank: int | None = None
    blame: tuple | None = None
    log_dir: str | None = None
    agent_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def failed_ranks(self) -> list[int]:
        return sorted(self.failures)

    def rank_lines(self) -> list[str]:
        """One line per rank that did not finish: what it raised, or why it stopped."""
        lines = [f"rank {r} failed: {m}" for r, m in sorted(self.failures.items())]
        if self.blame is not None and self.blame[0] not in self.failures:
            lines.append(f"rank {self.blame[0]} {self.blame[1]}")
        for r, m in sorted(self.aborted.items()):
            if r not in self.failures and (self.blame is None or r != self.blame[0]):
                lines.append(f"rank {r} aborted after a peer failed ({m})")
        if not lines and self.root_cause_rank is not None:
            lines.append(f"rank {self.root_cause_rank} failed first (torchrun)")
        if not lines and self.agent_error:
            hint = (": the --master-port is taken (another job, or a launch still running); leave --master-port out "
                    "for a free port, or pick another") if "EADDRINUSE" in self.agent_error else ""
            lines.append(f"torchrun failed before any worker ran: {self.agent_error}{hint}")
        return lines

    def summary(self) -> str:
        if self.ok:
            return f"ok in {self.elapsed:.1f}s"
        why = "; ".join(self.rank_lines()) or "no worker message"
        logs = f" (per-rank logs in {self.log_dir})" if self.log_dir else ""
        return (f"exit code {self.returncode}{' (timed out)' if self.timed_out else ''} after "
                f"{self.elapsed:.1f}s: {why}{logs}")

    def worker_output(self) -> str:
        """The workers' own lines: torchrun's logging and its failure report left out."""
        return "".join(worker_lines(self.output))

    def check(self) -> "LaunchResult":
        """Raise LaunchFailed with a readable summary (and the output's tail) unless the launch succeeded."""
        if not self.ok:
            tail = "\n".join(self.output.splitlines()[-40:])
            raise LaunchFailed(f"launch {' '.join(self.argv)}: {self.summary()}\n--- output tail ---\n{tail}")
        return self


class WorkerLineFilter:
    """Tells, line by line, whether a line of a launch's output is the workers' own: torchrun's log
    lines, its OMP banner and its failure report (a traceback, then the ==== block down to the root
    cause) are not. Stateful: feed it the lines in order."""

    def __init__(self):
        self.state = None

    def __call__(self, line: str) -> bool:
        s = line.strip()
        if self.state == "banner":
            self.state = None if s.startswith("*****") else self.state
            return False
        if self.state == "report":
            self.state = "root" if s.startswith("Root Cause") else self.state
            return False
        if self.state == "root":
            self.state = None if s and set(s) == {"="} else self.state
            return False
        if _AGENT_LINE.match(line):
            return False
        if s.startswith("*****"):
            self.state = "banner"
        elif s.startswith("Traceback (most recent call last):"):
            self.state = "report"
        else:
            return True
        return False


def worker_lines(output: str) -> list[str]:
    """Lines of a launch's output that the workers printed (see WorkerLineFilter)."""
    keep = WorkerLineFilter()
    return [line for line in output.splitlines(keepends=True) if keep(line)]


class _Echo:
    """Reads a launch's output as it comes: keeps all of it, and passes the workers' lines to `echo`
    live, a warning that every rank prints only once."""

    def __init__(self, stream, echo: Callable[[str], None]):
        self.lines: list[str] = []
        self._keep, self._seen, self._echo = WorkerLineFilter(), set(), echo
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            if not self._keep(line):
                continue
            if "Warning" in line:
                if line in self._seen:
                    continue
                self._seen.add(line)
            self._echo(line)


def _parse(output: str) -> tuple[dict, dict, int | None]:
    failures: dict[int, str] = {}
    aborted: dict[int, str] = {}
    for m in _FAILED.finditer(output):
        failures.setdefault(int(m.group(1)), m.group(2).strip())
    for m in _ABORTED.finditer(output):
        aborted.setdefault(int(m.group(1)), m.group(2).strip())
    root = None
    for m in _ROOT_RANK.finditer(output):
        root = int(m.group(1))
        break
    return failures, aborted, root


# ----------------------------------------------------------------------------------- heartbeats


def read_heartbeats(folder: str | os.PathLike | None) -> dict[int, dict]:
    """rank -> {"time", "count", "what", "pid"} from a launch's heartbeat folder."""
    out: dict[int, dict] = {}
    if not folder or not os.path.isdir(folder):
        return out
    for p in Path(folder).glob("rank*.json"):
        try:
            out[int(p.stem[4:])] = json.loads(p.read_text())
        except (ValueError, OSError):
            continue
    return out


def blame(beats: dict[int, dict], aborted: dict | None = None, interval: float = 1.0) -> tuple[int, str] | None:
    """The rank that stopped making progress, when no rank raised an error of its own: a rank that
    neither failed nor lost a peer while the others timed out waiting (it was stuck and got killed),
    else one whose heartbeat stopped (a stopped or frozen process), else the one with the least
    progress when the others got further."""
    if len(beats) < 2:
        return None
    aborted = aborted or {}
    silent = sorted(set(beats) - set(aborted))
    if aborted and silent:
        r = silent[0]
        waiting = ", ".join(str(a) for a in sorted(aborted))
        return r, (f"stopped making progress after {beats[r].get('what') or 'start'!r} (no error of its own; "
                   f"rank(s) {waiting} timed out waiting for it)")
    newest = max(b["time"] for b in beats.values())
    stale = {r: newest - b["time"] for r, b in beats.items() if newest - b["time"] > 5 * interval}
    if stale:
        r = max(stale, key=stale.get)
        return r, (f"stopped making progress: its heartbeat stopped {stale[r]:.0f} s before the others' "
                   f"(last at {beats[r].get('what') or 'start'!r}); the other ranks timed out waiting for it")
    counts = {r: b.get("count", 0) for r, b in beats.items()}
    low = min(counts.values())
    behind = [r for r, c in counts.items() if c == low]
    if len(behind) < len(counts):
        r = min(behind)
        ahead = max(counts, key=counts.get)
        return r, (f"stopped making progress at {beats[r].get('what') or 'start'!r} while rank {ahead} reached "
                   f"{beats[ahead].get('what')!r}; the other ranks timed out waiting for it")
    return None


# ----------------------------------------------------------------------------------- process tree


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


class Launch:
    """A running torchrun (one node). `wait(timeout)` -> LaunchResult; on timeout the whole launch is
    stopped (SIGTERM, grace, SIGKILL)."""

    def __init__(self, argv: list[str], env: dict, capture: bool, cwd: str | None, folder: str | None,
                 owns_folder: bool = False, echo: Callable[[str], None] | None = None):
        self.argv = argv
        self.folder = folder
        self.owns_folder = owns_folder          # a temporary folder of this launch: removed when not needed
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *argv], env=env, cwd=cwd,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None,
            text=True, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        self._echo = _Echo(self.proc.stdout, echo) if capture and echo is not None else None

    @property
    def heartbeat_dir(self) -> str | None:
        return os.path.join(self.folder, "heartbeat") if self.folder else None

    @property
    def log_dir(self) -> str | None:
        return os.path.join(self.folder, "logs") if self.folder else None

    def wait(self, timeout: float | None = None) -> LaunchResult:
        timed_out = False
        try:
            out = self._finish(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop()
            out = self._finish(None)
        failures, aborted, root = _parse(out)
        rc = self.proc.returncode if not timed_out else (self.proc.returncode or -signal.SIGKILL)
        who = blame(read_heartbeats(self.heartbeat_dir), aborted) if rc != 0 and not failures else None
        errors = _EXCEPTION_LINE.findall(out) if rc != 0 else []
        result = LaunchResult(returncode=rc, output=out, elapsed=time.monotonic() - self._t0, argv=self.argv,
                              timed_out=timed_out, failures=failures, aborted=aborted, root_cause_rank=root,
                              blame=who, log_dir=self.log_dir, agent_error=errors[-1] if errors else None)
        if self.owns_folder:
            self._tidy(result)
        return result

    def _finish(self, timeout: float | None) -> str:
        """Wait for torchrun to exit (TimeoutExpired after `timeout` s); return its whole output."""
        if self._echo is None:
            out, _ = self.proc.communicate(timeout=timeout)
            return out or ""
        self.proc.wait(timeout=timeout)
        self._echo.thread.join(timeout=30)      # the pipe closes once the last worker is gone
        return "".join(self._echo.lines)

    def _tidy(self, result: LaunchResult) -> None:
        """Remove this launch's temporary folder unless it holds logs of a failed run worth reading."""
        logs = [p for p in Path(self.log_dir).glob("*") if p.is_file() and p.stat().st_size] if self.log_dir else []
        if result.ok or not logs:
            shutil.rmtree(self.folder, ignore_errors=True)
            result.log_dir = None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the torchrun agent (it stops its workers), wait up to `grace` s, then SIGKILL what is left."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(0.1)
        self.kill()

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


@contextlib.contextmanager
def forward_signals(*launches: Launch):
    """While active, SIGINT / SIGTERM to this process stop the launches (SIGTERM to each agent, a
    grace period, SIGKILL of what is left) and then exit with 130 / 143."""
    def handler(signum, frame):
        for h in launches:
            h.stop()
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _env(extra: dict | None, folder: str | None) -> dict:
    env = dict(os.environ)
    # Workers must import moefx even when it is not installed: put its parent folder on the path.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if folder is not None:
        for sub, var in (("heartbeat", HEARTBEAT_ENV), ("logs", LOG_ENV)):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            env[var] = os.path.join(folder, sub)
    env.update(extra or {})
    return env


def start(target_argv: Sequence[str], nnodes: int = 1, nproc_per_node: int = 1, node_rank: int = 0,
          master_addr: str = "127.0.0.1", master_port: int | None = None, *, rdzv_backend: str = "static",
          rdzv_id: str = "moefx", max_restarts: int = 0, monitor_interval: float = 0.1,
          extra_args: Sequence[str] = (), env: dict | None = None, capture: bool = True,
          cwd: str | None = None, folder: str | None = None, echo: Callable[[str], None] | None = None) -> Launch:
    """Start `python -m torch.distributed.run` for one node without waiting (see `launch`).

    echo: called with each line the workers print, as they print it (the output is captured too).
    folder: where the ranks' heartbeats and logs go (None: a new temporary folder, removed after the
    launch unless it failed and its ranks wrote logs)."""
    if master_port is None:
        if nnodes > 1:
            raise ValueError("launch: with nnodes > 1 every node's launch needs the same explicit master_port")
        master_port = free_port()
    argv = torchrun_argv(target_argv, nnodes, nproc_per_node, node_rank, master_addr, master_port,
                         rdzv_backend=rdzv_backend, rdzv_id=rdzv_id, max_restarts=max_restarts,
                         monitor_interval=monitor_interval, extra_args=extra_args)
    owns = folder is None
    folder = folder if folder is not None else tempfile.mkdtemp(prefix="moefx-launch-")
    return Launch(argv, _env(env, folder), capture, cwd, folder, owns_folder=owns, echo=echo)


def launch(target_argv: Sequence[str], nnodes: int = 1, nproc_per_node: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None, *, timeout: float | None = None,
           **kwargs) -> LaunchResult:
    """Run `target_argv` under torchrun for this node and wait (at most `timeout` seconds).

    master_port None picks a free port (single node only). Workers fail fast (max_restarts = 0).
    SIGINT / SIGTERM while waiting stop the whole launch. Extra keyword arguments go to `start`
    (rdzv_backend, rdzv_id, env, capture, cwd, extra_args, folder, ...). Returns a LaunchResult;
    call `.check()` to raise on failure.
    """
    handle = start(target_argv, nnodes, nproc_per_node, node_rank, master_addr, master_port, **kwargs)
    with forward_signals(handle):
        return handle.wait(timeout)
