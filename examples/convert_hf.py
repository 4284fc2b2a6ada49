"""Convert a Hugging Face model into a PR-MoE end to end, check it, and train it for a few steps.

    python examples/convert_hf.py                       # LLaMA-style model, built from a config
    python examples/convert_hf.py --arch gpt2 --plan examples/plans/tiny_pr_moe.toml

Nothing is downloaded: the model is built from a config with random weights. With a real
checkpoint you would call `AutoModelForCausalLM.from_pretrained(...)` instead; the rest is the same.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import moefx


def build(arch: str):
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--plan", default="examples/plans/tiny_pr_moe.toml")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    torch.manual_seed(0)
    model = build(args.arch).eval()
    ids = torch.randint(0, 256, (2, 16))
    plan = moefx.Plan.from_file(args.plan)

    # 1. What the analysis sees: one FFN per block, found from the dataflow.
    for ffn in moefx.find_ffns(moefx.capture(model, (ids,))):
        print(f"block {ffn.block}: {ffn.module_path}  d={ffn.d} f={ffn.f} {ffn.activation}")

    # 2. Convert, then check the function is preserved (upcycled, dropless plan).
    moe_model = moefx.convert(model, plan, example_inputs=(ids,))
    print(moefx.dump(moe_model, "table"))
    other = torch.randint(0, 256, (3, 11))  # another batch size and sequence length
    with torch.no_grad():
        diff = (moe_model(other).logits - model(other).logits).abs().max().item()
    print(f"max |moe - dense| on a new shape: {diff:.2e}")

    # 3. Train: task loss + load-balancing loss; every MoE piece gets gradients.
    opt = torch.optim.AdamW(moe_model.parameters(), lr=1e-3)
    for step in range(args.steps):
        logits = moe_model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        total = loss + moefx.aux_loss(moe_model)
        opt.zero_grad()
        total.backward()
        opt.step()
        print(f"step {step}: lm {loss.item():.4f}  aux {moefx.aux_loss(moe_model).item():.4f}")


if __name__ == "__main__":
    main()
