"""Shared test helpers: quiet HF logging, deterministic threads."""
import os

import pytest
import torch

from moefx.outputs import main_tensor

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


first_tensor = main_tensor


@pytest.fixture
def first():
    return first_tensor
