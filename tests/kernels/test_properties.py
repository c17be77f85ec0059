"""Property tests of the public op API against independent oracles (hypothesis).

Oracles: PyWavelets for the tokens, SDPA with a boolean mask built by a Python loop for block-causal
attention, and a direct per-row Python loop (write the slots, concatenate, SDPA) for the KV append.
Shapes, block sizes, dtypes, strides and batch 0/1 are drawn; the CI profile in conftest.py bounds the
examples and their time. Triton runs under its interpreter with a handful of tiny examples.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import SENTINEL, guarded, pywt_tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

import waveclip_kernels as wk

pytest.importorskip("pywt")

FAST_IMPLS = ["reference", "cpu"]
DTYPES = st.sampled_from([torch.float64, torch.float32])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])
TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
TINY_TRITON = settings(max_examples=4, deadline=None)  # every new shape is a fresh interpreted launch


def runs(impl: str, op: str) -> bool:
    return impl in wk.available_impls("cpu")[op]


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider buffer along the last axis
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), SENTINEL, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


# ---------------------------------------------------------------------------------------- tokenizer


@st.composite
def tokenizer_cases(draw, max_levels=3, max_batch=2):
    levels = draw(st.integers(1, max_levels))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    patch = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = tuple((2**levels) * g * p for g, p in zip(grid, patch))
    batch = draw(st.integers(0, max_batch))
    color = draw(st.sampled_from(["ycbcr", "rgb"]))
    return levels, grid, size, batch, color


def check_tokenize(impl, case, dtype, layout):
    levels, grid, size, batch, color = case
    x = torch.randn(batch, 3, *size, dtype=torch.float64).to(dtype)
    tokens = wk.wavelet_tokenize(lay_out(x, layout), levels, grid, color, impl=impl)
    expected = pywt_tokens(x.double().numpy(), levels, grid, color)
    assert len(tokens) == levels + 1
    for t, e in zip(tokens, expected):
        assert_close(t, torch.from_numpy(e), dtype)
    back = wk.wavelet_detokenize(tokens, levels, grid, color, image_size=size, impl=impl)
    assert_close(back, x.double(), dtype)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(case=tokenizer_cases(), dtype=DTYPES, layout=LAYOUTS)
def test_tokenize_matches_pywt_and_inverts(impl, case, dtype, layout):
    if not runs(impl, "wavelet_tokenize"):
        pytest.skip(f"{impl} does not run here")
    check_tokenize(impl, case, dtype, layout)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(case=tokenizer_cases(max_levels=2), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_tokenize_half_precision_within_its_rounding(impl, case, dtype):
    if not runs(impl, "wavelet_tokenize"):
        pytest.skip(f"{impl} does not run here")
    levels, grid, size, batch, color = case
    x = torch.randn(batch, 3, *size).to(dtype)
    expected = [torch.from_numpy(e) for e in pywt_tokens(x.double().numpy(), levels, grid, color)]
    tokens = wk.wavelet_tokenize(x, levels, grid, color, impl=impl)
    for t, e in zip(tokens, expected):
        assert_close(t, e, dtype)
    # Computed in float32 whatever the input: float32 tokens carry float32 accuracy.
    for t, e in zip(wk.wavelet_tokenize(x, levels, grid, color, out_dtype=torch.float32, impl=impl), expected):
        assert_close(t, e, torch.float32)
    back = wk.wavelet_detokenize(tokens, levels, grid, color, image_size=size, impl=impl)
    assert back.dtype == dtype and back.shape == x.shape


@TRITON
@TINY_TRITON
@given(case=tokenizer_cases(max_levels=2, max_batch=1), layout=LAYOUTS)
def test_triton_tokenize_matches_pywt(case, layout):
    check_tokenize("triton", case, torch.float64, layout)


# -------------------------------------------------------------------------------- block-causal attention


def loop_mask(block_sizes: list[int]) -> torch.Tensor:
    """(N, N) bool, True where key j lies in a block <= query i's block, by a Python loop."""
    owner = []
    for s, n in enumerate(block_sizes):
        owner += [s] * n
    return torch.tensor([[owner[j] <= owner[i] for j in range(len(owner))] for i in range(len(owner))])


@st.composite
def attention_cases(draw, max_blocks=4, max_block=12):
    blocks = draw(st.lists(st.integers(1, max_block), min_size=1, max_size=max_blocks))
    shape = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), sum(blocks), draw(st.integers(1, 16)))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return blocks, shape, scale


