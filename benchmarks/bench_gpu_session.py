"""One GPU's worth of measurements in one run (what `gpu_session.sh` calls): decode and training on
the card, each against the dense model measured in the same run. A script, not a test.

    python benchmarks/bench_gpu_session.py                 # CUDA, bf16, ~3 min on an H100
    python benchmarks/bench_gpu_session.py --dry-run       # the same logic on the CPU: tiny sizes, fp32,
                                                           # Triton through its interpreter (CI runs it)

(1) decode step: a NanoGPT (--layers x --d, vocab 32768), PR-MoE every 2nd block (--experts, top-1,
    residual, dropless), one decode step at batch 1 and 16 after a --prompt token prefill, each
    generator's step under `Generator.compile(mode="reduce-overhead")` (CUDA graphs; --dry-run:
    aot_eager). Variants: dense; PR-MoE with Triton gating; PR-MoE with PyTorch gating (both on the
    gather / grouped-matmul experts path a decode step lowers to). The bound: the bytes one step
    must read (every non-expert weight, each distinct chosen expert once, the valid KV cache) over
    the card's copy bandwidth (a device-to-device copy timed in the same rounds).
(2) training step (bf16 weights, AdamW, forward + loss + backward + step), B x T tokens: the dense
    model vs PR-MoE with the grouped-matmul experts path (lowering.experts = "gather") with Triton
    and with PyTorch gating, and the buffer path (batched matmuls over [E, C, d]) with Triton gating.
Variants are timed in turn, round after round (`_timing.interleaved_ms`, each call synchronised).
Writes <out>/gpu_session_<card>.md (--dry-run: gpu_session_dry_run.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings

if "--dry-run" in sys.argv:                   # before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _timing import interleaved_ms, table  # noqa: E402
from bench_generate import distinct_experts, kv_bytes, param_bytes  # noqa: E402

import moefx  # noqa: E402
from moefx.fileio import write_atomic  # noqa: E402
from moefx.models.nanogpt import NanoGPT, NanoGPTConfig  # noqa: E402


def plan(a, gating: str, experts: str = "auto") -> dict:
    return {"moe": {"experts": a.experts, "every": 2, "top_k": 1, "residual": True, "drop_tokens": False,
                    "init_noise": 0.1},
            "lowering": {"gating": gating, "experts": experts}}


def model_of(a, device, dtype) -> NanoGPT:
    torch.manual_seed(0)
    cfg = NanoGPTConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.d, vocab_size=a.vocab,
                        block_size=a.prompt + 8)
    return NanoGPT(cfg).to(device=device, dtype=dtype).eval()


def synced(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


def decode_rows(a, device, dtype, log) -> list[dict]:
    model = model_of(a, device, dtype)
    n = a.copy_mb * 2 ** 20 // 2
    src, dst = torch.randn(n, device=device, dtype=torch.bfloat16), torch.empty(n, device=device, dtype=torch.bfloat16)
    rows = []
    for B in a.batches:
        L = a.prompt + 8
        ids = torch.randint(0, a.vocab, (B, a.prompt), generator=torch.Generator().manual_seed(B)).to(device)
        gens = {"dense": moefx.convert_generator(model, {}, (ids,), max_cache_len=L),
                "PR-MoE triton gating": moefx.convert_generator(model, plan(a, "triton"), (ids,), max_cache_len=L),
                "PR-MoE torch gating": moefx.convert_generator(model, plan(a, "torch"), (ids,), max_cache_len=L)}
        with torch.no_grad():
            outs = {name: g.generate(ids, max_new_tokens=2) for name, g in gens.items()}
            used = distinct_experts(gens["PR-MoE triton gating"].decode,
                                    lambda: gens["PR-MoE triton gating"].decode(*_step_args(outs["dense"], a, B)))
            steps = {}
            for name, g in gens.items():
                if a.dry_run:
                    g.compile(backend="aot_eager")
                else:
                    g.compile(backend="inductor", mode="reduce-overhead")
                args = _step_args(outs[name], a, B)
                steps[name] = synced(lambda g=g, args=args: g._decode_fn(*args), device)
                steps[name]()
            logits = {name: fn_out.float() for name, fn_out in
                      ((name, gens[name]._decode_fn(*_step_args(outs[name], a, B))) for name in gens)}
            diff = float((logits["PR-MoE triton gating"] - logits["PR-MoE torch gating"]).abs().max())
            steps["copy"] = synced(lambda: dst.copy_(src), device)
            ms = interleaved_ms(steps, rounds=a.rounds, reps=a.reps, warmup=2)
        rest, per_expert = param_bytes(gens["PR-MoE triton gating"].decode)
        read = rest + sum(per_expert[i] * used.get(i, 0) for i in per_expert) + kv_bytes(
            gens["PR-MoE triton gating"].decode, a.prompt)
        bandwidth = 2 * src.numel() * src.element_size() / (ms["copy"] / 1e3)
        bound = read / bandwidth * 1e3
        log(f"  decode B={B}: {ms}; triton vs torch gating max|diff| {diff:.2e}")
        for name in gens:
            rows.append({"part": "decode step", "batch": B, "variant": name, "ms": ms[name],
                         "/ dense": ms[name] / ms["dense"],
                         "/ bound": ms[name] / bound if name != "dense" else "",
                         "note": (f"bound {bound:.3g} ms: {read / 2**20:.1f} MiB read at {bandwidth / 1e9:.0f} GB/s"
                                  if name == "PR-MoE triton gating" else
                                  f"logits vs triton gating: max|diff| {diff:.1e}" if name == "PR-MoE torch gating"
                                  else "")})
    return rows


def _step_args(out, a, B):
    """The decode step's inputs at position `prompt` (the token generate() chose there)."""
    L = a.prompt + 8
    device = out.device
    token = torch.empty(B, 1, dtype=torch.long, device=device).copy_(out[:, a.prompt:a.prompt + 1])
    return (token, torch.tensor([a.prompt], device=device), torch.ones(B, L, dtype=torch.long, device=device),
            torch.full((B, 1), a.prompt, dtype=torch.long, device=device))


