"""Dispatch: each impl really runs its backend.

The `ran` fixture (conftest.py) records what ran during one public op call: every function of the
compiled extension `_C` (impl "cpu"/"cuda"), every Triton kernel launch (the JIT function's `run`,
interpreted or compiled), and the reference ops. A routing that sends an impl to the reference leaves
the spy of its backend empty, and the test fails.
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import assert_close

import waveclip_kernels as wk
from waveclip_kernels import extension
from waveclip_kernels import reference as ref

_C = extension.load()
HAVE_EXTENSION = not isinstance(_C, ImportError)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
REF = {op: getattr(ref, op) for op in wk.OPS}  # the expected outputs, computed outside the spies
BACKEND = {"cpu": "extension", "cuda": "extension", "triton": "triton", "reference": "reference"}


def call(op: str, device: str):
    """Run `op` through the public API with small inputs; returns (run(impl) -> output, reference output)."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device)

    if op == "wavelet_tokenize":
        x = randn(2, 3, 16, 24)
        expected = torch.cat([t.flatten(1) for t in REF["wavelet_tokenize"](x, 2, (2, 3))], 1)
        return lambda impl: torch.cat([t.flatten(1) for t in wk.wavelet_tokenize(x, 2, (2, 3), impl=impl)], 1), expected
    if op == "wavelet_detokenize":
        tokens = [randn(*t.shape) for t in REF["wavelet_tokenize"](randn(2, 3, 16, 24), 2, (2, 3))]
        expected = REF["wavelet_detokenize"](tokens, 2, (2, 3), "ycbcr", (16, 24))
        return lambda impl: wk.wavelet_detokenize(tokens, 2, (2, 3), image_size=(16, 24), impl=impl), expected
    if op == "block_causal_attention":
        q, k, v = randn(1, 2, 7, 16), randn(1, 2, 7, 16), randn(1, 2, 7, 16)
        expected = REF["block_causal_attention"](q, k, v, [3, 4])
        return lambda impl: wk.block_causal_attention(q, k, v, [3, 4], impl=impl), expected
    q, k_new, v_new = randn(2, 2, 3, 16), randn(2, 2, 3, 16), randn(2, 2, 3, 16)
    caches = randn(3, 2, 10, 16), randn(3, 2, 10, 16)
    lens, rows = torch.tensor([1, 4], device=device), torch.tensor([2, 0], device=device)
    expected = REF["attention_with_kv_append"](q, k_new, v_new, *(c.clone() for c in caches), lens, rows)

    def run(impl):
        return wk.attention_with_kv_append(q, k_new, v_new, *(c.clone() for c in caches), lens, rows, impl=impl)

    return run, expected


def _runnable(impl: str, device: str) -> list[str]:
    return [op for op, impls in wk.available_impls(device).items() if impl in impls]


@pytest.mark.skipif(not HAVE_EXTENSION, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", extension.CPU_OPS)
def test_impl_cpu_runs_the_extension(op, ran):
    assert op in _runnable("cpu", "cpu"), f'{op}: impl="cpu" is not available with the extension built'
    run, expected = call(op, "cpu")
    out = run("cpu")
    assert ran.extension, f'{op}: impl="cpu" never called the extension'
    assert ran.backends() == {"extension"}, f"{op}: also ran {ran.backends()}"
    assert_close(out, expected)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
@pytest.mark.parametrize("op", wk.OPS)
def test_impl_triton_launches_a_triton_kernel(op, ran):
    run, expected = call(op, "cpu")
    out = run("triton")
    assert ran.triton, f'{op}: impl="triton" launched no Triton kernel'
    assert ran.backends() == {"triton"}, f"{op}: also ran {ran.backends()}"
    assert_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", wk.OPS)
def test_impl_auto_runs_the_first_available_impl(op, device, ran):
    first = wk.available_impls(device)[op][0]
    run, expected = call(op, device)
    out = run("auto")
    assert ran.backends() == {BACKEND[first]}, f'{op}: impl="auto" ran {ran.backends()}, expected {first}'
    assert_close(out.cpu(), expected.cpu())


@pytest.mark.parametrize("op", wk.OPS)
def test_impl_reference_runs_neither_extension_nor_triton(op, ran):
    run, expected = call(op, "cpu")
    out = run("reference")
    assert ran.backends() == {"reference"}
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_EXTENSION and _C.has_cuda()), reason="needs a GPU and a CUDA build"
)
@pytest.mark.parametrize("op", extension.CUDA_OPS)
def test_impl_cuda_runs_the_extension(op, ran):
    run, expected = call(op, "cuda")
    out = run("cuda")
    assert ran.backends() == {"extension"}
    assert_close(out.cpu(), expected.cpu())


def test_auto_order_puts_the_extension_first_on_the_cpu():
    """With the extension built, the memory-bound ops prefer it over the reference on CPU tensors."""
    if not HAVE_EXTENSION:
        pytest.skip("the C++ extension is not built")
    impls = wk.available_impls("cpu")
    for op in extension.CPU_OPS:
        assert impls[op].index("cpu") < impls[op].index("reference"), (op, impls[op])
