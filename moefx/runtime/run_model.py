"""The worker program `moefx launch` runs: one rank of a distributed moefx model.

    python -m moefx.runtime.run_model MODEL --plan plan.toml [--weights DIR] [--init model|seeded]
        [--load CKPT] [--save CKPT] [--compile] [--check] [--iters N] [--batch B --seq T] [--seed S]

(normally under `moefx launch` / torchrun). Every rank: `init_from_env` -> capture, convert and
partition on the meta device -> materialise only its own tensors (`moefx.runtime.build`) ->
forward passes -> one summary line::

    rank 1/4: ok max|diff|=3.1e-08, 12.3 ms/step (16 tokens, forward), a2a sent/layer 1.0K 2.0K,
    peak RSS 612 MB, tensors 3.2 MB

Data parallelism: TP ranks share a batch; data-parallel replica d draws its batch with seed
`seed + d`. --check also builds the single-process converted model (whole, in this process: for
models that fit) and fails the rank when max |local - reference| > 1e-5 * max(1, max |reference|).
--compile runs the rank graph under `torch.compile(fullgraph=True)`: the rank graph's collectives
are torch's functional collectives bound to the job's groups, each wait a node of its own, so the
whole graph compiles (the summary shows Dynamo's graph and graph-break counts). The job modules (`moefx.runtime.jobs`) reuse `setup` for generation and
training. Hidden flags for tests: --fail-rank R raises on rank R after the build, --stall-rank R
makes rank R stop making progress before its first forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import meta as M
from ..cost import CostProfile
from ..dist.checkpoint import load_full, load_sharded, save_sharded
from ..dist.worker import init_from_env, progress, say, worker
from ..errors import InexactConversionWarning, MoefxError
from ..facts import facts
from ..outputs import main_tensor
from ..plan import Plan
from .build import ModelSpec, build_rank, build_reference, example_inputs, job_record, recorded_job
from .stats import bytes_by_layer, collective_bytes

__all__ = ["main", "build_parser", "worker_argv", "setup", "start_job", "spec_and_plan", "positive_int", "DefaultsFormatter", "job_main", "Job", "Rank"]

MODULE = "moefx.runtime.run_model"


def worker_argv(model: str | None, plan: str, *, weights: str | None = None, compile: bool = False,
                check: bool = False, batch: int | None = None, seq: int | None = None, seed: int | None = None,
                extra: list[str] | tuple = ()) -> list[str]:
    """The torchrun target (["-m", "moefx.runtime.run_model", ...]) for these options."""
    argv = ["-m", MODULE, model or "-", "--plan", str(plan)]
    argv += ["--compile"] * compile + ["--check"] * check
    for flag, value in (("--weights", weights), ("--batch", batch), ("--seq", seq), ("--seed", seed)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(extra)


def add_model_args(p: argparse.ArgumentParser, *, single: bool = False) -> None:
    """The options every job shares: what to build and how (single: one process, the plan optional)."""
    p.add_argument("model", nargs="?", default=None,
                   help="built-in name (gpt2-tiny, llama-tiny, ...), package.module:function, or - with --weights; "
                        "default with --load: the model the checkpoint records")
    if single:
        p.add_argument("--plan", help="plan file (.toml / .json); without one: the plan a --load checkpoint "
                                      "records, else moefx.Plan.default()")
    else:
        p.add_argument("--plan", required=True, help="plan file (.toml / .json) with a [parallel] section")
    p.add_argument("--weights", metavar="DIR", help="Hugging Face folder (config.json + safetensors) of the dense "
                                                    "model, streamed: each rank reads only its slices")
    p.add_argument("--init", default="model", choices=("model", "seeded"),
                   help="a built-in's dense weights without --weights: its own init (built on each rank) or a "
                        "per-tensor seeded init (no dense model anywhere)")
    p.add_argument("--load", metavar="DIR", help="load a moefx sharded checkpoint over the materialised tensors (its "
                                                 "tensors must be exactly the model's: a plan that differs is "
                                                 "refused, naming the tensors)")
    p.add_argument("--save", metavar="DIR", help="save a moefx sharded checkpoint at the end")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the rank graph")
    p.add_argument("--check", action="store_true",
                   help="compare with the single-process converted model; fail when they differ")
    p.add_argument("--batch", type=positive_int, default=2, help="sequences per data-parallel replica")
    p.add_argument("--seq", type=positive_int, default=8, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's init and of the batches")
    p.add_argument("--profile", metavar="JSON", help="a cost profile from `moefx calibrate` (default: measured "
                                                     "at start when a layer's hierarchical_a2a is 'auto')")
    p.add_argument("--tolerance", type=float, default=1e-5, help="relative tolerance of --check")
    p.add_argument("--collective-timeout", type=float, default=120.0, help="collective timeout, seconds")
    p.add_argument("--device", default=None, help="device of the rank's tensors (default: cuda under NCCL, else cpu)")
    p.add_argument("--fail-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stall-rank", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", formatter_class=DefaultsFormatter,
                                description="one rank of a distributed moefx model (run it with `moefx launch`)")
    add_model_args(p)
    p.add_argument("--iters", type=int, default=3, help="forward passes")
    return p


@dataclass
class Rank:
    """What `setup` built on this rank."""

    rank: int
    world: int
    local: torch.nn.Module
    spec: object
    plan: object
    resolved: object
    device: torch.device

    def batch(self, seed_offset: int = 0) -> tuple:
        """This data-parallel replica's example batch (replica d: seed + d)."""
        return replica_batch(self.spec, self.resolved.dp_rank(self.rank) + seed_offset, self.device)


