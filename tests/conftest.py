"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
before the test modules import the kernels: Triton's kernels then run on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh, reproducible random inputs for each test."""
    torch.manual_seed(0)
    yield
