"""The worker side of a moefx job: process group set-up, heartbeats, one-line failure reports.

`init_from_env()` initialises the default process group from torchrun's environment (gloo on CPU,
nccl with CUDA) with a collective timeout, and starts a heartbeat; `@worker` wraps the entry
function so a failure prints one line, "moefx: rank R failed: ValueError: ...", keeps the
traceback in the rank's log file, and exits non-zero; `progress(what)` records how far the rank
got (the launcher, `moefx.runtime.launch`, reads the heartbeats to name a rank that stopped);
`say(line)` prints one line without interleaving with other ranks.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from ..errors import MoefxError

__all__ = ["init_from_env", "worker", "progress", "say", "die_with_parent", "HEARTBEAT_ENV", "LOG_ENV"]

HEARTBEAT_ENV = "MOEFX_HEARTBEAT_DIR"
LOG_ENV = "MOEFX_LOG_DIR"
# What a collective raises on the surviving ranks when a peer dies or stops (matched ignoring case).
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "remote worker crashing", "socket timeout",
              "timed out", "timeout", "broken pipe", "nccl communicator was aborted", "connection refused")


def die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn / worker call: ask Linux to send `sig` to this process when its parent dies."""

    def set_pdeathsig() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    return set_pdeathsig




class _Heartbeat:
    """Worker side: a daemon thread writing {time, count, what} to <folder>/rank<R>.json every second."""

    def __init__(self, folder: str, rank: int, interval: float = 1.0):
        self.path = Path(folder) / f"rank{rank}.json"
        self.interval, self.count, self.what = interval, 0, "start"
        self._stop = threading.Event()
        self._write()
        threading.Thread(target=self._run, name="moefx-heartbeat", daemon=True).start()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"time": time.time(), "count": self.count, "what": self.what,
                                       "pid": os.getpid()}))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def progress(self, what: str) -> None:
        self.count += 1
        self.what = what
        self._write()


_HEARTBEAT: _Heartbeat | None = None


def say(line: str) -> None:
    """Print one line of a worker's output in a single write, so lines of ranks sharing a pipe never
    interleave (print writes the text and the newline separately when stdout is unbuffered)."""
    text = line.rstrip("\n") + "\n"
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):      # a captured / replaced stdout (tests, notebooks)
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()
    os.write(fd, text.encode())


def progress(what: str) -> None:
    """Record that this worker got past `what` (a phase or step): the launcher names the rank that
    stopped progressing when a collective times out. No-op outside a moefx launch."""
    if _HEARTBEAT is not None:
        _HEARTBEAT.progress(what)




def init_from_env(backend: str | None = None, timeout: float = 120.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment; returns (rank, world_size).

    backend None -> "nccl" when CUDA is available (and binds LOCAL_RANK's device), else "gloo".
    `timeout` (seconds) bounds every collective, so a lost peer ends in an error instead of a hang.
    The process dies with its torchrun agent, and writes a heartbeat when the launcher asked for one.
    Calling it again in an initialised process returns the existing rank and world size.
    """
    global _HEARTBEAT
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MoefxError(f"init_from_env: {', '.join(missing)} not set; start this script with "
                         f"`moefx launch` or torchrun")
    die_with_parent(signal.SIGKILL)()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    if os.environ.get(HEARTBEAT_ENV) and _HEARTBEAT is None:
        _HEARTBEAT = _Heartbeat(os.environ[HEARTBEAT_ENV], int(os.environ["RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout), **kwargs)
    progress("init_process_group")
    return dist.get_rank(), dist.get_world_size()


def _describe(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _peer_gone(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in _PEER_GONE)


def _log_traceback(rank: str) -> str | None:
    """Write the current exception's traceback to the rank's log file; returns its path (None: stderr)."""
    folder = os.environ.get(LOG_ENV)
    if folder:
        path = os.path.join(folder, f"rank{rank}.log")
        try:
            with open(path, "a") as fh:
                traceback.print_exc(file=fh)
            return path
        except OSError:
            pass
    traceback.print_exc()
    return None


def worker(fn: Callable) -> Callable:
    """Decorate a worker's entry function: on an exception keep the traceback in the rank's log file
    (stderr without a launch folder), print one line "moefx: rank R failed: <Type>: <message>" (or
    "aborted after a peer failed" when the error is a collective losing its peer), record it for
    torchrun's error summary, and exit with code 1. On success every rank meets at a barrier and the
    default process group is destroyed (if this process created one)."""
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
            _log_traceback(rank)
            if _peer_gone(e):
                print(f"moefx: rank {rank} aborted after a peer failed: {_describe(e)}", file=sys.stderr, flush=True)
            else:
                print(f"moefx: rank {rank} failed: {_describe(e)}", file=sys.stderr, flush=True)
            raise
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
