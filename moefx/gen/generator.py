"""KV-cache generation with converted models: a prefill graph and a decode-step graph, one set of weights.

    gen = moefx.convert_generator(model, plan, example_inputs=(prompt_ids,))
    out = gen.generate(prompt_ids, max_new_tokens=64, do_sample=False)     # [B, T + 64] token ids

`convert_generator` wraps the decoder LM with a static KV cache in buffers (`moefx.gen.cache`),
captures it twice with torch.export: a prefill graph (input_ids [B, T], T dynamic, 2 <= T <= L)
and a decode-step graph (input_ids [B, 1]: every shape static), runs the plan's convert stage on
each, and ties the decode graph's tensors to the prefill graph's (the same MoE parameters, the
same cache buffers: nothing is duplicated). With `lowering.experts = "auto"` the decode graph's
MoE layers run on the gather path (few tokens, static shapes) and the prefill's on the buffer
path; `moefx dump` shows which.

`Generator.generate` runs greedy or sampled decoding (temperature / top-k / top-p, seeded), stops
at EOS per row (finished rows are padded) or after max_new_tokens, takes left-padded batches
with an attention mask (positions follow Hugging Face's: cumulative sum of the mask), and
records prefill time, per-token decode latency and tokens/s in `last_stats`.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import Dim

from .. import origin
from ..capture import graph_module
from ..convert import as_plan
from ..errors import MoefxError
from ..outputs import output_size
from ..passes import pipeline
from ..passes.base import PassContext
from ..passes.reduce_products import REDUCE_MAX_ROWS, reduce_products
from ..tensors import share_tensors
from .cache import cached_lm
from .sampling import Sampling, next_tokens
from .weight_layout import input_contiguous, long_rows
from .weight_layout import resolve as resolve_layout

__all__ = ["Generator", "GenerationStats", "convert_generator", "convert_graphs", "capture_generator",
           "position_limit", "model_positions", "check_cache_len", "special_tokens"]


@dataclass
class GenerationStats:
    """Timing of the latest `generate`: prefill seconds, decode seconds per step, new tokens per second
    (tokens_per_s counts every step, compile / warm-up included; ms_per_token leaves out the first)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: list = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        """Mean decode-step latency after the first step (which includes any compile / warm-up)."""
        steady = self.decode_s[1:] if len(self.decode_s) > 1 else self.decode_s
        return 1000 * sum(steady) / max(len(steady), 1)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + sum(self.decode_s)
        return self.new_tokens / total if total > 0 else 0.0


def _example(lm: nn.Module, tokens: int, device) -> tuple:
    B, L = lm.batch_size, lm.max_cache_len
    ids = torch.zeros(B, tokens, dtype=torch.long, device=device)
    pos = torch.arange(tokens, device=device)
    return ids, pos, torch.ones(B, L, dtype=torch.long, device=device), pos.expand(B, tokens).contiguous()


def capture_generator(model: nn.Module, batch_size: int, max_cache_len: int, *, prompt_len: int = 4
                      ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prefill graph, decode-step graph) of `model` with a static cache (not converted yet)."""
    lm = cached_lm(model, batch_size, max_cache_len).eval()
    device = next(lm.parameters()).device
    graphs = []
    for tokens in (max(2, min(prompt_len, max_cache_len)), 1):
        dims = None
        if tokens > 1:
            T = Dim("tokens", min=2, max=max_cache_len)
            dims = ({1: T}, {0: T}, None, {1: T})
        t0 = time.perf_counter()
        with torch.no_grad():
            ep = torch.export.export(lm, _example(lm, tokens, device), dynamic_shapes=dims, strict=False)
        graphs.append(graph_module(ep, type(model).__name__ + ("Prefill" if tokens > 1 else "Decode"),
                                   seconds=time.perf_counter() - t0))
    prefill, decode = graphs
    share_tensors(decode, prefill)
    return prefill, decode


def convert_graphs(model: nn.Module, plan, *, batch_size: int, max_cache_len: int, prompt_len: int = 4,
                   target: str | None = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prefill, decode) graphs of `model` with a static cache, both through the plan's convert stage
    and sharing one set of tensors. `model` is used as it is (it may live on the meta device);
    target: the device type the graphs will run on (see `moefx.convert`)."""
    ctx = PassContext(as_plan(plan), target=target)
    pipeline.check(ctx)
    check_cache_len(model, max_cache_len)
    prefill, decode = capture_generator(model, batch_size, max_cache_len, prompt_len=prompt_len)
    prefill = pipeline.run(prefill, ctx, "convert")
    decode = pipeline.run(decode, ctx, "convert")
    share_tensors(decode, prefill)
    for gm in (prefill, decode):
        origin.record(gm, model, ctx.plan, generator={"batch_size": batch_size, "max_cache_len": max_cache_len,
                                                      "prompt_len": prompt_len})
    return prefill, decode


