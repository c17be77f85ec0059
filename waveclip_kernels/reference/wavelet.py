"""Readable reference for the wavelet tokenizer (docs/design.md section 1).

Every step is an ordinary tensor operation so the code can be read against the math:
colour transform -> L levels of the orthonormal 2-D Haar DWT -> stages -> tokens on one grid.
It is the oracle the fast implementations are tested against; `pywt.wavedec2` is its own oracle.
"""

from __future__ import annotations

import torch

from ..common import color_matrix, compute_dtype


def apply_color(x: torch.Tensor, color: str, inverse: bool = False) -> torch.Tensor:
    """x: (B, 3, H, W) -> a new tensor of that shape, mixed across channels ("rgb" copies x: an
    identity matrix would still spread a NaN across the channels)."""
    if color == "rgb":
        return x.clone()
    m = color_matrix(color, x.dtype, x.device, inverse)
    return torch.einsum("oc,bchw->bohw", m, x)


def haar_analysis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2-D Haar DWT on the last two axes.

    On each 2x2 block (a b / c d): A=(a+b+c+d)/2, H=(a+b-c-d)/2, V=(a-b+c-d)/2, D=(a-b-c+d)/2.
    """
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def haar_synthesis(A: torch.Tensor, H: torch.Tensor, V: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `haar_analysis`: four (..., h, w) bands -> (..., 2h, 2w)."""
    out = A.new_empty(*A.shape[:-2], 2 * A.shape[-2], 2 * A.shape[-1])
    out[..., 0::2, 0::2] = (A + H + V + D) / 2
    out[..., 0::2, 1::2] = (A + H - V - D) / 2
    out[..., 1::2, 0::2] = (A - H + V - D) / 2
    out[..., 1::2, 1::2] = (A - H - V + D) / 2
    return out


def stage_to_tokens(stage: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, Cn, h, w) stage image -> (B, Gh*Gw, Cn*Ph*Pw) tokens, rows in row-major grid order."""
    B, Cn, h, w = stage.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    t = stage.reshape(B, Cn, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(B, gh * gw, Cn * ph * pw)


def tokens_to_stage(tokens: torch.Tensor, grid: tuple[int, int], channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `stage_to_tokens`: (B, Gh*Gw, Cn*Ph*Pw) -> (B, Cn, h, w)."""
    B = tokens.shape[0]
    gh, gw = grid
    h, w = size
    ph, pw = h // gh, w // gw
    t = tokens.reshape(B, gh, gw, channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(B, channels, h, w)


def wavelet_tokenize(
    images: torch.Tensor,
    levels: int,
    grid: tuple[int, int],
    color: str = "ycbcr",
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Tokenize images coarse to fine.

    Args:
        images: (B, 3, H, W) float tensor; H divisible by 2**levels * Gh, W by 2**levels * Gw.
        levels: number of Haar levels L.
        grid: (Gh, Gw) token grid shared by every stage.
        color: "ycbcr" or "rgb".
        out_dtype: dtype of the tokens (default: the images' dtype).

    Returns:
        L+1 tensors; stage 0 is (B, Gh*Gw, 3*Ph0*Pw0) from A_L, stage s >= 1 is (B, Gh*Gw, 9*Ph*Pw)
        from the (H, V, D) bands of level L-s+1, channel index c*3 + band.
    """
    out_dtype = out_dtype or images.dtype
    x = apply_color(images.to(compute_dtype(images.dtype)), color)
    B, C = x.shape[:2]
    details = []
    for _ in range(levels):
        x, h, v, d = haar_analysis(x)
        details.append(torch.stack((h, v, d), dim=2).reshape(B, 3 * C, *h.shape[-2:]))
    stages = [x] + details[::-1]
    return [stage_to_tokens(s, grid).to(out_dtype) for s in stages]


def wavelet_detokenize(
    tokens: list[torch.Tensor],
    levels: int,
    grid: tuple[int, int],
    color: str = "ycbcr",
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Rebuild images from the tokens of `wavelet_tokenize` (exact up to rounding).

    Args:
        tokens: the L+1 stage tensors, coarse to fine.
        levels, grid, color: as given to `wavelet_tokenize`.
        image_size: (H, W) of the images.

    Returns:
        (B, 3, H, W) images in the dtype of the tokens.
    """
    H, W = image_size
    dtype = tokens[0].dtype
    B = tokens[0].shape[0]
    C = 3
    size = (H >> levels, W >> levels)
    x = tokens_to_stage(tokens[0].to(compute_dtype(dtype)), grid, C, size)
    for s in range(1, levels + 1):
        bands = tokens_to_stage(tokens[s].to(x.dtype), grid, 3 * C, size).reshape(B, C, 3, *size)
        x = haar_synthesis(x, bands[:, :, 0], bands[:, :, 1], bands[:, :, 2])
        size = (2 * size[0], 2 * size[1])
    return apply_color(x, color, inverse=True).to(dtype).contiguous()
