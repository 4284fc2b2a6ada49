"""An offline real-text corpus for language-model tests and distillation runs.

The text is the Python standard library's own source code: it is present on every machine that
runs moefx, needs no download, and is real, structured text (code, comments, docstrings).

Tokenisation is byte-level: token id = byte value, vocabulary size 256 (``VOCAB_SIZE``). Files
are separated by one ``DOC_SEP`` byte (NUL, which does not occur in the selected sources).

Determinism
-----------
* The file list is the sorted (POSIX relative path) list of ``*.py`` files under
  ``sysconfig.get_paths()["stdlib"]``, minus the parts that Linux distributions split into
  other packages or patch (``test/``, ``idlelib``, ``tkinter``, ``distutils``, ``lib2to3``,
  ``site-packages`` ...; see ``_EXCLUDED_DIRS`` / ``_EXCLUDED_FILES``). No filesystem order,
  hash randomisation or mtime is involved.
* Which files are held out for validation depends only on each file's relative path (a SHA-256
  bucket), never on ``seed`` or ``max_bytes``: the validation files are a fixed set.
* ``seed`` only chooses the order in which training files are taken (again by SHA-256, so it
  is the same on every platform), which matters when ``max_bytes`` keeps only part of them.
* Window sampling (``lm_batches``) uses a seeded ``torch.Generator`` on the CPU.

So the corpus is byte-identical across machines that run the same Python version (the stdlib
changes between Python releases, so 3.11 and 3.12 give different corpora). ``corpus_fingerprint``
returns a SHA-256 of the selected bytes to check that two machines agree.

Example::

    >>> from moefx.data import load_corpus, lm_batches, fixed_eval_batches
    >>> train, val = load_corpus(max_bytes=1_000_000)
    >>> batches = lm_batches(train, batch_size=8, seq_len=128, steps=100, seed=0)
    >>> batches[0][0].shape
    torch.Size([8, 128])
    >>> evals = fixed_eval_batches(val, batch_size=8, seq_len=128, n=4)
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

__all__ = [
    "VOCAB_SIZE",
    "DOC_SEP",
    "corpus_files",
    "corpus_fingerprint",
    "load_corpus",
    "lm_batches",
    "fixed_eval_batches",
    "encode",
    "decode",
]

VOCAB_SIZE = 256
DOC_SEP = 0

# Top-level stdlib folders left out: test suites, GUI/IDE code and packages that distributions
# ship separately (Debian: python3-tk, idle, python3-distutils, python3-lib2to3, python3-venv,
# libpython3-testsuite), site-packages, and platform-specific build config.
_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "idlelib",
    "tkinter", "turtledemo", "distutils", "lib2to3", "ensurepip", "venv",
})
# Nested folders of test code, at any depth.
_EXCLUDED_NESTED = frozenset({"tests", "idle_test", "__pycache__"})
# Files that distributions patch or that are generated per platform.
_EXCLUDED_FILES = frozenset({"site.py", "sysconfig.py", "turtle.py"})
_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")

_DEFAULT_MAX_BYTES = 2_000_000


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _keep(rel: tuple[str, ...]) -> bool:
    if rel[0] in _EXCLUDED_DIRS or rel[0].startswith(_EXCLUDED_PREFIXES):
        return False
    if any(part in _EXCLUDED_NESTED for part in rel[1:-1]):
        return False
    if len(rel) == 1 and (rel[0] in _EXCLUDED_FILES or rel[0].startswith(_EXCLUDED_PREFIXES)):
        return False
    return True


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _is_val(rel: str, val_fraction: float) -> bool:
    return _digest("moefx-val:" + rel) < val_fraction * 2**64


@functools.lru_cache(maxsize=4)
def _all_files(root: str) -> tuple[str, ...]:
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        parts = Path(dirpath).relative_to(root).parts
        # Prune excluded folders so site-packages & co. are never walked.
        dirnames[:] = [d for d in dirnames if _keep((*parts, d, "x.py"))]
        for name in filenames:
            rel = (*parts, name)
            if name.endswith(".py") and _keep(rel):
                rels.append("/".join(rel))
    return tuple(sorted(rels))


def corpus_files(split: str | None = None, *, val_fraction: float = 0.1) -> list[str]:
    """Relative paths (POSIX, sorted) of the stdlib files the corpus draws from.

    ``split`` is None (all), ``"train"`` or ``"val"``; the split depends only on the path.
    """
    _check_fraction(val_fraction)
    files = _all_files(str(_stdlib_root()))
    if split is None:
        return list(files)
    if split not in ("train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', not {split!r}")
    want_val = split == "val"
    return [f for f in files if _is_val(f, val_fraction) == want_val]


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _collect(files: list[str], budget: int | None) -> bytes:
    root = _stdlib_root()
    chunks: list[bytes] = []
    used = 0
    for rel in files:
        if budget is not None and used >= budget:
            break
        data = (root / rel).read_bytes().replace(bytes([DOC_SEP]), b"") + bytes([DOC_SEP])
        if budget is not None:
            data = data[: budget - used]
        chunks.append(data)
        used += len(data)
    return b"".join(chunks)


def _corpus_bytes(max_bytes: int | None, seed: int, val_fraction: float) -> tuple[bytes, bytes]:
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2 (or None for everything), got {max_bytes}")
    _check_fraction(val_fraction)
    train_files = corpus_files("train", val_fraction=val_fraction)
    val_files = corpus_files("val", val_fraction=val_fraction)
    # Training order: a seeded, platform-independent shuffle. Validation order: fixed.
    train_files.sort(key=lambda f: (_digest(f"moefx-train:{seed}:{f}"), f))
    val_files.sort(key=lambda f: (_digest("moefx-val-order:" + f), f))
    if max_bytes is None:
        val_budget = train_budget = None
    else:
        val_budget = max(1, int(max_bytes * val_fraction))
        train_budget = max_bytes - val_budget
    return _collect(train_files, train_budget), _collect(val_files, val_budget)


def _to_tokens(data: bytes) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


def load_corpus(
    max_bytes: int | None = _DEFAULT_MAX_BYTES, seed: int = 0, *, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(train_tokens, val_tokens)``, 1-D LongTensors of byte ids in ``[0, 256)``.

    ``max_bytes`` bounds the total size (``val_fraction`` of it for validation, the rest for
    training; None takes every selected file). Validation files are a fixed held-out set chosen
    by path; ``seed`` changes only which training files come first. Identical across machines
    with the same Python version (see the module docstring).
    """
    train, val = _corpus_bytes(max_bytes, seed, val_fraction)
    return _to_tokens(train), _to_tokens(val)


