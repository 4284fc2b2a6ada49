"""The built-in model zoo: tiny, randomly initialised dense Transformers built from configs in code.

Nothing is ever downloaded: every model is built from a config written here, with weights drawn
from torch's global RNG (seeded by `moefx.models.load_model`). Each builtin pairs a builder with
an example-input maker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .nanogpt import VOCAB, NanoGPT, NanoGPTConfig

__all__ = ["REGISTRY", "Builtin", "EncoderLM"]


class EncoderLM(nn.Module):
    """Token ids -> nn.Embedding -> nn.TransformerEncoder (post-norm) -> Linear head."""

    def __init__(self, vocab_size: int = VOCAB, d_model: int = 32, nhead: int = 4,
                 num_layers: int = 4, dim_feedforward: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)))


_HF_COMMON = dict(use_cache=False, attn_implementation="sdpa")


def _gpt2(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64) -> nn.Module:
    """GPT2LMHeadModel (Conv1D projections, i.e. addmm) from a GPT2Config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **_HF_COMMON,
    )
    return GPT2LMHeadModel(config)


def _gpt2_medium_24() -> nn.Module:
    """GPT-2 medium shape (24 x 1024, 16 heads, 50257 vocab): ~355M parameters."""
    return _gpt2(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)


def _llama_like(family: str, **extra) -> nn.Module:
    """Llama-family causal LM (llama / mistral / qwen2): RMSNorm, RoPE, SwiGLU, GQA."""
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    config = config_cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.0, tie_word_embeddings=False, **_HF_COMMON, **extra,
    )
    return model_cls(config)


def _llama() -> nn.Module:
    """LlamaForCausalLM: 4 blocks, hidden 32, 4 query / 2 kv heads (GQA), SwiGLU MLP."""
    return _llama_like("Llama")


def _mistral() -> nn.Module:
    """MistralForCausalLM: as llama-tiny, sliding-window attention disabled."""
    return _llama_like("Mistral", sliding_window=None)


def _qwen2() -> nn.Module:
    """Qwen2ForCausalLM: as llama-tiny plus q/k/v biases."""
    return _llama_like("Qwen2", use_sliding_window=False)


def _bert() -> nn.Module:
    """BertForMaskedLM: 4 post-norm blocks, hidden 32, GELU MLP."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **_HF_COMMON,
    )
    return BertForMaskedLM(config)


def _vit() -> nn.Module:
    """ViTForImageClassification: 32x32 images, 8x8 patches, hidden 32, 10 classes."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=10, attn_implementation="sdpa",
    )
    return ViTForImageClassification(config)


def _t5(feed_forward_proj: str = "relu") -> nn.Module:
    """T5ForConditionalGeneration: 2 encoder + 2 decoder blocks, d_model 32."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, dropout_rate=0.0, feed_forward_proj=feed_forward_proj,
        decoder_start_token_id=0, pad_token_id=0, **_HF_COMMON,
    )
    return T5ForConditionalGeneration(config)


def _t5_gated() -> nn.Module:
    """T5 with a gated-GELU feed-forward (T5 v1.1 style)."""
    return _t5("gated-gelu")


def _encoder() -> nn.Module:
    """torch.nn.TransformerEncoder (batch_first, post-norm) with embedding and head."""
    return EncoderLM()


def _nanogpt() -> nn.Module:
    """NanoGPT with 4 blocks, 4 heads, n_embd 64, block_size 64."""
    return NanoGPT(NanoGPTConfig())


def _token_ids(batch: int, seq: int, g: torch.Generator) -> tuple:
    """(input_ids [batch, seq],)."""
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),)


def _gpt2_medium_ids(batch: int, seq: int, g: torch.Generator) -> tuple:
    """(input_ids [batch, seq],) over the GPT-2 vocabulary."""
    return (torch.randint(0, 50257, (batch, seq), generator=g),)


def _t5_inputs(batch: int, seq: int, g: torch.Generator) -> tuple:
    """(input_ids, attention_mask, decoder_input_ids), all [batch, seq]: forward's order."""
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    dec = torch.randint(1, VOCAB, (batch, seq), generator=g)
    return ids, torch.ones(batch, seq, dtype=torch.long), dec


def _pixels(batch: int, seq: int, g: torch.Generator) -> tuple:
    """(pixel_values [batch, 3, 32, 32],); seq is ignored."""
    return (torch.randn(batch, 3, 32, 32, generator=g),)


@dataclass(frozen=True)
class Builtin:
    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, torch.Generator], tuple]
    blocks: int


REGISTRY: dict[str, Builtin] = {
    "gpt2-tiny": Builtin("GPT2LMHeadModel, 4 blocks, d=32, Conv1D/addmm", _gpt2, _token_ids, 4),
    "llama-tiny": Builtin("LlamaForCausalLM, 4 blocks, d=32, SwiGLU, GQA 4/2", _llama,
                           _token_ids, 4),
    "mistral-tiny": Builtin("MistralForCausalLM, 4 blocks, d=32, SwiGLU, GQA 4/2", _mistral,
                             _token_ids, 4),
    "qwen2-tiny": Builtin("Qwen2ForCausalLM, 4 blocks, d=32, SwiGLU, GQA 4/2, qkv bias",
                           _qwen2, _token_ids, 4),
    "bert-tiny": Builtin("BertForMaskedLM, 4 post-norm blocks, d=32", _bert, _token_ids, 4),
    "vit-tiny": Builtin("ViTForImageClassification, 4 blocks, d=32, 32x32 images, patch 8",
                         _vit, _pixels, 4),
    "t5-tiny": Builtin("T5ForConditionalGeneration, 2+2 blocks, d=32, ReLU FFN; inputs "
                        "(input_ids, attention_mask, decoder_input_ids)", _t5, _t5_inputs, 4),
    "t5gated-tiny": Builtin("T5ForConditionalGeneration, 2+2 blocks, d=32, gated-GELU FFN",
                             _t5_gated, _t5_inputs, 4),
    "encoder-tiny": Builtin("nn.TransformerEncoder (post-norm, batch_first) + embedding + "
                             "head, 4 blocks, d=32", _encoder, _token_ids, 4),
    "nanogpt-tiny": Builtin("NanoGPT (this module), 4 blocks, d=64, SDPA causal attention",
                             _nanogpt, _token_ids, 4),
    "gpt2-medium-24": Builtin("GPT-2 medium shape, 24 blocks, d=1024, ~355M params "
                               "(use device='meta')", _gpt2_medium_24, _gpt2_medium_ids, 24),
}
