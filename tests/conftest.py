"""Shared fixtures.

Without a GPU, Triton's kernels run on CPU tensors under its interpreter. TRITON_INTERPRET is read
when a @triton.jit kernel is defined, so it is set here, before the test modules import the kernels
(importing torch does not import Triton). On a CUDA machine it is left alone, so the GPU tests run
compiled kernels; set TRITON_INTERPRET=1 yourself to force the interpreter there.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh, reproducible random inputs for each test."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny ops: on a busy 2-core machine, waking a second
    thread costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