def replica_batch(spec, replica: int, device) -> tuple:
    """The example batch of data-parallel replica `replica` (the spec's inputs drawn with seed + replica)."""
    s = spec
    return example_inputs(ModelSpec(name=s.name, weights=s.weights, init=s.init, seed=s.seed + replica,
                                    batch=s.batch, seq=s.seq), device)


def _device(args) -> torch.device:

    if args.device:
        return torch.device(args.device)
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@dataclass
class Job:
    """What every job starts from: the initialised group, the plan, the model spec, the device."""

    rank: int
    world: int
    plan: object
    spec: object
    profile: object
    device: torch.device


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows an option's default once: not when its help already says it, nor "None" / "False"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse turns the error into a usage error naming the option)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def spec_and_plan(args) -> tuple[ModelSpec, Plan]:
    """The model spec and plan the options name (MODEL / --weights / --init, --plan); what a --load
    checkpoint recorded (`moefx.runtime.build.job_record`) stands in for MODEL and --plan when they
    are not given, else the plan is moefx.Plan.default()."""
    model = None if args.model in (None, "-") else args.model
    asked = (model is None and args.weights is None) or not args.plan      # what the record must say
    recorded = recorded_job(args.load) if asked and getattr(args, "load", None) else None
    if model is None and args.weights is None:
        if recorded is None:
            raise MoefxError("give a MODEL (built-in or package.module:function), --weights DIR, or --load a "
                             "checkpoint that records its model")
        spec = dataclasses.replace(recorded[0], seed=args.seed, batch=args.batch, seq=args.seq)
    else:
        spec = ModelSpec(name=model, weights=args.weights, init=args.init, seed=args.seed, batch=args.batch,
                         seq=args.seq)
    if args.plan:
        return spec, Plan.from_file(args.plan)
    return spec, recorded[1] if recorded is not None else Plan.default()


def start_job(args, distributed: bool = True) -> Job:
    """init_from_env (distributed), then the plan, model spec, cost profile and device the options name."""
    rank, world = init_from_env(timeout=args.collective_timeout) if distributed else (0, 1)
    spec, plan = spec_and_plan(args)
    if rank == 0:
        print("moefx: plan " + (args.plan or ("recorded in " + args.load if getattr(args, "load", None) else "default"))
              + ":\n  " + plan.describe().replace("\n", "\n  "), file=sys.stderr, flush=True)
    profile = CostProfile.load(args.profile) if args.profile else None
    torch.manual_seed(args.seed)
    return Job(rank, world, plan, spec, profile, _device(args) if distributed else torch.device(args.device or "cpu"))


def setup(args, *, train: bool = False) -> Rank:
    """start_job, then this rank's model built on meta and materialised (see the module docstring)."""
    job = start_job(args)
    local, _ = build_rank(job.spec, job.plan, device=job.device, train=train, tokens_per_rank=args.batch * args.seq,
                          profile=job.profile, measure=True)
    progress("built")
    if args.load:
        load_sharded(local, args.load)
        progress("loaded")
    fail_if_asked(args, job.rank)
    return Rank(job.rank, job.world, local, job.spec, job.plan, facts(local).parallel, job.device)


def fail_if_asked(args, rank: int) -> None:
    """--fail-rank R: raise on rank R (launch tests)."""
    if args.fail_rank == rank:
        raise RuntimeError(f"--fail-rank {rank}: failing on purpose after the build")


