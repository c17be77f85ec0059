"""Readable reference for block-causal attention and attention with in-place KV append.

Scores, softmax and the weighted sum are written out (no fused kernel), in float64 for
float64 inputs and float32 otherwise, so the fast paths have an oracle and SDPA with a boolean
mask stays an independent one.
"""

from __future__ import annotations

import math

import torch

from ..common import compute_dtype


def block_levels(block_sizes: list[int], device=None) -> torch.Tensor:
    """Block index of every position: block_sizes [2, 3] -> [0, 0, 1, 1, 1]."""
    sizes = torch.as_tensor(block_sizes, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(block_sizes)), sizes).to(device)


def block_causal_mask(block_sizes: list[int], device=None) -> torch.Tensor:
    """(N, N) boolean mask, True where query i may attend key j: block(i) >= block(j)."""
    level = block_levels(block_sizes, device)
    return level[:, None] >= level[None, :]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v in the compute dtype; q (..., n, D), k/v (..., m, D)."""
    ct = compute_dtype(q.dtype)
    scores = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale
    return (torch.softmax(scores, dim=-1) @ v.to(ct)).to(q.dtype)


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_sizes: list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Attention where a query of block i sees the keys of blocks <= i.

    Args:
        q, k, v: (B, H, N, D).
        block_sizes: positive sizes that sum to N.
        scale: softmax scale (default 1/sqrt(D)).

    Returns:
        (B, H, N, D) in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Block i's queries see exactly the prefix [0, end_i): later keys are never read, so nothing
    # (not even a NaN) flows backwards from a later block.
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    start = 0
    for size in block_sizes:
        end = start + size
        out[:, :, start:end] = _attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale)
        start = end
    return out


def attention_with_kv_append(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Write k_new/v_new into the caches in place, then attend q to each row's prefix.

    Args:
        q, k_new, v_new: (B, H, n, D).
        k_cache, v_cache: (B_cache, H, N_max, D), written in place at [c, c+n) of row r.
        cache_lens: (B,) ints, c = cache_lens[b] before the append (the caller advances it).
        batch_index: (B,) ints, cache row r of query row b (default r = b).
        scale: softmax scale (default 1/sqrt(D)).

    Returns:
        (B, H, n, D) in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n = q.shape[2]
    rows = range(q.shape[0]) if batch_index is None else batch_index.tolist()
    out = torch.empty_like(q)
    for b, (r, c) in enumerate(zip(rows, cache_lens.tolist())):
        k_cache[r, :, c : c + n] = k_new[b]
        v_cache[r, :, c : c + n] = v_new[b]
        out[b] = _attend(q[b], k_cache[r, :, : c + n], v_cache[r, :, : c + n], scale)
    return out
