"""`moefx launch` (a distributed job on this node's ranks under torchrun) and `moefx calibrate`.

    moefx launch --nproc-per-node 4 --plan plan.toml llama-tiny --check [--compile]
    moefx launch --nnodes 2 --node-rank 0 --master-port 29511 --nproc-per-node 2 --plan plan.toml MODEL
    moefx launch ... MODEL --generate --max-new-tokens 32      (the generation job)
    moefx launch ... MODEL --train --steps 100                 (the training job)
    moefx calibrate --nnodes 2 --nproc-per-node 4 -o profile.json

Every option `moefx launch` does not know goes to the job (the worker program); the job's own
parser checks them here, and the plan and model are captured and converted on the meta device,
before any worker starts, so a bad plan or option costs no launch. The output shows the workers'
lines; a failure ends with one line per rank (tracebacks stay in the ranks' log files).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import warnings

from ..distribute import resolve
from ..errors import CheckpointError, MoefxError
from ..runtime.build import ModelSpec, convert_meta
from ..runtime.launch import launch
from ..train.resume import latest
from .common import load_plan

JOBS = {"forward": "moefx.runtime.run_model", "generate": "moefx.runtime.jobs.generate",
        "train": "moefx.runtime.jobs.train", "distill": "moefx.runtime.jobs.distill"}


def _job(args) -> str:
    chosen = [j for j in ("generate", "train", "distill") if getattr(args, j)]
    if len(chosen) > 1:
        raise MoefxError(f"choose one job: {' and '.join('--' + j for j in chosen)} were both given")
    return chosen[0] if chosen else "forward"


def _job_parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def _job_name(module: str) -> str:
    name = next(j for j, m in JOBS.items() if m == module)
    return "forward (--check)" if name == "forward" else "--" + name


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS}


def jobs_help() -> str:
    """The launch's epilog: every job's options (they follow MODEL on the command line)."""
    lines = ["job options (after MODEL; each job's parser checks them before any worker starts):"]
    for name, module in JOBS.items():
        known = sorted(_options(_job_parser(module)) - {"-h", "--help", "--plan"})
        lines.append(textwrap.fill(f"{_job_name(module)}: " + " ".join(known), width=100, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


def _validate(args, job_argv: list[str], module: str) -> None:
    """The job's options parse, the plan fits the launch's world and the model: before any worker starts."""
    parser = _job_parser(module)
    try:
        _, unknown = parser.parse_known_args(job_argv)
    except SystemExit as e:                 # a known option with a bad value: argparse said which
        raise MoefxError(f"the {_job_name(module)} job refuses its options (see above): {' '.join(job_argv)}") from e
    options = [u.split("=")[0] for u in unknown if u.startswith("--")]
    if options:
        elsewhere = {name: _options(_job_parser(m)) for name, m in JOBS.items() if m != module}
        hints = [f"{o} belongs to the {' / '.join('--' + j for j, known in elsewhere.items() if o in known)} job"
                 for o in options if any(o in known for known in elsewhere.values())]
        raise MoefxError(f"the {_job_name(module)} job does not take {' '.join(options)}"
                         + (f" ({'; '.join(hints)}: add that flag)" if hints else "")
                         + "; see `moefx launch --help` for each job's options")
    try:
        job = parser.parse_args(job_argv)
    except SystemExit as e:
        raise MoefxError(f"the {_job_name(module)} job refuses its options (see above): {' '.join(job_argv)}") from e
    plan = load_plan(args.plan)
    world = args.nnodes * args.nproc_per_node
    pp = plan.parallel
    if pp is None:
        raise MoefxError(f"moefx launch needs a plan with a [parallel] section (nodes, devices_per_node, tp, ep); "
                         f"{args.plan} has none")
    if pp.world_size != world:
        raise MoefxError(f"the plan's [parallel] section describes nodes * devices_per_node = {pp.nodes} * "
                         f"{pp.devices_per_node} = {pp.world_size} ranks but this launch starts nnodes * "
                         f"nproc_per_node = {args.nnodes} * {args.nproc_per_node} = {world}")
    spec = ModelSpec(name=None if job.model == "-" else job.model, weights=getattr(job, "weights", None),
                     init=getattr(job, "init", "model"), seed=job.seed, batch=job.batch, seq=job.seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, _ = convert_meta(spec, plan)
    resolve(gm, pp, world)


def _stopped(code, job_argv: list[str]) -> str:
    """What a stopped launch says: that it was stopped, and for a training job its last complete
    checkpoint and the command that resumes from it."""
    signame = {130: "SIGINT", 143: "SIGTERM"}.get(code, f"exit code {code}")
    text = f"moefx launch: stopped ({signame}); every rank was stopped"
    ckpt = next((job_argv[i + 1] for i, a in enumerate(job_argv[:-1]) if a == "--checkpoint-dir"), None)
    if ckpt is None:
        return text
    try:
        last = latest(ckpt)
    except CheckpointError:
        return text + f"; --checkpoint-dir {ckpt} has no complete checkpoint yet"
    command = ["moefx", *sys.argv[1:]] + ([] if "--resume" in sys.argv else ["--resume", ckpt])
    return text + f"; the last complete checkpoint is {last}; continue with:\n  " + " ".join(command)


def _print_live(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def cmd_launch(args, job_argv: list[str]) -> int:
    """Run the job's worker on this node's ranks under torchrun; print the workers' lines and a summary."""
    module = JOBS[_job(args)]
    job_argv = [args.model, "--plan", args.plan, *job_argv]
    _validate(args, job_argv, module)
    try:
        result = launch(["-m", module, *job_argv], nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
                        timeout=args.timeout, capture=not args.stream, echo=_print_live)
    except ValueError as e:
        raise MoefxError(str(e)) from None
    except SystemExit as e:                      # SIGINT / SIGTERM: the launch was stopped (forward_signals)
        print(_stopped(e.code, job_argv), file=sys.stderr, flush=True)
        raise
    node = f"node {args.node_rank}/{args.nnodes}: " if args.nnodes > 1 else ""
    if result.ok:
        print(f"moefx launch: {node}{args.nproc_per_node} rank(s) {result.summary()}", flush=True)
        return 0
    print(f"moefx launch: {node}FAILED, {result.summary()}", file=sys.stderr, flush=True)
    for line in result.rank_lines():
        print(f"moefx launch:   {line}", file=sys.stderr, flush=True)
    return 124 if result.timed_out else (result.returncode if result.returncode > 0 else 1)


