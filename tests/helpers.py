"""Plain test helpers: guard-banded buffers and strided copies (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

SENTINEL = 1234.5


def guarded(shape, dtype, dim: int = 0, pad: int = 3, fill: float = SENTINEL):
    """A tensor of `shape` that is a view into a larger buffer filled with a sentinel.

    Returns (view, buffer, mask) where mask is True on the view's elements. After an op writes into
    `view`, `buffer[~mask]` must still equal the sentinel (the `guards` fixture checks that).
    """
    big = list(shape)
    big[dim] += 2 * pad
    buffer = torch.full(big, fill, dtype=dtype)
    index = [slice(None)] * len(shape)
    index[dim] = slice(pad, pad + shape[dim])
    mask = torch.zeros(big, dtype=torch.bool)
    mask[tuple(index)] = True
    return buffer[tuple(index)], buffer, mask


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t`, stored with its last two axes transposed in memory."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() or t.shape[-1] == 1 or t.shape[-2] == 1
    return out