def reference(r: Rank, args, *, train: bool = False):
    """The single-process converted model (whole), with the same weights (and checkpoint), gating with
    the PyTorch reference implementation whatever the rank graphs lower to (so --check also proves
    the Triton kernels)."""
    plan = dataclasses.replace(r.plan, lowering=dataclasses.replace(r.plan.lowering, gating="torch"))
    ref = build_reference(r.spec, plan, device=r.device, train=train)
    if args.load:
        load_full(ref, args.load)
    return ref


def compile_model(model):
    """torch.compile(fullgraph=True); returns (callable, report() -> str of Dynamo's counts)."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(model, fullgraph=True)

    def report() -> str:
        graphs = counters["stats"].get("unique_graphs", 0)
        breaks = sum(counters["graph_break"].values())
        return f"compiled: {graphs} graph(s), {breaks} graph break(s)"

    return compiled, report


def gating_summary(local: torch.nn.Module) -> str:
    """The gating implementation the rank graph's route nodes were lowered to ("torch" / "triton"),
    with the Triton kernel launches of this process so far."""
    impls = sorted({n.meta.get(M.IMPL) for n in local.graph.nodes if n.meta.get(M.ROLE) == "route"} - {None})
    text = "/".join(impls) or "none"
    kernels = sys.modules.get("moefx.kernels.gating")       # loaded only when a Triton path ran
    if "triton" in impls:
        text += f" ({sum(kernels.LAUNCHES.values()) if kernels else 0} kernel launches)"
    return text


def human_bytes(n: float) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}B"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors `model` holds."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def compare(out: torch.Tensor, want: torch.Tensor, tolerance: float) -> tuple[bool, str]:
    """(ok, "max|diff|=...") for a local and a reference output (empty outputs compare equal)."""
    if out.shape != want.shape:
        return False, f"shape {list(out.shape)} != reference {list(want.shape)}"
    if out.numel() == 0:
        return True, "max|diff|=0 (empty)"
    diff = (out.float() - want.float()).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    return diff <= tolerance * scale, f"max|diff|={diff:.2g}"


def run(args) -> str:

    r = setup(args)
    r.local.eval()
    inputs = r.batch()
    tokens = inputs[0].numel() if inputs and isinstance(inputs[0], torch.Tensor) else 0
    if args.stall_rank == r.rank:
        time.sleep(3600)                       # a rank that stops making progress (launch tests)
    sent = bytes_by_layer(collective_bytes(r.local, *inputs))
    progress("measured")
    runner, report = (compile_model(r.local) if args.compile else (r.local, None))
    times = []
    with torch.no_grad():
        for i in range(max(args.iters, 1)):
            t0 = time.perf_counter()
            out = main_tensor(runner(*inputs))
            times.append(time.perf_counter() - t0)
            progress(f"forward {i}")
    steady = times[1:] if len(times) > 1 else times
    what = f"{1000 * sum(steady) / len(steady):.1f} ms/step ({tokens} tokens, forward"
    what += f", {report()})" if report is not None else ")"
    if sent:
        what += ", a2a sent/layer " + " ".join(human_bytes(sent[k]) for k in sorted(sent))
    what += f", peak RSS {peak_rss_mb():.0f} MB, tensors {tensor_bytes(r.local) / 2**20:.1f} MB"
    what += f", gating {gating_summary(r.local)}"
    head = f"rank {r.rank}/{r.world}:"
    if args.save:
        save_sharded(r.local, args.save, record=job_record(r.spec, r.plan))
    if not args.check:
        return f"{head} ok {what}"
    with torch.no_grad():
        want = main_tensor(reference(r, args)(*inputs))
    ok, diff = compare(out, want, args.tolerance)
    if not ok:
        say(f"{head} MISMATCH {diff}, {what}")
        raise AssertionError(f"--check: {diff} against the single-process model (tolerance {args.tolerance:g})")
    if dist.is_initialized():
        dist.barrier()
    return f"{head} ok {diff}, {what}"


def job_main(parser, run) -> Callable[[list[str] | None], None]:
    """A job module's `main(argv)`: parse with parser(), print run(args)'s summary line in one write,
    under `worker` (a failure is logged with its rank and exits non-zero)."""

    @worker
    def main(argv: list[str] | None = None) -> None:
        args = parser().parse_args(argv)
        warnings.filterwarnings("ignore", category=InexactConversionWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        say(run(args))

    return main


main = job_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
