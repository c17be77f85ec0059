"""The op contracts every backend shares: stage geometry, colour matrices, compute dtype, grids.

This module is the one source of these facts in Python (docs/design.md sections 1 and 3). The
reference, the Triton kernels, the public API and `waveclip.WaveCLIPConfig` import it; `csrc/waveclip.h`
mirrors it for the C++/CUDA extension, and a test checks that the two agree.
"""

from __future__ import annotations

import numbers

import torch

# BT.601 luma/chroma matrix without offsets; rows give Y, Cb, Cr from R, G, B.
YCBCR_FROM_RGB = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
COLORS = ("ycbcr", "rgb")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for oracle tests); every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def color_matrix(color: str, dtype: torch.dtype = torch.float64, device=None, inverse: bool = False) -> torch.Tensor:
    """(3, 3) matrix applied to the channel axis (its inverse with `inverse`); identity for "rgb"."""
    if color == "rgb":
        return torch.eye(3, dtype=dtype, device=device)
    m = torch.tensor(YCBCR_FROM_RGB, dtype=torch.float64)
    if inverse:
        m = torch.linalg.inv(m)
    return m.to(dtype=dtype, device=device)


def _is_int(x) -> bool:
    """A Python or numpy integer, never a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def normalize_levels(levels) -> int:
    """An int >= 0 (numpy ints too, never bools) -> int. levels=0 is one stage: the colour-mixed
    image cut on the grid."""
    if not _is_int(levels) or levels < 0:
        raise ValueError(f"levels must be an int >= 0, got {levels!r}")
    return int(levels)


def normalize_grid(grid) -> tuple[int, int]:
    """An int or an (Gh, Gw) pair of positive ints (numpy ints too, never bools) -> (Gh, Gw)."""
    if isinstance(grid, numbers.Integral) or not hasattr(grid, "__iter__"):
        grid = (grid, grid)
    pair = tuple(grid)
    if len(pair) != 2 or not all(_is_int(g) and g > 0 for g in pair):
        raise ValueError(f"grid must be a positive int or a pair of positive ints, got {grid!r}")
    return int(pair[0]), int(pair[1])


def normalize_image_size(image_size) -> tuple[int, int]:
    """An int (a square image) or an (H, W) pair of positive ints (numpy ints too, never bools) -> (H, W)."""
    pair = (image_size, image_size) if _is_int(image_size) else image_size
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(_is_int(s) and s > 0 for s in pair):
        raise ValueError(f"image_size must be a positive int or an (H, W) pair of positive ints, got {image_size!r}")
    return int(pair[0]), int(pair[1])


def stage_shapes(levels: int, image_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(channels, band height, band width) of every stage, coarse to fine.

    Stage 0 is the approximation A_L (3 channels; with levels=0 the colour-mixed image itself);
    stage s >= 1 holds the H, V, D bands of level L-s+1 as 9 channels (index c*3 + band).
    """
    H, W = image_size
    return [(3, H >> levels, W >> levels)] + [(9, H >> lv, W >> lv) for lv in range(levels, 0, -1)]


def stage_patches(levels: int, grid: tuple[int, int], image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(patch height, patch width) of every stage's tokens on the common Gh x Gw grid."""
    gh, gw = grid
    return [(h // gh, w // gw) for _, h, w in stage_shapes(levels, image_size)]


def stage_dims(levels: int, grid: tuple[int, int], image_size: tuple[int, int]) -> list[int]:
    """Token feature size of every stage: channels * patch height * patch width (48, 144, 576, 2304 at
    224 px, L=3, 7x7)."""
    shapes = stage_shapes(levels, image_size)
    return [c * ph * pw for (c, _, _), (ph, pw) in zip(shapes, stage_patches(levels, grid, image_size))]


def tile_step(levels: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Image height and width must be multiples of these: 2**levels * Gh and 2**levels * Gw."""
    return (grid[0] << levels, grid[1] << levels)


def image_size_error(image_size: tuple[int, int], levels: int, grid: tuple[int, int]) -> str | None:
    """None when (H, W) tiles, else a sentence naming the nearest valid sizes."""
    for axis, size, step in zip(("height", "width"), image_size, tile_step(levels, grid)):
        if size <= 0 or size % step:
            lower, upper = (size // step) * step, (size // step + 1) * step
            nearest = " or ".join(str(s) for s in (lower, upper) if s > 0)
            g = step >> levels
            return (
                f"image {axis} {size} does not tile: it must be a multiple of 2**levels * grid = "
                f"2**{levels} * {g} = {step}; nearest valid {axis}s: {nearest}"
            )
    return None