def convert_generator(model: nn.Module, plan=None, example_inputs: tuple = (), *, batch_size: int | None = None,
                      max_cache_len: int | None = None, copy_weights: bool = True, eos_token_id: int | None = None,
                      pad_token_id: int | None = None, weight_layout: str | None = None) -> "Generator":
    """Convert a decoder LM into a Generator (prefill + decode graphs over one set of weights).

    Takes the model, a Plan (or dict; None = Plan.default()), example_inputs=(prompt_ids,) to size
    the batch (batch_size overrides), and max_cache_len (default: the model's position limit, at
    most 256). weight_layout: see `Generator` (default "auto"; "keep" with copy_weights=False, so the
    caller's own parameters keep their memory layout). The plan is checked before any work."""
    plan = as_plan(plan)
    pipeline.check(PassContext(plan))
    if weight_layout is None:
        weight_layout = "auto" if copy_weights else "keep"
    resolve_layout(weight_layout, torch.device("cpu"))   # a bad name fails before any work
    prompt = example_inputs[0] if example_inputs else None
    batch_size = batch_size or (prompt.shape[0] if prompt is not None else 1)
    max_cache_len = max_cache_len or position_limit(model)
    check_cache_len(model, max_cache_len)
    if copy_weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(model)
    prefill, decode = convert_graphs(model, plan, batch_size=batch_size, max_cache_len=max_cache_len,
                                     prompt_len=prompt.shape[1] if prompt is not None else 4)
    eos, pad = special_tokens(model, eos_token_id, pad_token_id)
    return Generator(prefill, decode, batch_size, max_cache_len, eos_token_id=eos, pad_token_id=pad, plan=plan,
                     weight_layout=weight_layout)


def special_tokens(model: nn.Module, eos_token_id: int | None = None, pad_token_id: int | None = None
                   ) -> tuple[int | None, int]:
    """(eos, pad) token ids: the given ones, else the model config's (pad 0 when it has none)."""
    config = getattr(model, "config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = pad_token_id if pad_token_id is not None else (getattr(config, "pad_token_id", None) or 0)
    return eos, pad


_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "block_size")


