"""Built-in model zoo: tiny, randomly initialised dense Transformers for tests and examples.

``load_model(name)`` returns ``(model, example_inputs)``: the model in eval mode and a tuple of
positional inputs for ``model(*example_inputs)``. ``name`` is a builtin (see
``BUILTIN_MODELS``) or ``"package.module:function"``, a function taking no arguments that
returns ``(model, example_inputs)``. Nothing is ever downloaded: every model is built from a
config written here, with weights drawn after ``torch.manual_seed(seed)``.

All builtins export with ``torch.export.export(..., strict=False)`` with every dimension of
every input marked ``Dim.AUTO``; batch and sequence stay dynamic (ViT: batch only).

``NanoGPT`` / ``NanoGPTConfig`` are a small, self-contained nanoGPT-style causal LM that is also
meant for real training runs.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MoefxError

__all__ = [
    "BUILTIN_MODELS",
    "ModelError",
    "NanoGPT",
    "NanoGPTConfig",
    "load_model",
    "num_blocks",
]

VOCAB = 128  # vocabulary of every tiny language model


class ModelError(MoefxError, ValueError):
    """A model name cannot be resolved, or a model function returned the wrong thing."""


# --------------------------------------------------------------------------------------------
# nanoGPT
# --------------------------------------------------------------------------------------------


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
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ([B, T]); returns [B, T + new]."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits = self(idx_cond)[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


# --------------------------------------------------------------------------------------------
# torch.nn.TransformerEncoder with token embedding and head
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Factories (each builds a model on the current default device; no weights are downloaded)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, torch.Generator], tuple]
    blocks: int


_REGISTRY: dict[str, _Builtin] = {
    "gpt2-tiny": _Builtin("GPT2LMHeadModel, 4 blocks, d=32, Conv1D/addmm", _gpt2, _token_ids, 4),
    "llama-tiny": _Builtin("LlamaForCausalLM, 4 blocks, d=32, SwiGLU, GQA 4/2", _llama,
                           _token_ids, 4),
    "mistral-tiny": _Builtin("MistralForCausalLM, 4 blocks, d=32, SwiGLU, GQA 4/2", _mistral,
                             _token_ids, 4),
    "qwen2-tiny": _Builtin("Qwen2ForCausalLM, 4 blocks, d=32, SwiGLU, GQA 4/2, qkv bias",
                           _qwen2, _token_ids, 4),
    "bert-tiny": _Builtin("BertForMaskedLM, 4 post-norm blocks, d=32", _bert, _token_ids, 4),
    "vit-tiny": _Builtin("ViTForImageClassification, 4 blocks, d=32, 32x32 images, patch 8",
                         _vit, _pixels, 4),
    "t5-tiny": _Builtin("T5ForConditionalGeneration, 2+2 blocks, d=32, ReLU FFN; inputs "
                        "(input_ids, attention_mask, decoder_input_ids)", _t5, _t5_inputs, 4),
    "t5gated-tiny": _Builtin("T5ForConditionalGeneration, 2+2 blocks, d=32, gated-GELU FFN",
                             _t5_gated, _t5_inputs, 4),
    "encoder-tiny": _Builtin("nn.TransformerEncoder (post-norm, batch_first) + embedding + "
                             "head, 4 blocks, d=32", _encoder, _token_ids, 4),
    "nanogpt-tiny": _Builtin("NanoGPT (this module), 4 blocks, d=64, SDPA causal attention",
                             _nanogpt, _token_ids, 4),
    "gpt2-medium-24": _Builtin("GPT-2 medium shape, 24 blocks, d=1024, ~355M params "
                               "(use device='meta')", _gpt2_medium_24, _gpt2_medium_ids, 24),
}

#: builtin name -> one-line description
BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in _REGISTRY.items()}


def _unknown(name: str, why: str) -> ModelError:
    return ModelError(
        f"cannot load model {name!r}: {why}. Use a builtin name "
        f"({', '.join(sorted(BUILTIN_MODELS))}) or 'package.module:function' naming a function "
        "of no arguments that returns (model, example_inputs)."
    )


def num_blocks(name: str) -> int:
    """Number of Transformer blocks of a builtin (T5: encoder + decoder blocks)."""
    if name not in _REGISTRY:
        raise _unknown(name, "not a builtin model")
    return _REGISTRY[name].blocks


def _load_function(name: str, device: torch.device) -> tuple[nn.Module, tuple]:
    """Import ``package.module:function``, call it, validate and move the result to device."""
    module_name, _, func_name = name.partition(":")
    if not module_name or not func_name:
        raise _unknown(name, "expected the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _unknown(name, f"cannot import module {module_name!r} ({e})") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise _unknown(name, f"module {module_name!r} has no function {func_name!r}")
    with device:
        result = func()
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise _unknown(
            name, f"{func_name}() returned {type(result).__name__}, not (model, example_inputs)"
        )
    model, inputs = result
    if not isinstance(model, nn.Module):
        raise _unknown(name, f"{func_name}() returned a {type(model).__name__} as the model, "
                             "not a torch.nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise _unknown(name, f"{func_name}() returned {type(inputs).__name__} as the example "
                             "inputs, not a tuple of positional arguments")
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return model.to(device).eval(), inputs


def load_model(
    name: str, *, device: str | torch.device = "cpu", seed: int = 0, batch: int = 2,
    seq: int = 8,
) -> tuple[nn.Module, tuple]:
    """Build a model and example inputs: ``(model.eval(), positional_inputs)``.

    ``name`` is a key of ``BUILTIN_MODELS`` or ``"package.module:function"``. Weights are drawn
    after ``torch.manual_seed(seed)``; example inputs come from a generator seeded with ``seed``.
    With ``device="meta"`` the model is built under ``torch.device("meta")`` (no memory) and the
    inputs are meta tensors. ``batch``/``seq`` size the builtin inputs (ViT ignores ``seq``);
    a ``package.module:function`` model is built under the device context, moved to ``device``,
    and its inputs are used as returned.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    if name not in _REGISTRY:
        if ":" in name:
            return _load_function(name, device)
        raise _unknown(name, "not a builtin model")
    spec = _REGISTRY[name]
    with device:
        model = spec.build()
    inputs = spec.inputs(batch, seq, torch.Generator().manual_seed(seed))
    return model.eval(), tuple(x.to(device) for x in inputs)
