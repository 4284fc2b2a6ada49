"""`moefx generate`: KV-cache generation with a converted model, in one process.

    moefx generate llama-tiny --plan plan.toml --prompt-ids 1,2,3 --max-new-tokens 32 [--compile]
    moefx generate - --weights DIR --plan plan.toml --prompt "Once upon a time"   (tokenizer in DIR)
    moefx generate --load saved/ --prompt-ids 1,2,3        (a folder written by moefx.save)
    moefx generate --load ckpt/step0000300 --prompt-ids 1,2,3   (a training checkpoint: its recorded model and plan)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..dist.checkpoint import load_full
from ..errors import MoefxError
from ..gen.prompts import encode, left_pad, local_tokenizer, parse_prompt_ids
from ..runtime.build import build_generator
from ..runtime.jobs.generate import add_generation_args, checkpoint_name, sampling_kwargs
from ..runtime.run_model import positive_int, spec_and_plan
from ..saving import WEIGHTS, load_generator, save
from .common import check_device


def _generator(args, batch: int, prompt_len: int, cache: int):
    saved = args.load and (Path(args.load) / WEIGHTS).exists()       # moefx.save's folder, not a DCP checkpoint
    if saved:
        if args.plan or args.weights or args.model not in (None, "-"):
            raise MoefxError("--load DIR rebuilds the model and plan saved in DIR: give no MODEL, --plan or --weights")
        return load_generator(args.load, batch_size=batch, max_cache_len=cache, device=args.device)
    spec, plan = spec_and_plan(args)
    gen = build_generator(spec, plan, batch_size=batch, max_cache_len=cache, prompt_len=max(prompt_len, 2),
                          device=args.device, distributed=False)
    if args.load:                                    # its weights over the built ones (optimizer state left)
        load_full(gen.prefill, args.load, rename=checkpoint_name)
    return gen


def cmd_generate(args) -> int:
    """Build the generator, generate from the prompts, print the tokens (and text) and the timing."""
    check_device(args.device)
    tokenizer = local_tokenizer(args.tokenizer or args.weights)
    if args.prompt_ids is not None and args.prompt:
        raise MoefxError("give --prompt-ids or --prompt, not both")
    if args.prompt:
        ids, mask = left_pad(encode(tokenizer, args.prompt), getattr(tokenizer, "pad_token_id", None) or 0)
    elif args.prompt_ids is not None:
        ids, mask = left_pad(parse_prompt_ids(args.prompt_ids))
    else:
        ids = mask = None
    shape = ids.shape if ids is not None else (args.batch, args.seq)
    gen = _generator(args, shape[0], shape[1], args.max_cache_len or shape[1] + args.max_new_tokens)
    vocab = gen.vocab_size
    if ids is None:                                  # a random prompt inside the vocabulary
        ids = torch.randint(0, vocab or 2, shape, generator=torch.Generator().manual_seed(args.seed))
        mask = torch.ones_like(ids)
    if vocab is not None and int(ids.max()) >= vocab:
        raise MoefxError(f"prompt token id {int(ids.max())} is outside the model's vocabulary [0, {vocab})")
    if args.compile:
        gen.compile()
    out = gen.generate(ids, mask, progress=args.max_new_tokens >= 64, **sampling_kwargs(args))
    for i, row in enumerate(out.tolist()):
        text = f"  {tokenizer.decode(row[ids.shape[1]:])!r}" if tokenizer is not None else ""
        print(f"row {i}: {' '.join(map(str, row))}{text}")
    s = gen.last_stats
    print(f"{s.new_tokens} new tokens, prefill {1000 * s.prefill_s:.1f} ms, decode {s.ms_per_token:.2f} ms/token, "
          f"{s.tokens_per_s:.1f} tokens/s" + (f" (compiled decode step; the first step, compile included, took "
                                               f"{s.decode_s[0]:.1f} s)" if args.compile and s.decode_s else ""))
    if args.save:
        save(gen, args.save)
        print(f"wrote {args.save}")
    return 0


def add_parsers(sub) -> None:

    g = sub.add_parser("generate", help="generate tokens with a converted model (KV cache, prefill + decode graphs)")
    g.add_argument("model", nargs="?", default=None,
                   help="built-in name (llama-tiny, gpt2-tiny, nanogpt-tiny, ...), package.module:function, or - "
                        "with --weights")
    g.add_argument("--plan", help="plan file (.toml / .json); without one: the plan --load records, else "
                                  "moefx.Plan.default()")
    g.add_argument("--weights", metavar="DIR", help="Hugging Face folder (config.json + safetensors) of the dense "
                                                    "model (its tokenizer, when saved there, reads --prompt text)")
    g.add_argument("--init", default="model", choices=("model", "seeded"),
                   help="a built-in's dense weights: its own init or a per-tensor seeded init")
    g.add_argument("--load", metavar="DIR", help="a folder written by moefx.save (a generator or a converted "
                                                 "model: generate with its graph and weights), or a sharded "
                                                 "checkpoint (a training step folder or --save of a job: its "
                                                 "recorded model and plan unless MODEL / --plan are given)")
    g.add_argument("--save", metavar="DIR", help="save the generator (moefx.save) after generating")
    g.add_argument("--tokenizer", metavar="DIR", help="folder with a tokenizer (default: --weights)")
    g.add_argument("--compile", action="store_true", help="run the decode step under torch.compile(fullgraph=True)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="seed of the built-in's init and of the random prompts")
    g.add_argument("--batch", type=positive_int, default=1, help="rows of the random prompt batch (without --prompt*)")
    g.add_argument("--seq", type=positive_int, default=8, help="tokens of each random prompt row")
    add_generation_args(g)
    g.set_defaults(func=cmd_generate)