def model_positions(model: nn.Module) -> tuple[str, int] | None:
    """(config attribute, value) of the most positions `model` declares it handles, None when its config
    names none."""
    config = getattr(model, "config", None)
    for attr in _POSITION_ATTRS:
        v = getattr(config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return attr, v
    return None


def position_limit(model: nn.Module) -> int:
    """The default cache length: the model's declared positions, at most 256 (256 when it declares none)."""
    declared = model_positions(model)
    return min(declared[1], 256) if declared else 256


def check_cache_len(model: nn.Module, max_cache_len: int) -> None:
    """MoefxError when max_cache_len is not a positive int or exceeds the positions `model` declares
    (prompt + new tokens would run past its position table mid-generation)."""
    if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
        raise MoefxError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
    declared = model_positions(model)
    if declared and max_cache_len > declared[1]:
        raise MoefxError(f"max_cache_len {max_cache_len} exceeds the model's {declared[1]} positions "
                         f"(config.{declared[0]}): prompt + new tokens must fit in {declared[1]}; use max_cache_len "
                         f"<= {declared[1]} (and fewer new tokens)")


class Generator:
    """Prefill and decode-step graphs of one converted model (see the module docstring).

    weight_layout: "auto" re-strides the weight matrices on the CPU, for a batch of at most 2 rows,
    so that each one's longer dimension is contiguous, which streams 1.5-1.7x as fast through a
    decode step's matrix-vector products (`moefx.gen.weight_layout`; same parameters and values,
    changed in place); "long_rows" does so always; "keep" (the default here, since the graphs'
    parameters may be the caller's) leaves the layout alone. `convert_generator`, `moefx.load`
    and the launcher's generators own their weights and pass "auto". `compile()` may re-stride
    them again (then `weight_layout` reads "input_contiguous"), except under "keep".
    `weight_layout_changed` counts the matrices changed.
    """

    def __init__(self, prefill: fx.GraphModule, decode: fx.GraphModule, batch_size: int, max_cache_len: int, *,
                 eos_token_id: int | None = None, pad_token_id: int = 0, plan=None, agree=None,
                 weight_layout: str = "keep"):
        self.prefill, self.decode = prefill, decode
        self.weight_layout = resolve_layout(weight_layout, self.device if weight_layout == "auto" else None,
                                            batch_size)
        self.weight_layout_changed = long_rows(decode, prefill) if self.weight_layout == "long_rows" else 0
        # agree(done) -> bool: whether every rank is done (distributed: all ranks run the same steps)
        self.agree = agree
        self.batch_size, self.max_cache_len = batch_size, max_cache_len
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.plan = plan
        self.last_stats = GenerationStats()
        self._prefill_fn, self._decode_fn = prefill, decode
        self.compiled_graph: fx.GraphModule | None = None   # the decode graph compile() handed to torch.compile
        self.products: str | None = None                   # compile()'s resolved products

    @property
    def vocab_size(self) -> int | None:
        """The logits' last size (from the decode graph's output metadata), None when unknown."""
        return output_size(self.decode)

    @property
    def device(self) -> torch.device:
        return next(self.prefill.parameters()).device

    def compile(self, *, backend: str = "inductor", prefill: bool = False, guards: str = "inputs",
                products: str = "auto", **kwargs) -> "Generator":
        """Run the decode step (and, with prefill=True, the prefill) under torch.compile(fullgraph=True);
        returns self. kwargs go to torch.compile.

        products: "reduce" hands torch.compile a copy of the decode graph whose matrix products of
        at most `REDUCE_MAX_ROWS` rows are reductions (`moefx.passes.reduce_products`), and stores
        their weights with the summed dimension contiguous (`weight_layout.input_contiguous`, in
        place: the eager graphs share them; not under weight_layout "keep", whose linears already
        are). On the CPU machine of benchmarks/results/generate_cpu.md the batch-1 step then ran
        1.4-1.8x faster than with MKL's matrix products, but on a second machine of the same kind the
        dense model's step ran 0.86x (slower): whether it pays depends on the machine, so it is asked
        for, never guessed. Its compile generates more kernels (takes longer). "matmul" compiles the
        decode graph as it is; "auto" (the default) is "matmul", which is never slower than eager's
        own products. With "reduce" and more than REDUCE_MAX_ROWS rows per step nothing is rewritten.
        `compiled_graph` is the graph compiled. Compile a generator once: weights re-strided by a
        later call would not match what an earlier one compiled (a previously compiled prefill is
        dropped back to eager then, unless prefill=True recompiles it).

        guards="inputs" (the default) keeps Dynamo's guards on the step's inputs and drops those on
        the graphs' modules and parameters (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`):
        a generator owns its graphs and never replaces a parameter or flips a module's mode, and
        checking every parameter on every call costs about 0.2-0.3 ms per decode step on the CPU.
        Parameters are still read on every call (in-place updates are seen). guards="all" keeps
        torch's default guards, for code that changes the graphs' modules after compiling. torch.compile
        takes a `mode` or `options`, not both, so with guards="inputs" a `mode` is passed as the
        inductor options it stands for (`torch._inductor.list_mode_options`).
        """
        if guards not in ("inputs", "all"):
            raise MoefxError(f"Generator.compile(guards={guards!r}): use 'inputs' (guard the step's inputs only, "
                             "the default) or 'all' (torch's default guards)")
        if products not in ("auto", "reduce", "matmul"):
            raise MoefxError(f"Generator.compile(products={products!r}): use 'auto', 'reduce' (few-row products "
                             "as reductions) or 'matmul' (the graph's matrix products as captured)")
        if products == "auto" or (products == "reduce" and self.batch_size > REDUCE_MAX_ROWS):
            products = "matmul"
        options = kwargs.pop("options", None) or {}
        mode = kwargs.pop("mode", None)
        if mode is not None and guards == "inputs":
            from torch._inductor import list_mode_options

            options = {**list_mode_options(mode), **options}
        elif mode is not None:
            kwargs["mode"] = mode

        def compiled(graph, **extra):
            opts = dict(options)   # torch.compile pops guard_filter_fn from the dict it is given
            if guards == "inputs":
                opts.setdefault("guard_filter_fn", torch.compiler.skip_guard_on_all_nn_modules_unsafe)
            return torch.compile(graph, fullgraph=True, backend=backend, options=opts or None, **extra, **kwargs)

        self.compiled_graph = self.decode
        if products == "reduce":
            restride = self.weight_layout != "keep"    # under "keep" the stacked experts' reductions would stride
            self.compiled_graph = reduce_products(self.decode, experts=restride)
            if restride:
                moved = input_contiguous(self.compiled_graph)
                self.weight_layout_changed += moved
                self.weight_layout = "input_contiguous"
                if moved and not prefill:
                    self._prefill_fn = self.prefill    # compiled for the old strides, if it was compiled
        self.products = products
        self._decode_fn = compiled(self.compiled_graph)
        if prefill:
            self._prefill_fn = compiled(self.prefill, dynamic=True)
        return self

    def _check(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
        """MoefxError naming the fix for inputs the graphs cannot generate from (before any work)."""
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
            shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
            raise MoefxError(f"prompt_ids must be a [batch, tokens] tensor of token ids, got {shape}"
                             + (": for one prompt pass ids[None]" if isinstance(prompt_ids, torch.Tensor)
                                and prompt_ids.dim() == 1 else ""))
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise MoefxError(f"prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MoefxError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        B, T = prompt_ids.shape
        if B > self.batch_size:
            raise MoefxError(f"a batch of {B} prompts, but the generator's cache holds {self.batch_size}: convert it "
                             f"with batch_size >= {B}")
        if T + max_new_tokens > self.max_cache_len:
            raise MoefxError(f"{T} prompt tokens + {max_new_tokens} new ones exceed the cache of {self.max_cache_len}: "
                             "lower max_new_tokens or convert with a larger max_cache_len")
        if T < 1:
            raise MoefxError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or (vocab is not None and int(prompt_ids.max()) >= vocab)):
            raise MoefxError(f"prompt token ids range over [{int(prompt_ids.min())}, {int(prompt_ids.max())}], outside "
                             f"the model's vocabulary [0, {vocab})")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise MoefxError(f"attention_mask has shape {tuple(attention_mask.shape)}, prompt_ids {(B, T)}: "
                                 "give one 0/1 entry per prompt token")
            m = attention_mask.long()
            if bool((m[:, -1] == 0).any()) or bool((m[:, 1:] < m[:, :-1]).any()):
                rows = sorted({int(r) for r in torch.nonzero((m[:, 1:] < m[:, :-1]).any(-1) | (m[:, -1] == 0))[:, 0]})
                raise MoefxError(f"attention_mask rows {rows[:8]} are not left-padded (a 0 after a 1, or a 0 last): "
                                 "generation continues after each row's last token, so pad prompts on the left "
                                 "(moefx.gen.prompts.left_pad)")

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = None, progress: bool = False) -> torch.Tensor:
        """Token ids [B, T + n] (n <= max_new_tokens: all rows finished at EOS earlier). prompt_ids
        [B, T] are left-padded where attention_mask [B, T] is 0."""
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        self._check(prompt_ids, attention_mask, max_new_tokens)
        device = self.device
        B, T = prompt_ids.shape
        rows = B
        mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask.long()
        prompt_ids, mask = prompt_ids.to(device), mask.to(device)
        if B < self.batch_size:                                  # fill the cache's batch with masked rows
            extra = self.batch_size - B
            prompt_ids = torch.cat([prompt_ids, prompt_ids.new_full((extra, T), self.pad_token_id)])
            mask = torch.cat([mask, mask.new_zeros(extra, T)])
            mask[B:, -1] = 1
            B = self.batch_size
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        slots = torch.ones(B, self.max_cache_len, dtype=torch.long, device=device)
        slots[:, :T] = mask
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        stats = GenerationStats(prompt_tokens=rows * T)
        t0 = time.perf_counter()
        if T == 1:
            logits = self._decode_fn(prompt_ids, torch.zeros(1, dtype=torch.long, device=device), slots, positions)
        else:
            logits = self._prefill_fn(prompt_ids, torch.arange(T, device=device), slots, positions)
        stats.prefill_s = time.perf_counter() - t0
        last = positions[:, -1:]
        out = [prompt_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        bar = _bar(progress, max_new_tokens)
        for step in range(max_new_tokens):
            scores = logits[:, -1].float()
            # sampling draws from a CPU generator (reproducible across devices); greedy stays on the device
            token = next_tokens(scores.cpu() if sampling.do_sample else scores, sampling, gen).to(device)
            if eos is not None:
                token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
                finished |= token == eos
            out.append(token[:, None])
            stats.new_tokens += rows
            if bar is not None:
                bar.update(1)
            if step == max_new_tokens - 1 or (eos is not None and self._done(bool(finished[:rows].all()))):
                break
            last = last + 1
            t0 = time.perf_counter()
            logits = self._decode_fn(token[:, None], torch.tensor([T + step], device=device), slots, last)
            stats.decode_s.append(time.perf_counter() - t0)
        if bar is not None:
            bar.close()
        self.last_stats = stats
        return torch.cat(out, dim=1)[:rows]

    def _done(self, here: bool) -> bool:
        return self.agree(here) if self.agree is not None else here


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="tok", leave=False)
