"""Offline stdlib corpus: deterministic selection, split, tokenisation and batching."""
from __future__ import annotations

import pytest
import torch

from moefx import data
from moefx.data import (
    DOC_SEP,
    VOCAB_SIZE,
    corpus_files,
    corpus_fingerprint,
    decode,
    encode,
    fixed_eval_batches,
    lm_batches,
    load_corpus,
)

SMALL = 200_000


def test_file_list_sorted_and_filtered():
    files = corpus_files()
    assert files == sorted(files) and len(files) > 100
    tops = {f.split("/")[0] for f in files}
    assert not tops & {"site-packages", "test", "idlelib", "tkinter", "distutils", "lib2to3"}
    assert not any("/tests/" in f or "/idle_test/" in f for f in files)
    assert "os.py" in files and "json/decoder.py" in files
    train, val = corpus_files("train"), corpus_files("val")
    assert set(train).isdisjoint(val) and sorted(train + val) == files
    assert 0.03 < len(val) / len(files) < 0.2


def test_load_corpus_deterministic_sizes_and_vocab():
    train, val = load_corpus(max_bytes=SMALL)
    train2, val2 = load_corpus(max_bytes=SMALL)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert train.dtype == torch.long and train.dim() == 1
    assert train.numel() + val.numel() == SMALL and val.numel() == SMALL // 10
    assert int(train.min()) >= 0 and int(train.max()) < VOCAB_SIZE
    assert (train == DOC_SEP).sum() >= 1  # file boundaries are marked
    assert corpus_fingerprint(max_bytes=SMALL) == corpus_fingerprint(max_bytes=SMALL)


def test_validation_files_fixed_seed_moves_training_files():
    train0, val0 = load_corpus(max_bytes=SMALL, seed=0)
    train1, val1 = load_corpus(max_bytes=SMALL, seed=1)
    assert torch.equal(val0, val1)
    assert not torch.equal(train0, train1)
    assert corpus_fingerprint(max_bytes=SMALL, seed=0) != corpus_fingerprint(max_bytes=SMALL, seed=1)


def test_validation_text_comes_from_validation_files():
    _, val = load_corpus(max_bytes=SMALL)
    seps = (val == DOC_SEP).nonzero()
    first_doc = bytes(val[: int(seps[0]) if len(seps) else len(val)].tolist())
    root = data._stdlib_root()
    assert any((root / f).read_bytes().startswith(first_doc) for f in corpus_files("val"))
    assert not any((root / f).read_bytes().startswith(first_doc) for f in corpus_files("train"))


def test_encode_decode_roundtrip():
    text = "def f(x):\n    return x  # ü\n"
    assert decode(encode(text)) == text


def test_lm_batches_seeded_windows():
    tokens = torch.arange(1000) % 256
    a = lm_batches(tokens, batch_size=3, seq_len=8, steps=5, seed=7)
    b = lm_batches(tokens, batch_size=3, seq_len=8, steps=5, seed=7)
    c = lm_batches(tokens, batch_size=3, seq_len=8, steps=5, seed=8)
    assert len(a) == 5 and all(isinstance(x, tuple) and len(x) == 1 for x in a)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    for (ids,) in a:
        assert ids.shape == (3, 8) and ids.dtype == torch.long
        starts = ids[:, 0]
        assert torch.equal(ids, tokens[starts[:, None] + torch.arange(8)])  # contiguous windows


def test_fixed_eval_batches_non_overlapping():
    tokens = torch.arange(100)
    batches = fixed_eval_batches(tokens, batch_size=2, seq_len=5, n=3)
    flat = torch.cat([b[0].reshape(-1) for b in batches])
    assert torch.equal(flat, torch.arange(30))
    with pytest.raises(ValueError, match="need 120 tokens, have 100"):
        fixed_eval_batches(tokens, batch_size=4, seq_len=10, n=3)


def test_errors():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        lm_batches(torch.arange(4), batch_size=1, seq_len=8, steps=1)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(max_bytes=SMALL, val_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        corpus_files("test")


def test_training_windows_never_read_the_held_out_tokens(tmp_path):
    import argparse

    import numpy as np

    from moefx.runtime.jobs.train import windows_for
    from moefx.train.tokens import open_split

    # a token file whose ids are their positions: a window's ids say where it was read
    np.save(tmp_path / "t.npy", np.arange(2000, dtype=np.int32))
    args = argparse.Namespace(data=str(tmp_path / "t.npy"), eval_data=None, data_dtype="uint16", tokenizer=None,
                              weights=None, batch=8, seq=16, seed=0)
    w = windows_for(args, 4096)
    train_max = max(int(w.micro_batch(step, i)[1].max()) for step in range(40) for i in range(2))
    evals = w.eval_batches(4)
    assert train_max < 1900 and min(int(x.min()) for x, _ in evals) >= 1900        # the last 5%: 1900..1999
    # the shipped corpus: validation windows come from its validation files
    train, val = open_split(None)
    args.data = None
    w = windows_for(args, None)
    x, y = w.eval_batches(1)[0]
    text = bytes(val.tolist())
    assert all(bytes(row.tolist()) in text for row in x)
    # a separate validation file
    np.save(tmp_path / "v.npy", np.arange(5000, 5100, dtype=np.int32))
    args.data, args.eval_data = str(tmp_path / "t.npy"), str(tmp_path / "v.npy")
    w = windows_for(args, 8192)
    assert int(w.micro_batch(0, 0)[1].max()) < 2000 and min(int(x.min()) for x, _ in w.eval_batches(2)) >= 5000