def check_block_causal(impl, case, dtype, layout):
    blocks, shape, scale = case
    q, k, v = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(3))
    out = wk.block_causal_attention(lay_out(q, layout), k, lay_out(v, layout), blocks, scale=scale, impl=impl)
    mask = loop_mask(blocks)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(case=attention_cases(), dtype=DTYPES, layout=LAYOUTS)
def test_block_causal_matches_masked_sdpa(impl, case, dtype, layout):
    if not runs(impl, "block_causal_attention"):
        pytest.skip(f"{impl} does not run here")
    check_block_causal(impl, case, dtype, layout)


@TRITON
@TINY_TRITON
@given(case=attention_cases(max_blocks=3, max_block=6), layout=LAYOUTS)
def test_triton_block_causal_matches_masked_sdpa(case, layout):
    check_block_causal("triton", case, torch.float64, layout)


# ---------------------------------------------------------------------------------- KV append


@st.composite
def kv_cases(draw, max_batch=3, max_len=12):
    B = draw(st.integers(0, max_batch))
    B_cache = B + draw(st.integers(0 if B else 1, 2))
    n = draw(st.integers(1, 5))
    n_max = n + draw(st.integers(0, max_len))
    H, D = draw(st.integers(1, 3)), draw(st.integers(1, 16))
    lens = draw(st.lists(st.integers(0, n_max - n), min_size=B, max_size=B))
    routed = draw(st.booleans()) or B == 0
    rows = draw(st.permutations(range(B_cache)))[:B] if routed else None
    lens_form = draw(st.sampled_from(["list", "int32", "int64"]))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return B, B_cache, H, n, n_max, D, lens, rows, lens_form, scale


def loop_kv_append(q, k_new, v_new, k_cache, v_cache, lens, rows, scale):
    """The op by definition, row by row: returns (out, k_cache_after, v_cache_after) in float64."""
    k_after, v_after = k_cache.double().clone(), v_cache.double().clone()
    outs = []
    n = q.shape[2]
    for b in range(q.shape[0]):
        r = b if rows is None else rows[b]
        c = lens[b]
        k_after[r, :, c : c + n] = k_new[b].double()
        v_after[r, :, c : c + n] = v_new[b].double()
        keys, values = k_after[r, :, : c + n], v_after[r, :, : c + n]
        outs.append(F.scaled_dot_product_attention(q[b].double(), keys, values, scale=scale))
    out = torch.stack(outs) if outs else torch.empty(q.shape, dtype=torch.float64)
    return out, k_after, v_after


def check_kv_append(impl, case, dtype, layout):
    B, B_cache, H, n, n_max, D, lens, rows, lens_form, scale = case
    q, k_new, v_new = (torch.randn(B, H, n, D, dtype=torch.float64).to(dtype) for _ in range(3))
    views = []
    for _ in range(2):
        cache, buffer, mask = guarded((B_cache, H, n_max, D), dtype, dim=2)
        cache.copy_(torch.randn(B_cache, H, n_max, D, dtype=torch.float64))
        views.append((cache, buffer, mask))
    (k_cache, k_buf, k_mask), (v_cache, v_buf, v_mask) = views
    expected, k_after, v_after = loop_kv_append(q, k_new, v_new, k_cache, v_cache, lens, rows, scale)
    cache_lens = lens if lens_form == "list" else torch.tensor(lens, dtype=getattr(torch, lens_form))
    index = None if rows is None else torch.tensor(rows, dtype=torch.int64)
    out = wk.attention_with_kv_append(
        lay_out(q, layout), lay_out(k_new, layout), v_new, k_cache, v_cache, cache_lens, index, scale=scale, impl=impl
    )
    assert_close(out, expected, dtype)
    assert torch.equal(k_cache.double(), k_after) and torch.equal(v_cache.double(), v_after)
    for buffer, mask in ((k_buf, k_mask), (v_buf, v_mask)):
        assert (buffer[~mask] == SENTINEL).all(), "a write landed outside the cache"


@pytest.mark.parametrize("impl", FAST_IMPLS)
@given(case=kv_cases(), dtype=DTYPES, layout=LAYOUTS)
def test_kv_append_matches_the_loop(impl, case, dtype, layout):
    if not runs(impl, "attention_with_kv_append"):
        pytest.skip(f"{impl} does not run here")
    check_kv_append(impl, case, dtype, layout)


@TRITON
@TINY_TRITON
@given(case=kv_cases(max_batch=2, max_len=6), layout=LAYOUTS)
def test_triton_kv_append_matches_the_loop(case, layout):
    check_kv_append("triton", case, torch.float64, layout)
