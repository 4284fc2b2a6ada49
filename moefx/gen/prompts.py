"""Prompts from the command line: token-id lists or text (with a local tokenizer), left-padded into a batch."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MoefxError

__all__ = ["parse_prompt_ids", "left_pad", "local_tokenizer", "encode", "replica_rows"]


def parse_prompt_ids(text: str, vocab_size: int | None = None) -> list[list[int]]:
    """"1,2,3;4,5" -> [[1, 2, 3], [4, 5]] (rows separated by ';'); MoefxError for a malformed or out-of-vocabulary id."""
    rows = []
    for part in text.split(";"):
        try:
            row = [int(x) for x in part.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise MoefxError(f"--prompt-ids {text!r}: give comma-separated token ids, rows separated by ';' "
                             "(e.g. 1,2,3;4,5)") from None
        if not row:
            raise MoefxError(f"--prompt-ids {text!r} has an empty row")
        negative = [t for t in row if t < 0]
        if negative:
            raise MoefxError(f"--prompt-ids: token ids {negative[:4]} are negative: token ids start at 0")
        bad = [t for t in row if vocab_size is not None and t >= vocab_size]
        if bad:
            raise MoefxError(f"--prompt-ids: token ids {bad[:4]} are outside the model's vocabulary [0, {vocab_size})")
        rows.append(row)
    return rows


def left_pad(rows: list[list[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention_mask [B, T]) with rows left-padded to the longest."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def local_tokenizer(folder: str | None):
    """The tokenizer saved in a Hugging Face folder (never downloads), or None when it has none."""
    if folder is None:
        return None
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    if not any((Path(folder) / f).exists() for f in files):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added beyond what the tokenizer adds by default)."""
    if tokenizer is None:
        raise MoefxError("a text --prompt needs a tokenizer: give --weights DIR with the tokenizer files saved "
                         "in it, or token ids with --prompt-ids")
    return [tokenizer(t)["input_ids"] for t in texts]


def replica_row_indices(n: int, replica: int, replicas: int) -> list[int]:
    """Which of the user's `n` rows data-parallel replica `replica` of `replicas` generates, as row
    indices: ceil(n / replicas) consecutive rows. Indices >= n are fillers (replicas run equal batches;
    a filler repeats row index % n and is not the user's)."""
    per = -(-n // replicas)
    return [replica * per + i for i in range(per)]


def replica_rows(rows: list[list[int]], replica: int, replicas: int) -> list[list[int]]:
    """The rows data-parallel replica `replica` of `replicas` generates (`replica_row_indices`; a filler
    repeats a row)."""
    return [rows[i % len(rows)] for i in replica_row_indices(len(rows), replica, replicas)]
