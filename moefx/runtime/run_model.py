"""The worker program `moefx launch` runs: one rank of a distributed moefx model.

    python -m moefx.runtime.run_model MODEL --plan plan.toml [--compile] [--check] [--steps N]
        [--batch B --seq T] [--seed S] [--lr LR] [--load DIR] [--save DIR]

(normally under `moefx launch` / torchrun). Every rank: `init_from_env` -> `load_model` ->
`moefx.convert` -> `moefx.distribute` -> forward passes, or with --steps N that many SGD training
steps (loss + aux loss, backward, `moefx.reduce_gradients`) -> one summary line::

    rank 1/4: ok max|diff|=3.1e-08, 12.3 ms/step (2 x 8 tokens, forward)

Data parallelism: TP ranks share a batch; data-parallel replica d draws its batch with seed
`seed + d` (replica 0 uses the model's own example inputs). --check also runs the single-process
converted model (same weights) on this rank's batch and, with --steps, trains it on the mean loss
over every replica's batch (what the distributed step computes); it fails the rank when
max |local - reference| > 1e-5 * max(1, max |reference|).

--compile wraps the rank's GraphModule in `torch.compile`. Dynamo splits the graph at the
all-to-alls (their split sizes are data: the token counts per rank), so the compiled pieces are the
dense parts between them; the first call compiles. If compiling fails the rank falls back to
eager and says so (`torch._dynamo.config.suppress_errors`, so the fallback is per frame and every
rank still runs the same collectives in the same order).
--fail-rank R (hidden, for tests) makes rank R raise right after distribute.
The runtime runs the graphs moefx.distribute returns; it rewrites nothing itself.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from ..outputs import main_tensor

from .launch import init_from_env, worker

__all__ = ["main", "build_parser", "worker_argv"]

MODULE = "moefx.runtime.run_model"


def worker_argv(model: str, plan: str, *, compile: bool = False, check: bool = False, steps: int = 0,
                batch: int | None = None, seq: int | None = None, seed: int | None = None,
                extra: list[str] | tuple = ()) -> list[str]:
    """The torchrun target (["-m", "moefx.runtime.run_model", ...]) for these options."""
    argv = ["-m", MODULE, model, "--plan", str(plan)]
    argv += ["--compile"] * compile + ["--check"] * check
    for flag, value in (("--steps", steps or None), ("--batch", batch), ("--seq", seq), ("--seed", seed)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moefx.runtime.run_model",
                                description="one rank of a distributed moefx model (run it with `moefx launch`)")
    p.add_argument("model", help="built-in name (gpt2-tiny, llama-tiny, ...) or package.module:function")
    p.add_argument("--plan", required=True, help="plan file (.toml / .json) with a [parallel] section")
    p.add_argument("--compile", action="store_true", help="torch.compile each rank's graph")
    p.add_argument("--check", action="store_true",
                   help="compare with the single-process converted model; fail when they differ")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: forward passes only)")
    p.add_argument("--iters", type=int, default=3, help="forward passes when --steps is 0")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--tolerance", type=float, default=1e-5, help="relative tolerance of --check")
    p.add_argument("--load", metavar="DIR", help="load a sharded checkpoint (moefx.runtime.checkpoint) first")
    p.add_argument("--save", metavar="DIR", help="save a sharded checkpoint at the end")
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    p.add_argument("--fail-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _loss(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """Next-token cross-entropy for [B, T, V] logits of [B, T] token ids, else mean square."""
    ids = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
    if (ids is not None and not ids.is_floating_point() and out.dim() == 3 and ids.shape == out.shape[:2]
            and out.shape[1] > 1):
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))
    return out.float().pow(2).mean()


def _batch(name: str, replica: int, args, example: tuple) -> tuple:
    """Data-parallel replica `replica`'s batch (replica 0: the example inputs)."""
    from ..models import load_model

    if replica == 0:
        return example
    state = torch.random.get_rng_state()
    try:
        return load_model(name, seed=args.seed + replica, batch=args.batch, seq=args.seq)[1]
    finally:
        torch.random.set_rng_state(state)


def _compile(local):
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True       # a frame that fails to compile runs eagerly
    return torch.compile(local, dynamic=True)


