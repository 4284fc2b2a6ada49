"""The generation job `moefx launch --generate` runs: one rank of a distributed KV-cache generator.

    moefx launch --nproc-per-node 4 --plan plan.toml llama-tiny --generate --max-new-tokens 32 --check

Every rank builds the partitioned prefill and decode graphs on meta (one mesh for both), fills only
its own tensors (`moefx.runtime.build.build_generator`: its experts, its heads of the attention
and of the KV cache) and generates. Data-parallel replica d generates its own prompts: its rows of
--prompt-ids / --prompt (ceil(n / dp) each), or a random batch drawn with seed + d. The ranks of a
replica (its TP peers) hold the same batch and sample the same tokens; every rank runs the same
number of decode steps (EOS is agreed on across the world, since expert all-to-alls span replicas).
Rank 0 prints exactly the user's rows, in order (a replica's filler rows, which even out the
batches, are left out), or each replica's random rows, with text given a tokenizer; every rank
prints one summary line. --check generates the same prompts with the single-process model (whole, on every rank) and
fails the rank whose tokens differ. --load takes a sharded checkpoint of the converted model
(`--save` of a forward / train job).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from ...dist.checkpoint import load_full, load_sharded
from ...dist.worker import progress, say
from ...errors import MoefxError
from ...gen.cache import is_cache_buffer
from ...gen.prompts import encode, left_pad, local_tokenizer, parse_prompt_ids, replica_row_indices, replica_rows
from ...parallel import validate_parallel
from ..build import build_generator
from ..run_model import (
    DefaultsFormatter,
    add_model_args,
    fail_if_asked,
    job_main,
    peak_rss_mb,
    positive_int,
    replica_batch,
    start_job,
    tensor_bytes,
)

__all__ = ["main", "build_parser", "add_generation_args", "sampling_kwargs"]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The generation options `moefx generate` and this job share."""
    p.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids: comma-separated, rows separated by ';' "
                                                       "(default: a random batch of --batch x --seq)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a text prompt (repeat for a batch); needs a tokenizer in the --weights folder")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens to generate per row")
    p.add_argument("--max-cache-len", type=positive_int, default=None,
                   help="KV-cache length (default: prompt + max-new-tokens)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--eos-token-id", type=int, default=None, help="stop a row at this token (default: the "
                                                                  "model config's)")


def sampling_kwargs(args) -> dict:
    """Generator.generate's sampling keywords from the options."""
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.sample_seed, eos_token_id=args.eos_token_id)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moefx.runtime.jobs.generate",
                                formatter_class=DefaultsFormatter,
                                description="one rank of distributed generation (run it with `moefx launch "
                                            "--generate`)")
    add_model_args(p)
    add_generation_args(p)
    return p


def _prompt_rows(args, tokenizer, vocab: int | None) -> list[list[int]] | None:

    if args.prompt_ids is not None and args.prompt:
        raise MoefxError("give --prompt-ids or --prompt, not both")
    if args.prompt_ids is not None:
        return parse_prompt_ids(args.prompt_ids, vocab)
    if args.prompt:
        return encode(tokenizer, args.prompt)
    return None


