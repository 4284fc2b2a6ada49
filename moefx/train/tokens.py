"""Training tokens: files memory-mapped from disk, text through a local tokenizer, or the shipped corpus,
cut into deterministic language-model batches that every data-parallel replica draws its share of.

    train, val = open_split("corpus.bin")              # uint16 .bin (nanoGPT), .npy, .txt, or None
    windows = Windows(train, batch=8, seq=256, seed=0, eval_tokens=val)
    ids, targets = windows.micro_batch(step=12, index=3)   # [8, 256] each, the same on every machine
    held_out = windows.eval_batches(4)                     # validation windows, from `val` only

Sources (`open_tokens`):
- `.bin`: a flat array of token ids as nanoGPT's `prepare.py` writes (uint16; `dtype="uint32"` for
  vocabularies over 65,536), memory-mapped: only the windows read are paged in;
- `.npy`: a 1-D integer array, memory-mapped (`numpy.load(mmap_mode="r")`);
- `.txt` (any other suffix): UTF-8 text, tokenised with the tokenizer in a local folder
  (`tokenizer=DIR`, never downloaded), or byte-level (ids 0..255) without one;
- None: the shipped `moefx.data` corpus (the Python standard library's source, byte-level).

Validation data (`open_split`): the shipped corpus has its own validation files; a user file's
last `HELD_OUT` fraction (5%) is held out, or `eval_path` names a separate file (nanoGPT's val.bin).
Training windows never read the held-out tokens.

Batches are a pure function of (seed, step, micro-batch index): micro-batch j of optimizer step s
is `batch` windows of seq + 1 tokens starting at offsets drawn from a generator seeded with
(seed, s, j). Inputs are the first seq tokens, targets the last seq (next-token prediction).
A step of G micro-batches (data-parallel replicas x accumulation steps) covers the same windows
whatever the world size, so the data cursor is just the step count (kept in checkpoints), a run
resumes exactly, and a run at world 4 sees the same data as one process accumulating 4
micro-batches.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..data import load_corpus
from ..errors import MoefxError
from ..gen.prompts import local_tokenizer

__all__ = ["open_tokens", "open_split", "HELD_OUT", "Windows", "Memmapped", "micro_index", "hash_seed"]

HELD_OUT = 0.05


def _memmap(path: Path, dtype: str) -> torch.Tensor:
    import numpy as np

    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise MoefxError(f"{path}: a token .npy must be a 1-D integer array, got {arr.ndim}-D {arr.dtype}")
    else:
        if dtype not in ("uint16", "uint32"):
            raise MoefxError(f"--data-dtype must be uint16 or uint32, got {dtype!r}")
        size = path.stat().st_size
        width = 2 if dtype == "uint16" else 4
        if size == 0:
            raise MoefxError(f"--data {path} is empty: a .bin token file holds {dtype} token ids (nanoGPT's "
                             "prepare.py writes them)")
        if size % width:
            raise MoefxError(f"{path} has {size} bytes, not a whole number of {dtype} tokens: is --data-dtype right?")
        arr = np.memmap(path, dtype=dtype, mode="r")
    return Memmapped(arr)


class Memmapped:
    """A memory-mapped token array read window by window as int64 (torch's uint16 / uint32 support
    few ops, and a read-only map cannot become a tensor without a copy)."""

    def __init__(self, arr):
        self.arr = arr

    def numel(self) -> int:
        return int(self.arr.shape[0])

    def __getitem__(self, index):
        return torch.from_numpy(self.arr[index.numpy()].astype("int64"))

    def max(self):
        return torch.tensor(int(self.arr.max()))

    def split(self, at: int) -> tuple["Memmapped", "Memmapped"]:
        return Memmapped(self.arr[:at]), Memmapped(self.arr[at:])


def open_tokens(path: str | None, *, dtype: str = "uint16", tokenizer: str | None = None):
    """The training tokens of `path` (see the module docstring): a 1-D tensor-like of token ids."""
    if path is None:
        train, _ = load_corpus()
        return train
    p = Path(path)
    if not p.exists():
        raise MoefxError(f"--data {path}: no such file")
    if p.suffix in (".bin", ".npy"):
        return _memmap(p, dtype)
    text = p.read_text(encoding="utf-8", errors="replace")
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    tok = local_tokenizer(tokenizer)
    if tok is None:
        raise MoefxError(f"--tokenizer {tokenizer}: no tokenizer files in that folder")
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def open_split(path: str | None, *, eval_path: str | None = None, dtype: str = "uint16",
               tokenizer: str | None = None) -> tuple:
    """(training tokens, validation tokens) of `path` (see the module docstring): the shipped corpus's
    own split for None, `eval_path`'s tokens when given, else the last HELD_OUT of the file's tokens."""
    if path is None and eval_path is None:
        return load_corpus()
    train = open_tokens(path, dtype=dtype, tokenizer=tokenizer)
    if eval_path is not None:
        return train, open_tokens(eval_path, dtype=dtype, tokenizer=tokenizer)
    n = train.numel()
    at = n - max(int(n * HELD_OUT), 1)
    if at < 2:
        raise MoefxError(f"--data {path} has {n} tokens: too few to hold out validation tokens; give --eval-data")
    return train.split(at) if isinstance(train, Memmapped) else (train[:at], train[at:])


def micro_index(replica: int, accum_index: int, replicas: int) -> int:
    """The micro-batch index (within a step) replica `replica` reads at accumulation step `accum_index`."""
    return accum_index * replicas + replica


def hash_seed(tag: str, seed: int, step: int, index: int) -> int:
    """A 63-bit seed from (tag, seed, step, index): the same on every machine and Python version."""
    digest = hashlib.sha256(f"{tag}/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Windows:
    """Deterministic LM micro-batches of `batch` x `seq` tokens from `tokens` (see the module docstring)."""

    def __init__(self, tokens, batch: int, seq: int, seed: int = 0, vocab_size: int | None = None,
                 eval_tokens=None):
        if batch < 1 or seq < 1:
            raise MoefxError(f"need --batch >= 1 and --seq >= 1, got {batch} and {seq}")
        for what, t in (("the data", tokens), ("the validation data", eval_tokens)):
            if t is None:
                continue
            n = t.numel()
            if n < seq + 1:
                raise MoefxError(f"{what} has {n} tokens, fewer than --seq + 1 = {seq + 1}: shorten --seq or give "
                                 "more data")
            if vocab_size is not None:
                top = int(t.max())
                if top >= vocab_size:
                    raise MoefxError(f"{what} has token id {top} but the model's vocabulary is {vocab_size}: give "
                                     "data tokenised for this model (or a model with a larger vocabulary)")
        self.tokens, self.batch, self.seq, self.seed = tokens, batch, seq, seed
        self.eval_tokens = eval_tokens

    def micro_batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [batch, seq], targets [batch, seq]) of micro-batch `index` of optimizer step `step`."""
        return self._windows(self.tokens, step, index)

    def _windows(self, tokens, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(hash_seed("moefx-windows", self.seed, step, index))
        starts = torch.randint(0, tokens.numel() - self.seq, (self.batch,), generator=g)
        idx = starts[:, None] + torch.arange(self.seq + 1)
        w = tokens[idx.reshape(-1)].reshape(self.batch, self.seq + 1).long()
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` fixed micro-batches for validation: from `eval_tokens` (held out) when given, else from the
        training tokens with step index -1 - i (never a training step's windows, but the same text)."""
        tokens = self.eval_tokens if self.eval_tokens is not None else self.tokens
        return [self._windows(tokens, -1 - i, 0) for i in range(n)]