def _compile_report(rank: int) -> str:
    """After the first compiled call: how many graphs Dynamo compiled (a warning when none)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    if graphs == 0:
        warnings.warn(f"rank {rank}: torch.compile compiled no graph (every frame failed or was skipped); "
                      "the rank ran eagerly", stacklevel=2)
        return ", compile fell back to eager"
    return f", compiled: {graphs} graphs, {breaks} graph breaks"


def run(args) -> str:
    import torch.distributed as dist

    import moefx
    from ..models import load_model
    from ..nn.aux import aux_loss
    from ..plan import Plan
    from .checkpoint import load_full, load_sharded, save_sharded

    rank, world = init_from_env(timeout=args.timeout)
    plan = Plan.from_file(args.plan)
    model, example = load_model(args.model, seed=args.seed, batch=args.batch, seq=args.seq)
    torch.manual_seed(args.seed)
    ref = moefx.convert(model, plan, example)
    local = moefx.distribute(ref, plan)
    if args.fail_rank == rank:
        raise RuntimeError(f"--fail-rank {rank}: failing on purpose after distribute")
    resolved = local.meta["moefx_parallel"]
    if args.load:
        load_sharded(local, args.load)
        if args.check:
            load_full(ref, args.load)
    if not args.check:
        ref = None

    replicas = [_batch(args.model, d, args, example) for d in range(resolved.dp)] if args.check and args.steps \
        else None
    inputs = _batch(args.model, resolved.dp_rank(rank), args, example)
    tokens = inputs[0].numel() if inputs and isinstance(inputs[0], torch.Tensor) else 0

    runner, compiled_note = local, ""
    if args.compile:
        try:
            runner = _compile(local)
        except Exception as e:  # torch.compile itself refused (no compiler, unsupported platform)
            warnings.warn(f"rank {rank}: torch.compile failed ({type(e).__name__}: {e}); running eagerly")

    times = []
    if args.steps > 0:
        local.train()
        opt = torch.optim.SGD(local.parameters(), lr=args.lr)
        ref_opt = None
        if ref is not None:
            ref.train()
            ref_opt = torch.optim.SGD(ref.parameters(), lr=args.lr)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = main_tensor(runner(*inputs))
            (_loss(out, inputs) + aux_loss(local)).backward()
            moefx.reduce_gradients(local)
            opt.step()
            times.append(time.perf_counter() - t0)
            if ref is not None:
                ref_opt.zero_grad(set_to_none=True)
                total = 0.0
                for batch in replicas:
                    total = total + _loss(main_tensor(ref(*batch)), batch) + aux_loss(ref)
                (total / len(replicas)).backward()
                ref_opt.step()
        mode = f"{args.steps} training steps"
    else:
        mode = "forward"
    with torch.no_grad():
        for _ in range(max(args.iters, 1) if args.steps == 0 else 1):
            t0 = time.perf_counter()
            out = main_tensor(runner(*inputs))
            if args.steps == 0:
                times.append(time.perf_counter() - t0)
        want = main_tensor(ref(*inputs)) if ref is not None else None

    if runner is not local:
        compiled_note = _compile_report(rank)
    steady = times[1:] if len(times) > 1 else times          # the first call includes warm-up / compile
    ms = 1000 * sum(steady) / max(len(steady), 1)
    what = f"{ms:.1f} ms/step ({tokens} tokens, {mode}{compiled_note})"
    head = f"rank {rank}/{world}:"
    if args.save:
        save_sharded(local, args.save)
    if want is None:
        return f"{head} ok {what}"
    diff = (out.float() - want.float()).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    line = f"max|diff|={diff:.2g}, {what}"
    if not diff <= args.tolerance * scale:
        print(f"{head} MISMATCH {line}", flush=True)
        raise AssertionError(f"--check: max |local - single-process| = {diff:.3g} > {args.tolerance:g} * {scale:.3g}")
    if dist.is_initialized():
        dist.barrier()
    return f"{head} ok {line}"


@worker
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*drop_tokens=True.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")   # pytree noise of deepcopy
    print(run(args), flush=True)


if __name__ == "__main__":
    sys.exit(main())
