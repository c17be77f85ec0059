"""impl="triton" compiled for a CUDA GPU (no interpreter), at model-sized shapes.

Run with the interpreter off:  TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_triton_gpu.py
Low-precision rule (as FlashAttention tests it): against an fp32 reference on the same (rounded)
inputs, our error is at most twice PyTorch's own error in the same dtype, plus a tiny atol.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import non_contiguous
from tolerances import assert_within_torch_error, max_err

import waveclip_kernels as wk
from waveclip_kernels import reference as ref
from waveclip_kernels import triton as tri

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="runs the compiled kernels: set TRITON_INTERPRET=0"
    ),
]

CUDA = "cuda"
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references must be true fp32 matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def randn(*shape, dtype):
    return torch.randn(*shape, device=CUDA, dtype=torch.float32).to(dtype)


# --------------------------------------------------------------------------- block-causal attention


@pytest.mark.parametrize("dtype", LOW)
def test_block_causal_448_preset_shape(dtype):
    """B=64, H=12, 4 stages x 197 tokens, head dim 64: the high-resolution preset's full pass."""
    blocks = [197] * 4
    q, k, v = (randn(64, 12, 788, 64, dtype=dtype) for _ in range(3))
    ours = wk.block_causal_attention(q, k, v, blocks, impl="triton")
    ref32 = ref.block_causal_attention(q.float(), k.float(), v.float(), blocks)
    mask = ref.block_causal_mask(blocks, CUDA)
    torch_same = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.is_contiguous() and ours.dtype == dtype
    assert_within_torch_error(ours, ref32, torch_same, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
def test_block_causal_head_dims(D, dtype, guards):
    blocks = [1, 99, 57, 143]
    q, k, v = (randn(2, 3, 300, D, dtype=dtype) for _ in range(3))
    out = guards.new((2, 3, 300, D), dtype, dim=2, device=CUDA)
    ours = tri.block_causal_attention(non_contiguous(q), k, v, blocks, D**-0.5, out=out)
    guards.check()
    if dtype in LOW:
        ref32 = ref.block_causal_attention(q.float(), k.float(), v.float(), blocks)
        torch_same = F.scaled_dot_product_attention(q, k, v, attn_mask=ref.block_causal_mask(blocks, CUDA))
        assert_within_torch_error(ours, ref32, torch_same, atol=1e-5)
    else:
        expected = ref.block_causal_attention(q.double(), k.double(), v.double(), blocks)
        assert max_err(ours, expected) <= (1e-5 if dtype == torch.float32 else 1e-12)


# -------------------------------------------------------------------- attention with KV append


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "B,n,lens,splits",
    [
        (64, 197, 591, None),  # the 448 preset's last incremental step: programs fill the GPU
        (1, 197, 591, None),  # batch 1: split-KV by the default rule
        (2, 1, 700, None),  # decode-like: one query row per head
        (4, 50, 150, 1),  # forced single share
    ],
)
def test_kv_append_step(B, n, lens, splits, dtype):
    H, D, n_max = 12, 64, 800
    q, k_new, v_new = (randn(B, H, n, D, dtype=dtype) for _ in range(3))
    k_cache, v_cache = randn(B + 1, H, n_max, D, dtype=dtype), randn(B + 1, H, n_max, D, dtype=dtype)
    k_cache[:, :, lens + n :] = float("nan")  # never-written slots: must never be read
    v_cache[:, :, lens + n :] = float("nan")
    rows = torch.arange(B, 0, -1, device=CUDA) if B > 1 else None  # routed rows, cache row 0 unused
    cache_lens = torch.full((B,), lens, dtype=torch.int32, device=CUDA)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    ours = tri.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, rows, D**-0.5, num_splits=splits)
    r = rows if rows is not None else torch.arange(B, device=CUDA)
    k_full = torch.cat([k_before[r, :, :lens], k_new], dim=2)
    v_full = torch.cat([v_before[r, :, :lens], v_new], dim=2)
    ref32 = F.scaled_dot_product_attention(q.float(), k_full.float(), v_full.float())
    torch_same = F.scaled_dot_product_attention(q, k_full, v_full)
    assert_within_torch_error(ours, ref32, torch_same, atol=1e-5)
    # Appended slots bit-exact, everything else untouched (NaN slots stay NaN).
    expected_k, expected_v = k_before.clone(), v_before.clone()
    expected_k[r, :, lens : lens + n] = k_new
    expected_v[r, :, lens : lens + n] = v_new
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


def test_kv_append_split_rule_on_this_device():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.device(CUDA)
    assert tri.num_kv_splits(sms, 4096, device) == 1
    assert 1 < tri.num_kv_splits(1, 4096, device) <= 16


# ------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size,grid", [((224, 224), (7, 7)), ((448, 448), (14, 14))])
def test_tokenize_presets(size, grid, dtype):
    """Both sides compute in fp32 (in another order) and round to dtype: a few fp32 ulp, or one ulp of dtype."""
    ulps = 8 if dtype == torch.float32 else 2
    tol = ulps * torch.finfo(dtype).eps
    x = randn(8, 3, *size, dtype=dtype)
    tokens = wk.wavelet_tokenize(non_contiguous(x), 3, grid, impl="triton")
    for t, e in zip(tokens, ref.wavelet_tokenize(x, 3, grid)):
        assert t.dtype == dtype and max_err(t, e) <= tol * e.abs().max().item()
    back = wk.wavelet_detokenize(tokens, 3, grid, image_size=size, impl="triton")
    expected = ref.wavelet_detokenize(tokens, 3, grid, image_size=size)
    assert max_err(back, expected) <= tol * expected.abs().max().item()


def test_tokenize_out_dtype_and_guard_bands(guards):
    x = randn(4, 3, 224, 224, dtype=torch.float32)
    dims = [48, 144, 576, 2304]
    views = [guards.new((4, 49, d), torch.bfloat16, dim=1, device=CUDA) for d in dims]
    out = tri.wavelet_tokenize(x, 3, (7, 7), "ycbcr", torch.bfloat16, out=views)
    for t, e in zip(out, ref.wavelet_tokenize(x, 3, (7, 7), out_dtype=torch.bfloat16)):
        assert max_err(t, e) <= torch.finfo(torch.bfloat16).eps * e.abs().max().item()
    guards.check()


# ------------------------------------------------------------------------------ torch.compile


def test_compiled_model_step():
    def f(x, q, k_cache, v_cache, lens):
        tokens = wk.wavelet_tokenize(x, 3, 7, impl="triton")
        attn = wk.block_causal_attention(q, q, q, [50] * 4, impl="triton")
        step = wk.attention_with_kv_append(
            q[:, :, :50], q[:, :, :50], q[:, :, :50], k_cache, v_cache, lens, impl="triton"
        )
        return tokens[3].float().sum() + attn.float().sum() + step.float().sum()

    x = randn(2, 3, 224, 224, dtype=torch.bfloat16)
    q = randn(2, 12, 200, 64, dtype=torch.bfloat16)
    caches = [randn(2, 12, 256, 64, dtype=torch.bfloat16) for _ in range(2)]
    lens = torch.tensor([150, 100], device=CUDA)
    expected = f(x, q, *[c.clone() for c in caches], lens)
    torch.testing.assert_close(torch.compile(f)(x, q, *caches, lens), expected)
