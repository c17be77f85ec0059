"""Test helpers: guard-banded buffers and tolerance rules shared by the parity tests."""

from __future__ import annotations

import torch

from waveclip import WaveCLIP, WaveCLIPConfig

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")

SENTINEL = 1234.5


def guarded(shape, dtype, dim: int = 0, pad: int = 3, fill: float = SENTINEL):
    """A tensor of `shape` that is a view into a larger buffer filled with a sentinel.

    Returns (view, buffer, mask) where mask is True on the view's elements. After an op writes into
    `view`, `buffer[~mask]` must still equal the sentinel.
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


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def tiny_model(dtype=torch.float32, **overrides) -> WaveCLIP:
    """The tiny preset with every parameter perturbed, so that nothing relies on zeros or ones."""
    config = WaveCLIPConfig.from_preset("waveclip-tiny", **overrides)
    model = WaveCLIP(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_teacher(dtype=torch.float64, quick_gelu=True, seed=0):
    """A random open_clip CLIP whose vision tower matches the tiny preset: 32 px, 8 px patches, width 32."""
    import pytest

    open_clip = pytest.importorskip("open_clip")  # a skip, not an error, where open_clip is absent
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, image_size=32, patch_size=8)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    model = open_clip.CLIP(TINY.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    with torch.no_grad():  # open_clip zero-initialises biases and LayerNorms are identity: make them count
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()
