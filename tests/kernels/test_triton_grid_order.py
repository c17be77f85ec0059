"""Program order must not matter: every Triton kernel gives bit-identical results when the programs of
its grid run in reversed or shuffled order.

Triton's interpreter runs a grid's programs one after another in row-major order, so a program that
reads what another program of the same launch writes (a race on a GPU, where programs run
concurrently in any order) gives the same answer every time here. Running the programs in other
orders turns such a race into a difference. The order is set in the interpreter's GridExecutor: the
`program_order` context defers each program until the whole grid is known, then runs them all in the
order asked.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random

import pytest
import torch

import waveclip_kernels as wk
import waveclip_kernels.triton as tri

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="reorders the programs of Triton's interpreter"
)

ORDERS = ("normal", "reversed", "shuffled")
LAUNCHED: set[str] = set()  # names of the kernels this module ran, for the coverage check at the end


def _ordered(programs: list[tuple], order: str, seed: int) -> list[tuple]:
    if order == "normal":
        return programs
    if order == "reversed":
        return programs[::-1]
    if len(programs) == 2:  # the only other order of two programs
        return programs[::-1]
    shuffled = list(programs)
    rng = random.Random(seed)
    while len(programs) > 2 and shuffled in (programs, programs[::-1]):
        rng.shuffle(shuffled)
    return shuffled


@contextlib.contextmanager
def program_order(order: str, seed: int = 0):
    """Run every interpreted launch inside the block with its programs in `order`; yields the list of
    (kernel name, program order) of each launch."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    executor_call = interpreter.GridExecutor.__call__
    set_grid_dim = builder.set_grid_dim
    launches: list[tuple[str, list[tuple]]] = []
    current = []  # the executor whose launch is under way

    def deferring(kernel):
        pending = []

        def run_later(**args):
            pending.append(builder.grid_idx)
            if len(pending) == math.prod(builder.grid_dim):  # the grid is complete: run it
                programs = _ordered(list(pending), order, seed + len(launches))
                launches.append((kernel.__name__, programs))
                for idx in programs:
                    builder.set_grid_idx(*idx)
                    kernel(**args)

        return run_later

    def set_dim(*dims):
        set_grid_dim(*dims)
        current[-1].fn = deferring(current[-1].fn)  # the interpreter calls self.fn once per program

    def call(self, *args, **kwargs):
        kernel = self.fn
        current.append(self)
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            self.fn = kernel
            current.pop()

    interpreter.GridExecutor.__call__ = call
    builder.set_grid_dim = set_dim
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = executor_call
        del builder.set_grid_dim


def assert_order_independent(run):
    """`run()` builds fresh inputs (same seed), launches kernels and returns the tensors to compare."""
    results = {}
    for order in ORDERS:
        torch.manual_seed(0)
        with program_order(order) as launches:
            results[order] = [t.clone() for t in run()]
        assert launches, "no Triton launch ran under the interpreter"
        assert any(len(programs) > 1 for _, programs in launches), "every launch had one program"
        if order != "normal":
            assert all(p != sorted(p) for _, p in launches if len(p) > 1), f"{order}: a launch kept its order"
        LAUNCHED.update(name for name, _ in launches)
    for order in ORDERS[1:]:
        for got, expected in zip(results[order], results["normal"], strict=True):
            assert torch.equal(got, expected), f"{order} program order changed the result"


@pytest.mark.parametrize("levels,grid,size", [(2, (2, 3), (16, 36)), (3, (1, 1), (8, 96))])
def test_tokenizer_and_inverse(levels, grid, size):
    def run():
        x = torch.randn(2, 3, *size)
        tokens = tri.wavelet_tokenize(x, levels, grid, "ycbcr", torch.float32)
        return [*tokens, tri.wavelet_detokenize(tokens, levels, grid, "ycbcr", size)]

    assert_order_independent(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_causal_attention(dtype):
    def run():
        q, k, v = (torch.randn(2, 2, 50, 16, dtype=dtype) for _ in range(3))
        return [tri.block_causal_attention(q, k, v, [10, 15, 25], 0.25)]

    assert_order_independent(run)


def test_block_causal_attention_gradients():
    """Forward and backward through the public op (whatever kernels its backward launches)."""

    def run():
        q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
        out = wk.block_causal_attention(q, k, v, [8, 12, 20], impl="triton")
        out.backward(torch.randn_like(out))
        return [out.detach(), q.grad, k.grad, v.grad]

    assert_order_independent(run)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("indexed", [False, True])
def test_kv_append(num_splits, indexed):
    """The append writes the cache while other programs read it; split-KV adds the combine kernel."""

    def run():
        B, B_cache, H, n, n_max, D = 2, 3, 2, 40, 96, 16
        q, k_new, v_new = (torch.randn(B, H, n, D) for _ in range(3))
        k_cache, v_cache = torch.randn(B_cache, H, n_max, D), torch.randn(B_cache, H, n_max, D)
        lens = torch.tensor([17, 50], dtype=torch.int32)
        index = torch.tensor([2, 0]) if indexed else None
        out = tri.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, lens, index, 0.25, num_splits=num_splits)
        return [out, k_cache, v_cache]

    assert_order_independent(run)


def test_every_kernel_was_reordered():
    """Runs last (pytest keeps file order): every @triton.jit kernel of the Triton backend that has a
    launcher above was launched under every order. A new kernel needs a case here."""
    if not LAUNCHED:
        pytest.skip("run with the tests above")
    kernels = {
        name
        for module in (tri.attention, tri.wavelet)
        for name, obj in inspect.getmembers(module)
        if name.endswith("_kernel") and hasattr(obj, "fn")
    }
    assert kernels, "found no kernel in the Triton backend"
    assert kernels <= LAUNCHED, f"never run in reordered grids: {sorted(kernels - LAUNCHED)}"
