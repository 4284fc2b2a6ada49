"""A small, self-contained nanoGPT-style causal LM (Karpathy's nanoGPT), for tests, examples and real
training runs: `NanoGPT(NanoGPTConfig(...))`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NanoGPT", "NanoGPTConfig", "NanoGPTWithCache", "VOCAB"]

VOCAB = 128  # vocabulary of every tiny language model


@dataclass
class NanoGPTConfig:
    """Hyper-parameters of :class:`NanoGPT` (names follow Karpathy's nanoGPT)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    vocab_size: int = VOCAB
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection and SDPA."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # [B, nh, T, hs]
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    """nanoGPT-style causal LM: ``forward(idx)`` -> logits ``[B, T, vocab]``.

    ``forward(idx, targets)`` returns ``(logits, loss)`` with the mean cross-entropy over all
    positions (targets equal to -1 are ignored). The LM head is tied to the token embedding.
    """

    def __init__(self, config: NanoGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2 scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (wte is tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        torch._check(
            T <= self.config.block_size,
            lambda: f"sequence length {T} exceeds block_size {self.config.block_size}",
        )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
        top_k: int | None = None, do_sample: bool = True,
    ) -> torch.Tensor:
        """Sample (or, with do_sample=False, pick greedily) ``max_new_tokens`` tokens after ``idx``
        ([B, T]), running the full forward every step (no cache); returns [B, T + new]."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits = self(idx_cond)[:, -1, :]
            if not do_sample:
                idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
                continue
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


class NanoGPTWithCache(nn.Module):
    """NanoGPT with a static KV cache in buffers (see `moefx.gen.cache`).

    forward(input_ids [B, T], cache_position [T], attention_mask [B, L], position_ids [B, T])
    -> logits [B, T, V]: the blocks' own modules (ln, c_attn, c_proj, mlp) run as in NanoGPT's
    forward; the attention writes its keys / values at cache_position and attends over the cache
    (slot j is visible to token t when j <= cache_position[t] and attention_mask[:, j] != 0).
    """

    def __init__(self, model: NanoGPT, batch_size: int, max_cache_len: int):
        super().__init__()
        cfg = model.config
        if max_cache_len > cfg.block_size:
            raise ValueError(f"max_cache_len {max_cache_len} exceeds NanoGPT's block_size {cfg.block_size}")
        self.model = model
        self.batch_size, self.max_cache_len = batch_size, max_cache_len
        hs = cfg.n_embd // cfg.n_head
        dtype = model.lm_head.weight.dtype
        device = model.lm_head.weight.device
        for i in range(cfg.n_layer):
            self.register_buffer(f"key_cache_{i}", torch.zeros(batch_size, cfg.n_head, max_cache_len, hs, dtype=dtype,
                                                               device=device), persistent=False)
            self.register_buffer(f"value_cache_{i}", torch.zeros(batch_size, cfg.n_head, max_cache_len, hs,
                                                                 dtype=dtype, device=device), persistent=False)

    def forward(self, input_ids, cache_position, attention_mask, position_ids):
        m = self.model
        B, T = input_ids.shape
        slots = torch.arange(self.max_cache_len, device=input_ids.device)
        visible = (slots[None, :] <= cache_position[:, None])[None, None] & (attention_mask != 0)[:, None, None, :]
        x = m.transformer.drop(m.transformer.wte(input_ids) + m.transformer.wpe(position_ids))
        for i, block in enumerate(m.transformer.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.n_embd, dim=2)
            hs = attn.n_embd // attn.n_head
            q = q.view(B, T, attn.n_head, hs).transpose(1, 2)
            k = k.view(B, T, attn.n_head, hs).transpose(1, 2)
            v = v.view(B, T, attn.n_head, hs).transpose(1, 2)
            keys = getattr(self, f"key_cache_{i}").index_copy_(2, cache_position, k)
            values = getattr(self, f"value_cache_{i}").index_copy_(2, cache_position, v)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
            y = y.transpose(1, 2).contiguous().view(B, T, attn.n_embd)
            x = x + attn.resid_dropout(attn.c_proj(y))
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.transformer.ln_f(x))

