"""Decoder LMs with a static KV cache held in module buffers: what the generation graphs capture.

    lm = cached_lm(model, batch_size=2, max_cache_len=64)
    logits = lm(input_ids [B, T], cache_position [T], attention_mask [B, L], position_ids [B, T])

writes the keys and values of the T new tokens at `cache_position` of every layer's cache
(`key_cache_{i}` / `value_cache_{i}`, buffers [B, kv heads, L, head dim]) and attends over the
cache: attention_mask [B, L] marks the valid slots (0 for left padding), and a slot past a
token's own position is masked causally. The cache lives in registered buffers that the forward
mutates in place, so `torch.export` records the mutation on the buffers themselves: a prefill
graph (T dynamic) and a decode-step graph (T = 1, every shape static) exported from the same
module share one cache.

Hugging Face decoders run with a `transformers` StaticCache whose layers are re-pointed at the
buffers at the start of every forward (export swaps the module's buffers for fake ones while it
traces: a cache holding the original tensors would be captured as constants). The built-in
nanoGPT has its own cached forward (`moefx.models.nanogpt.NanoGPTWithCache`).
"""
from __future__ import annotations

import re

from torch import nn

from ..errors import MoefxError
from ..models.nanogpt import NanoGPT, NanoGPTWithCache

__all__ = ["HFCachedLM", "cached_lm", "is_cache_buffer"]

_CACHE_BUFFER = re.compile(r"(key_cache|value_cache|cumulative_length)_\d+")


def is_cache_buffer(name: str) -> bool:
    """Whether `name` is one of the cache buffers `cached_lm` registers (zeros before a prefill)."""
    return _CACHE_BUFFER.fullmatch(name) is not None


class HFCachedLM(nn.Module):
    """A Hugging Face causal LM with a static KV cache in buffers (see the module docstring)."""

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int):
        super().__init__()
        from transformers.cache_utils import StaticCache
        from transformers.configuration_utils import get_head_shapes

        config = model.config.get_text_config()
        self.model = model
        self.batch_size, self.max_cache_len = batch_size, max_cache_len
        self.cache = StaticCache(max_cache_len=max_cache_len, config=config)
        heads, head_dim = get_head_shapes(config)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.cache.early_initialization(batch_size, heads, head_dim, dtype, device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids, cache_position, attention_mask, position_ids):
        for i, layer in enumerate(self.cache.layers):
            layer.keys = getattr(self, f"key_cache_{i}")
            layer.values = getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True)
        return out.logits


def cached_lm(model: nn.Module, batch_size: int, max_cache_len: int) -> nn.Module:
    """The model with a static KV cache of `batch_size` x `max_cache_len` tokens in buffers.

    Takes a Hugging Face causal LM (anything with `.config` and Cache support) or the built-in
    NanoGPT; raises MoefxError for others."""
    if isinstance(model, NanoGPT):
        return NanoGPTWithCache(model, batch_size, max_cache_len)
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "generate") and hasattr(config, "num_hidden_layers"):
        if getattr(config, "is_encoder_decoder", False):
            raise MoefxError(f"{type(model).__name__} is an encoder-decoder model: moefx generation covers decoder-only "
                             "LMs (GPT-2, LLaMA, Mistral, Qwen2, nanoGPT, ...)")
        config.use_cache = True
        return HFCachedLM(model, batch_size, max_cache_len)
    raise MoefxError(f"cannot generate with {type(model).__name__}: give a Hugging Face causal LM or moefx's NanoGPT")
