"""Small hand-written Transformers, one FFN pattern each, for tests/test_ffn_patterns.py.

Every model: token ids [B, T] -> embedding -> `blocks` pre-norm blocks (causal sdpa attention with a
fused qkv projection, then the FFN, each on the residual stream) -> final LayerNorm -> head
(no bias). The FFN is built by `FFNS[kind](d, f)`; `ffn_params(kind, d, f)` is its parameter
count, written out from the sizes, and `base_params(d, vocab, blocks)` the count of everything else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D, FF, VOCAB, BLOCKS = 32, 64, 64, 2


class Attention(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class FusedGLU(nn.Module):
    """One up projection d -> 2f cut into gate and up halves (Phi-3, ChatGLM), act(gate) * up, down."""

    def __init__(self, d: int, f: int, cut: str = "chunk", bias: bool = False, act=F.silu):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)
        self.f, self.cut, self.act = f, cut, act

    def forward(self, x):
        h = self.gate_up(x)
        if self.cut == "chunk":
            gate, up = h.chunk(2, dim=-1)
        elif self.cut == "split":
            gate, up = torch.split(h, self.f, dim=-1)
        else:  # slicing
            gate, up = h[..., :self.f], h[..., self.f:]
        return self.down(self.act(gate) * up)


class EinsumFFN(nn.Module):
    """A JAX / Mesh-TF port: einsum linears. layout "in_out": weights stored [in, out], activation first;
    "out_in": weights stored [out, in], the up with the weight operand first."""

    def __init__(self, d: int, f: int, layout: str = "in_out"):
        super().__init__()
        self.layout = layout
        if layout == "in_out":
            self.wi, self.wo = nn.Parameter(torch.randn(d, f) / d ** 0.5), nn.Parameter(torch.randn(f, d) / f ** 0.5)
        else:
            self.wi, self.wo = nn.Parameter(torch.randn(f, d) / d ** 0.5), nn.Parameter(torch.randn(d, f) / f ** 0.5)

    def forward(self, x):
        if self.layout == "in_out":
            h = F.gelu(torch.einsum("btd,df->btf", x, self.wi))
            return torch.einsum("btf,fd->btd", h, self.wo)
        h = torch.relu(torch.einsum("fd,...d->...f", self.wi, x))
        return torch.einsum("...f,df->...d", h, self.wo)


class DropoutMLP(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 (encoder-decoder / ViT code)."""

    def __init__(self, d: int, f: int, p: float = 0.1):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d, f), nn.Dropout(p), nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class NormFormerMLP(nn.Module):
    """fc1 -> GELU -> LayerNorm over f -> fc2 (NormFormer): parameters inside the FFN middle."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, f), nn.LayerNorm(f), nn.Linear(f, d)
        with torch.no_grad():  # not the identity LayerNorm: its weights must matter
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


FFNS = {
    "fused-chunk": lambda d, f: FusedGLU(d, f, "chunk"),
    "fused-split": lambda d, f: FusedGLU(d, f, "split"),
    "fused-slice": lambda d, f: FusedGLU(d, f, "slice", bias=True, act=F.gelu),
    "einsum-in-out": lambda d, f: EinsumFFN(d, f, "in_out"),
    "einsum-out-in": lambda d, f: EinsumFFN(d, f, "out_in"),
    "dropout": DropoutMLP,
    "normformer": NormFormerMLP,
}


def ffn_params(kind: str, d: int = D, f: int = FF) -> int:
    """The parameters of one dense FFN of `kind`, from its sizes."""
    if kind in ("fused-chunk", "fused-split"):
        return d * 2 * f + f * d                       # gate_up [2f, d], down [d, f], no biases
    if kind == "fused-slice":
        return d * 2 * f + 2 * f + f * d + d           # with biases
    if kind.startswith("einsum"):
        return d * f + f * d
    if kind == "dropout":
        return d * f + f + f * d + d
    if kind == "normformer":
        return d * f + f + 2 * f + f * d + d           # fc1, LayerNorm(f) weight + bias, fc2
    raise KeyError(kind)


def base_params(d: int = D, vocab: int = VOCAB, blocks: int = BLOCKS) -> int:
    """Everything but the FFNs: embedding, per block 2 LayerNorms + qkv + proj, final norm, head."""
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d
    return vocab * d + blocks * block + 2 * d + d * vocab


class TinyLM(nn.Module):
    def __init__(self, kind: str, d: int = D, f: int = FF, vocab: int = VOCAB, blocks: int = BLOCKS):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln1": nn.LayerNorm(d), "attn": Attention(d), "ln2": nn.LayerNorm(d),
                                                   "ffn": FFNS[kind](d, f)}) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b["attn"](b["ln1"](h))
            h = h + b["ffn"](b["ln2"](h))
        return self.head(self.norm(h))


def tiny_model(kind: str, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(kind).eval()


def phi3(seed: int = 0, blocks: int = BLOCKS) -> nn.Module:
    """Hugging Face Phi3ForCausalLM (fused gate_up_proj, chunked), random init, tiny sizes."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=blocks, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    return transformers.Phi3ForCausalLM(config).eval()


def phi3_base_params(d: int = D, vocab: int = VOCAB, blocks: int = BLOCKS, heads: int = 4, kv_heads: int = 2) -> int:
    """Phi-3 without its MLPs: embedding, per block RMSNorm x2 + qkv_proj + o_proj, final norm, lm_head."""
    head_dim = d // heads
    qkv = d * (heads + 2 * kv_heads) * head_dim
    block = 2 * d + qkv + d * d
    return vocab * d + blocks * block + d + d * vocab


def fused_chunk_lm():
    """`ffn_pattern_models:fused_chunk_lm` for moefx's model loader: (model, (input_ids,))."""
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return tiny_model("fused-chunk"), (ids,)
