"""Shared test helpers: quiet HF logging, deterministic threads."""
import os
import warnings

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*drop_tokens=True.*")


def first_tensor(out):
    """The main tensor of a model output (logits, last_hidden_state, or the output itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    raise TypeError(type(out))


@pytest.fixture
def first():
    return first_tensor
