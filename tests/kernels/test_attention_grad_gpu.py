"""The fused Triton backward of block-causal attention, compiled for a CUDA GPU, at model-sized shapes.

Run with the interpreter off:  TRITON_INTERPRET=0 python -m pytest -m gpu tests/kernels/test_attention_grad_gpu.py
Low-precision rule: against fp32 gradients on the same rounded inputs, our error is at most twice
PyTorch's own (SDPA with the boolean mask, in the same dtype), plus a tiny atol.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from tolerances import max_err

import waveclip_kernels as wk
from waveclip_kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="runs the compiled kernels: set TRITON_INTERPRET=0"
    ),
]


def _grads(fn, q, k, v, grad):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(fn(*leaves), leaves, grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,stage_tokens,D", [(16, 197, 64), (4, 50, 80), (2, 97, 128)])
def test_backward_within_twice_torch_error(B, stage_tokens, D, dtype):
    blocks = [1, stage_tokens - 1] + [stage_tokens] * 3
    shape = (B, 12, sum(blocks), D)
    q, k, v, grad = (torch.randn(shape, device="cuda").to(dtype) for _ in range(4))
    mask = ref.block_causal_mask(blocks, "cuda")
    ref32 = _grads(
        lambda a, b, c: ref.block_causal_attention(a, b, c, blocks), q.float(), k.float(), v.float(), grad.float()
    )
    ours = _grads(lambda a, b, c: wk.block_causal_attention(a, b, c, blocks, impl="triton"), q, k, v, grad)
    theirs = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, grad)
    for name, o, t, r in zip("qkv", ours, theirs, ref32):
        ours_err, torch_err = max_err(o, r), max_err(t, r)
        assert ours_err <= 2 * torch_err + 1e-5, f"d{name}: {ours_err:.3g} vs PyTorch's own {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_fp32_fp64_match_reference(dtype):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        blocks = [1, 99, 57, 143]
        q, k, v, grad = (torch.randn(2, 3, 300, 64, device="cuda", dtype=dtype) for _ in range(4))
        ours = _grads(lambda a, b, c: wk.block_causal_attention(a, b, c, blocks, impl="triton"), q, k, v, grad)
        expected = _grads(
            lambda a, b, c: ref.block_causal_attention(a, b, c, blocks),
            q.double(),
            k.double(),
            v.double(),
            grad.double(),
        )
        for o, e in zip(ours, expected):
            assert max_err(o, e) <= (1e-4 if dtype == torch.float32 else 1e-11) * max(1.0, e.abs().max().item())
    finally:
        torch.set_float32_matmul_precision(old)


def test_peak_memory_linear_in_tokens():
    """Forward + backward peak memory at N and 2N tokens (448 preset, bf16): about 2x, not 4x."""
    peaks = []
    for stage_tokens in (197, 394):
        shape = (16, 12, 4 * stage_tokens, 64)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        wk.block_causal_attention(q, k, v, [stage_tokens] * 4, impl="triton").backward(grad)  # compile, tune
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        wk.block_causal_attention(q, k, v, [stage_tokens] * 4, impl="triton").backward(grad)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    assert peaks[1] <= 2.5 * peaks[0], peaks