def train_rows(a, device, dtype, log) -> list[dict]:
    model = model_of(a, device, dtype)
    B, T = a.train_batch, a.train_seq
    ids = torch.randint(0, a.vocab, (B, T + 1), generator=torch.Generator().manual_seed(7)).to(device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    variants = {"dense": None, "PR-MoE grouped mm, triton gating": plan(a, "triton", "gather"),
                "PR-MoE grouped mm, torch gating": plan(a, "torch", "gather"),
                "PR-MoE buffer (bmm), triton gating": plan(a, "triton", "buffer")}
    steps, losses = {}, {}
    for name, p in variants.items():
        dense = model_of(a, device, dtype).train()
        gm = dense if p is None else moefx.convert(dense, p, (x,), train=True)
        opt = torch.optim.AdamW(gm.parameters(), lr=1e-4)

        def step(gm=gm, opt=opt, moe=p is not None):
            logits = gm(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            if moe:
                loss = loss + moefx.aux_loss(gm)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        losses[name] = float(step())
        steps[name] = synced(step, device)
    del model
    ms = interleaved_ms(steps, rounds=a.rounds, reps=a.reps, warmup=2)
    log(f"  training step B={B} T={T}: {ms}")
    return [{"part": "training step", "batch": f"{B} x {T}", "variant": name, "ms": ms[name],
             "/ dense": ms[name] / ms["dense"], "/ bound": "", "note": f"first loss {losses[name]:.4f}"}
            for name in variants]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--copy-mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if a.dry_run:
        a.layers, a.d, a.heads, a.vocab, a.experts, a.prompt = 2, 32, 2, 64, 4, 6
        a.batches, a.train_batch, a.train_seq, a.copy_mb, a.rounds, a.reps = [1, 3], 2, 8, 1, 2, 1
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu_session needs a CUDA device (or --dry-run)")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    warnings.simplefilter("ignore")
    log = lambda s: print(s, flush=True)  # noqa: E731
    card = "dry_run" if a.dry_run else torch.cuda.get_device_name().replace(" ", "_")
    from moefx.kernels.gating import LAUNCHES

    rows = decode_rows(a, device, dtype, log) + train_rows(a, device, dtype, log)
    launches = sum(LAUNCHES.values())
    if launches == 0:
        raise SystemExit("no Triton gating kernel ran: the 'triton gating' variants did not run Triton")
    text = "\n".join([
        f"# GPU session: decode and training step ({card})", "",
        f"`python benchmarks/bench_gpu_session.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{datetime.date.today()}, torch {torch.__version__}", "",
        f"NanoGPT {a.layers} x {a.d} ({a.heads} heads, vocab {a.vocab}), PR-MoE every 2nd block ({a.experts} "
        f"experts, top-1, residual, dropless), {dtype}; decode after a {a.prompt}-token prefill; median over "
        f"{a.rounds} interleaved rounds of {a.reps} calls. Triton gating kernel launches seen from Python "
        f"(CUDA-graph replays are not counted): {launches}.", "",
        table(rows, ["part", "batch", "variant", "ms", "/ dense", "/ bound", "note"]), ""])
    print(text)
    os.makedirs(a.out, exist_ok=True)
    write_atomic(os.path.join(a.out, f"gpu_session_{card}.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