def corpus_fingerprint(
    max_bytes: int | None = _DEFAULT_MAX_BYTES, seed: int = 0, *, val_fraction: float = 0.1
) -> str:
    """SHA-256 (hex) of the corpus ``load_corpus`` returns for these arguments."""
    train, val = _corpus_bytes(max_bytes, seed, val_fraction)
    h = hashlib.sha256()
    h.update(len(train).to_bytes(8, "big"))
    h.update(train)
    h.update(val)
    return h.hexdigest()


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D LongTensor."""
    return _to_tokens(text.encode("utf-8"))


def decode(tokens: torch.Tensor) -> str:
    """Inverse of ``encode`` (invalid UTF-8 sequences are replaced)."""
    return bytes(int(t) for t in tokens.reshape(-1).tolist()).decode("utf-8", errors="replace")


def _check_windows(tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")


def lm_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int = 0
) -> list[tuple[torch.Tensor]]:
    """``steps`` batches ``(input_ids,)`` of random windows, each ``[batch_size, seq_len]``.

    Window starts are drawn uniformly with ``torch.Generator().manual_seed(seed)``, so the
    same arguments give the same batches. Labels are the inputs shifted by one (the default in
    ``moefx.distill``). Batch ``i`` is ``result[i]``: pass the list to ``distill`` to train
    on batch ``step % len`` at each step.
    """
    _check_windows(tokens, batch_size, seq_len)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    n_starts = tokens.numel() - seq_len + 1
    if n_starts < 1:
        raise ValueError(
            f"corpus has {tokens.numel()} tokens, fewer than seq_len={seq_len}; "
            "load more bytes or shorten seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_starts, (steps, batch_size), generator=gen)
    offsets = torch.arange(seq_len)
    return [(tokens[starts[i, :, None] + offsets],) for i in range(steps)]


def fixed_eval_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, n: int
) -> list[tuple[torch.Tensor]]:
    """``n`` batches ``(input_ids,)`` of non-overlapping windows read from the start of ``tokens``.

    Window ``j`` of batch ``i`` covers ``tokens[(i*batch_size + j)*seq_len : ... + seq_len]``;
    no randomness. Raises ValueError when ``tokens`` is too short.
    """
    _check_windows(tokens, batch_size, seq_len)
    need = n * batch_size * seq_len
    if n < 1 or need > tokens.numel():
        raise ValueError(
            f"{n} batches of {batch_size}x{seq_len} need {need} tokens, have {tokens.numel()}; "
            "lower n / batch_size / seq_len or load more bytes"
        )
    windows = tokens[:need].reshape(n, batch_size, seq_len)
    return [(windows[i].clone(),) for i in range(n)]
