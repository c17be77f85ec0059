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


# BT.601 without offsets, as docs/design.md section 1 writes it (not read from the package).
BT601 = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def pywt_tokens(images, levels: int, grid, color: str = "ycbcr") -> list:
    """Independent tokenization in numpy: colour matrix, `pywt.wavedec2(haar)`, then docs/design.md's
    rearrangement. images: (B, 3, H, W) array; returns L+1 arrays (B, Gh*Gw, dim_s), coarse to fine."""
    import numpy as np
    import pytest

    pywt = pytest.importorskip("pywt")  # imported here so that test modules collect where pywt is absent
    images = np.asarray(images, dtype=np.float64)
    if color == "ycbcr":
        images = np.einsum("oc,bchw->bohw", np.array(BT601), images)
    coeffs = pywt.wavedec2(images, "haar", level=levels, axes=(-2, -1))
    B = images.shape[0]
    # Stage 0 is A_L; stage s is level L-s+1's (H, V, D), channel index c*3 + band.
    stages = [coeffs[0]] + [np.stack(bands, axis=2).reshape(B, 9, *bands[0].shape[-2:]) for bands in coeffs[1:]]
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    out = []
    for s in stages:
        _, cn, h, w = s.shape
        t = s.reshape(B, cn, gh, h // gh, gw, w // gw).transpose(0, 2, 4, 1, 3, 5)
        out.append(t.reshape(B, gh * gw, cn * (h // gh) * (w // gw)))
    return out


GOLDEN_SEED = 2026  # seeds of the stored tiny-tower exits (tests/data/tiny_tower_exits.json)


def seeded_tiny_tower(seed: int = GOLDEN_SEED):
    """The waveclip-tiny tower in float64 with parameters drawn by name, independently of the model's own
    init order: each state_dict entry, in sorted name order, is N(0, 0.1^2) (LayerNorm weights 1 + that)."""
    from waveclip import WaveCLIP, WaveCLIPConfig

    model = WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny"), impl="reference").double().eval()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in sorted(model.state_dict().items()):
        draw = 0.1 * torch.randn(value.shape, generator=g, dtype=torch.float64)
        layer_norm_weight = name.endswith(("ln_pre.weight", "ln_post.weight", "ln_1.weight", "ln_2.weight"))
        state[name] = 1 + draw if layer_norm_weight else draw
    model.load_state_dict(state)
    return model


def seeded_images(batch: int = 3, seed: int = GOLDEN_SEED + 1) -> torch.Tensor:
    """(batch, 3, 32, 32) float64 images for the tiny tower."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