def _replica_prompts(args, job, replica: int, replicas: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:

    rows = _prompt_rows(args, tokenizer, None)
    if rows is None:
        ids = replica_batch(job.spec, replica, "cpu")[0]
        return ids, torch.ones_like(ids)
    return left_pad(replica_rows(rows, replica, replicas))


def checkpoint_name(name: str) -> str | None:
    """A generation graph's tensor -> its name in a checkpoint of the converted model (the cache: none)."""
    return None if is_cache_buffer(name) else name.removeprefix("model.")


def _agree(device):

    def agree(done: bool) -> bool:
        flag = torch.tensor([int(done)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    return agree


def _print_rows(everything: list, rows: list | None, replicas: int, tokenizer) -> None:
    """Rank 0 prints the generated rows: with user prompts exactly the user's rows, in their order
    ("row j (replica r): ..."; the fillers that even out the replicas' batches are left out); with
    random prompts every replica's rows ("replica r row i: ...")."""
    per_replica = {rep: (plen, tokens) for rep, plen, tokens in everything}
    lines = []
    for rep in sorted(per_replica):
        plen, tokens = per_replica[rep]
        where = replica_row_indices(len(rows), rep, replicas) if rows else range(len(tokens))
        for i, (j, row) in enumerate(zip(where, tokens)):
            text = f"  {tokenizer.decode(row[plen:])!r}" if tokenizer is not None else ""
            if not rows:
                lines.append((rep, i, f"replica {rep} row {i}: {' '.join(map(str, row))}{text}"))
            elif j < len(rows):
                lines.append((j, 0, f"row {j} (replica {rep}): {' '.join(map(str, row))}{text}"))
    for *_, line in sorted(lines):
        say(line)


def run(args) -> str:

    job = start_job(args)
    tokenizer = local_tokenizer(args.weights)
    # the prompts decide the cache's shape, so they are read before the build; every rank reads all
    rows = _prompt_rows(args, tokenizer, None)
    grid = validate_parallel(job.plan.parallel, job.world, [])          # tp x dp (no MoE layer needed)
    replicas, replica = grid.dp, grid.dp_rank(job.rank)
    ids, mask = _replica_prompts(args, job, replica, replicas, tokenizer)
    batch, prompt_len = ids.shape
    cache = args.max_cache_len or (rows and max(len(r) for r in rows) or prompt_len) + args.max_new_tokens
    gen = build_generator(job.spec, job.plan, batch_size=batch, max_cache_len=cache, prompt_len=max(prompt_len, 2),
                          device=job.device, profile=job.profile, measure=True)
    gen.agree = _agree(job.device)
    progress("built")
    if args.load:
        load_sharded(gen.prefill, args.load, rename=checkpoint_name)
        progress("loaded")
    fail_if_asked(args, job.rank)
    vocab = gen.vocab_size
    if vocab is not None and int(ids.max()) >= vocab:
        raise MoefxError(f"prompt token id {int(ids.max())} is outside the model's vocabulary [0, {vocab})")
    if args.compile:
        gen.compile()
    if args.stall_rank == job.rank:
        time.sleep(3600)
    out = gen.generate(ids, mask, **sampling_kwargs(args))
    stats = gen.last_stats
    progress("generated")
    everything = [None] * job.world
    dist.all_gather_object(everything, (replica, prompt_len, out.tolist()))
    if job.rank == 0:
        _print_rows(everything, rows, replicas, tokenizer)
    what = (f"{stats.new_tokens // max(batch, 1)} new tokens x {batch} rows, prefill {1000 * stats.prefill_s:.1f} ms, "
            f"decode {stats.ms_per_token:.1f} ms/token, {stats.tokens_per_s:.1f} tokens/s, peak RSS "
            f"{peak_rss_mb():.0f} MB, tensors {tensor_bytes(gen.prefill) / 2**20:.1f} MB")
    head = f"rank {job.rank}/{job.world}:"
    if not args.check:
        return f"{head} ok {what}"
    ref = build_generator(job.spec, job.plan, batch_size=batch, max_cache_len=cache, prompt_len=max(prompt_len, 2),
                          device=job.device, distributed=False)
    if args.load:
        load_full(ref.prefill, args.load, rename=checkpoint_name)
    want = ref.generate(ids, mask, **sampling_kwargs(args))
    if not torch.equal(out, want):
        rows_off = [i for i in range(out.shape[0]) if not torch.equal(out[i], want[i])] if out.shape == want.shape \
            else "all"
        say(f"{head} MISMATCH rows {rows_off}, {what}")
        raise AssertionError(f"--check: the tokens of rows {rows_off} differ from the single-process run")
    dist.barrier()
    return f"{head} ok tokens equal the single-process run, {what}"


main = job_main(build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