def cmd_calibrate(args) -> int:
    """Measure this job's communication costs and write the profile hierarchical_a2a = "auto" uses."""
    world_nodes, per_node = args.nodes or args.nnodes, args.devices_per_node or args.nproc_per_node
    target = ["-m", "moefx.runtime.calibrate", "--nodes", str(world_nodes), "--devices-per-node", str(per_node),
              "--output", args.output, "--reps", str(args.reps)]
    result = launch(target, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                    master_addr=args.master_addr, master_port=args.master_port, timeout=args.timeout)
    sys.stdout.write(result.worker_output())
    if not result.ok:
        print(f"moefx calibrate: FAILED, {result.summary()}", file=sys.stderr, flush=True)
        return 1
    print(f"moefx calibrate: wrote {args.output}", flush=True)
    return 0


def _torchrun_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--nnodes", type=int, default=1, help="nodes of the job")
    sp.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this node")
    sp.add_argument("--node-rank", type=int, default=0, help="this node's index (with --nnodes > 1)")
    sp.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    sp.add_argument("--master-port", type=int, default=None,
                    help="port on node 0 (required with --nnodes > 1; default: a free port)")
    sp.add_argument("--timeout", type=float, default=None, help="stop the launch after this many seconds")


def add_parsers(sub) -> None:
    ln = sub.add_parser("launch", help="run a distributed moefx job on this node's ranks (torchrun)",
                        epilog=jobs_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ln.add_argument("model", help="built-in name (gpt2-tiny, llama-tiny, ...), package.module:function, or - with "
                                  "--weights DIR")
    ln.add_argument("--plan", required=True, help="plan file with a [parallel] section (world = nnodes x nproc)")
    _torchrun_args(ln)
    ln.add_argument("--generate", action="store_true", help="run the generation job (KV-cache decoding)")
    ln.add_argument("--train", action="store_true", help="run the training job")
    ln.add_argument("--distill", action="store_true", help="run the distributed staged-KD distillation job")
    ln.add_argument("--stream", action="store_true",
                    help="let the workers write to the terminal directly, torchrun's own lines included (by "
                         "default their lines are shown live, filtered; with --stream the failure summary cannot "
                         "name the failing rank)")
    ln.set_defaults(func=cmd_launch, takes_rest=True)

    ca = sub.add_parser("calibrate", help="measure this job's all-to-all costs (the hierarchical_a2a profile)")
    _torchrun_args(ca)
    ca.add_argument("--nodes", type=int, default=None, help="nodes of the job's mesh (default: --nnodes)")
    ca.add_argument("--devices-per-node", type=int, default=None,
                    help="ranks per node of the mesh (default: --nproc-per-node)")
    ca.add_argument("--output", "-o", required=True, help="profile JSON to write")
    ca.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement")
    ca.set_defaults(func=cmd_calibrate)
