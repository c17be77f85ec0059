"""Reference attention ops against SDPA with an explicit boolean mask, in float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import SENTINEL, guarded, non_contiguous

import waveclip_kernels as wk
from waveclip_kernels.reference import block_causal_mask

BLOCKS = [[1], [5, 3], [50, 50, 50, 50], [7, 33, 1, 64]]


def sdpa_block_causal(q, k, v, block_sizes, scale=None):
    mask = block_causal_mask(block_sizes, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("block_sizes", BLOCKS)
def test_block_causal_matches_sdpa(block_sizes):
    n = sum(block_sizes)
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
    out = wk.block_causal_attention(q, k, v, block_sizes, impl="reference")
    torch.testing.assert_close(out, sdpa_block_causal(q, k, v, block_sizes), rtol=0, atol=1e-12)


def test_block_causal_mask_shape():
    mask = block_causal_mask([2, 1])
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]


def test_block_causal_scale_noncontiguous_and_empty():
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    out = wk.block_causal_attention(non_contiguous(q), k, non_contiguous(v), [4, 8], scale=0.3, impl="reference")
    torch.testing.assert_close(out, sdpa_block_causal(q, k, v, [4, 8], scale=0.3), rtol=0, atol=1e-12)
    empty = torch.randn(0, 2, 12, 8)
    assert wk.block_causal_attention(empty, empty, empty, [12], impl="reference").shape == (0, 2, 12, 8)


def test_block_causal_nan_propagates():
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    v[0, 0, 4] = float("nan")  # a key of the second block: the first block never sees it
    out = wk.block_causal_attention(q, k, v, [3, 3], impl="reference")
    assert not out[0, 0, :3].isnan().any() and out[0, 0, 3:].isnan().all()


def _kv_case(B, B_cache, H, n, n_max, D, lens, batch_index=None):
    q, k_new, v_new = (torch.randn(B, H, n, D, dtype=torch.float64) for _ in range(3))
    k_cache, k_buf, k_mask = guarded((B_cache, H, n_max, D), torch.float64, dim=2)
    v_cache, v_buf, v_mask = guarded((B_cache, H, n_max, D), torch.float64, dim=2)
    k_cache.normal_()
    v_cache.normal_()
    return q, k_new, v_new, (k_cache, k_buf, k_mask), (v_cache, v_buf, v_mask)


@pytest.mark.parametrize(
    "B,B_cache,n,n_max,lens,batch_index",
    [
        (1, 1, 1, 1, [0], None),
        (2, 2, 5, 20, [0, 15], None),
        (2, 5, 7, 30, [3, 10], [4, 1]),
        (3, 3, 50, 200, [150, 0, 100], [2, 0, 1]),
    ],
)
def test_kv_append_matches_concat_sdpa(B, B_cache, n, n_max, lens, batch_index):
    H, D = 2, 8
    q, k_new, v_new, (kc, kbuf, kmask), (vc, vbuf, vmask) = _kv_case(B, B_cache, H, n, n_max, D, lens)
    k_before, v_before = kbuf.clone(), vbuf.clone()
    rows = list(range(B)) if batch_index is None else batch_index
    bi = None if batch_index is None else torch.tensor(batch_index)
    out = wk.attention_with_kv_append(q, k_new, v_new, kc, vc, torch.tensor(lens), bi, impl="reference")

    written = torch.zeros_like(kmask)
    for b, (r, c) in enumerate(zip(rows, lens)):
        keys = torch.cat([k_before[r, :, 3 : 3 + c], k_new[b]], dim=1)
        vals = torch.cat([v_before[r, :, 3 : 3 + c], v_new[b]], dim=1)
        expected = F.scaled_dot_product_attention(q[b], keys, vals)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-12)
        assert torch.equal(kc[r, :, c : c + n], k_new[b]) and torch.equal(vc[r, :, c : c + n], v_new[b])
        written[r, :, 3 + c : 3 + c + n] = True
    # Every element that was not a target, guard bands included, is bit-identical.
    assert torch.equal(kbuf[~written], k_before[~written]) and torch.equal(vbuf[~written], v_before[~written])
    assert (kbuf[~kmask] == SENTINEL).all() and (vbuf[~vmask] == SENTINEL).all()


def test_kv_append_overflow_writes_nothing():
    q, k_new, v_new, (kc, kbuf, _), (vc, vbuf, _) = _kv_case(2, 2, 2, 4, 10, 8, None)
    k_before, v_before = kbuf.clone(), vbuf.clone()
    with pytest.raises(ValueError, match="cache overflow"):
        wk.attention_with_kv_append(q, k_new, v_new, kc, vc, torch.tensor([0, 7]), impl="reference")
    assert torch.equal(kbuf, k_before) and torch.equal(vbuf, v_before)


def test_kv_append_sequential_equals_block_causal():
    """Appending blocks one at a time reproduces the block-causal pass over the whole sequence."""
    H, D, sizes = 2, 8, [3, 4, 5]
    q, k, v = (torch.randn(2, H, sum(sizes), D, dtype=torch.float64) for _ in range(3))
    full = wk.block_causal_attention(q, k, v, sizes, impl="reference")
    kc = torch.randn(2, H, 16, D, dtype=torch.float64)
    vc = torch.randn_like(kc)
    lens = torch.zeros(2, dtype=torch.long)
    start = 0
    for n in sizes:
        sl = slice(start, start + n)
        out = wk.attention_with_kv_append(q[:, :, sl], k[:, :, sl], v[:, :, sl], kc, vc, lens, impl="reference")
        torch.testing.assert_close(out, full[:, :, sl], rtol=0, atol=1e-12)
        lens += n
        start += n
