"""Reference attention ops against SDPA with an explicit boolean mask, in float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import non_contiguous
from tolerances import assert_close

import waveclip_kernels as wk
from waveclip_kernels.reference import block_causal_mask

BLOCKS = [[1], [5, 3], [50, 50, 50, 50], [7, 33, 1, 64]]


def sdpa_block_causal(q, k, v, block_sizes, scale=None):
    mask = block_causal_mask(block_sizes, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("block_sizes", BLOCKS, ids=lambda b: "-".join(map(str, b)))
def test_block_causal_matches_sdpa(block_sizes):
    n = sum(block_sizes)
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
    out = wk.block_causal_attention(q, k, v, block_sizes, impl="reference")
    assert_close(out, sdpa_block_causal(q, k, v, block_sizes))


def test_block_causal_mask_shape():
    mask = block_causal_mask([2, 1])
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]


def test_block_causal_scale_noncontiguous_and_empty():
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    out = wk.block_causal_attention(non_contiguous(q), k, non_contiguous(v), [4, 8], scale=0.3, impl="reference")
    assert_close(out, sdpa_block_causal(q, k, v, [4, 8], scale=0.3))
    empty = torch.randn(0, 2, 12, 8)
    assert wk.block_causal_attention(empty, empty, empty, [12], impl="reference").shape == (0, 2, 12, 8)


def test_block_causal_nan_propagates():
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    v[0, 0, 4] = float("nan")  # a key of the second block: the first block never sees it
    out = wk.block_causal_attention(q, k, v, [3, 3], impl="reference")
    assert not out[0, 0, :3].isnan().any() and out[0, 0, 3:].isnan().all()


@pytest.mark.parametrize(
    "B,B_cache,n,n_max,lens,batch_index",
    [
        (1, 1, 1, 1, [0], None),
        (2, 2, 5, 20, [0, 15], None),
        (2, 5, 7, 30, [3, 10], [4, 1]),
        (3, 3, 50, 200, [150, 0, 100], [2, 0, 1]),
    ],
    ids=["one-slot", "ragged", "routed", "long-permuted"],
)
def test_kv_append_matches_concat_sdpa(B, B_cache, n, n_max, lens, batch_index, kv_case, guards):
    case = kv_case(B, 2, n, 8, B_cache, n_max, lens, batch_index)
    out = wk.attention_with_kv_append(*case.args(), impl="reference")
    assert_close(out, case.oracle())
    case.assert_caches_written()
    guards.check()


def test_kv_append_overflow_writes_nothing(kv_case, guards):
    case = kv_case(2, 2, 4, 8, 2, 10, [0, 7])
    with pytest.raises(ValueError, match="cache overflow"):
        wk.attention_with_kv_append(*case.args(), impl="reference")
    assert torch.equal(case.k_cache, case.k_before) and torch.equal(case.v_cache, case.v_before)
    guards.check()


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
        assert_close(out, full[:, :, sl])
        lens += n
        start += n
