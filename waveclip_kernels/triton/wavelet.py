"""Fused wavelet tokenizer and its inverse (Triton), docs/design.md section 1.

One program owns one rectangle of pixels inside one grid cell of one image. A grid cell of
(H/Gh) x (W/Gw) pixels holds the whole L-level Haar pyramid of its tokens, and so does every aligned
2**L x 2**L square inside it, so a program may cover any number of such squares. The tokenizer reads
each pixel once, applies the colour matrix, runs all L Haar levels in registers and stores every band
straight into its place in the stage token rows: no band tensor ever goes to memory. The inverse
reads the same rectangle of every stage, synthesises the levels in registers and writes the pixels.

Registers hold the three colour planes as one (rows, cols, 4) tile, channel minor (the fourth
channel is padding, zero and never stored). One Haar level reshapes a (2r, 2c, 4) tile to
(r, 2, c, 2, 4), permutes it to (r, c, 4, 2, 2) and splits it twice into its polyphase parts
a b / c d; the inverse joins them back. Tile sides are powers of two: the BY x BX stage-0 positions of
a program pad a cell's PH0 x PW0 stage-0 patch, and padded positions are masked on load and store.
Arithmetic is float32 (float64 for float64 inputs, as in the reference); stores round to the output
dtype. Index arithmetic is int64.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..common import color_matrix, compute_dtype

# A program covers at most MAX_TILE x MAX_TILE pixels, or one 2**L x 2**L square when that is larger:
# a 32 x 32 cell of the default presets is one program, 3 x 1024 values in registers. ptxas for sm_90
# (tokenizer / inverse, registers a thread, spills): 32 x 32 tiles at 8 / 4 warps need 66-80 / 56 in
# bf16, fp16 and fp32 and 138 / 128 in fp64, no spills; 64 x 64 tiles need 255 registers in fp32 and
# spill 1.1 KB (fp64 tokenizer) and 19 KB (fp64 inverse) at those warp counts. So 32 x 32 for every
# dtype; the one 64 x 64 square of L = 6 gets four times the warps (see `_warps`).
MAX_TILE = 32
TOKENIZE_WARPS = 8
DETOKENIZE_WARPS = 4
# A program holds a whole 2**L square: 128 x 128 (L = 7) spills tens of KB whatever the warp count.
MAX_LEVELS = 6


@functools.cache
def _mix_matrix(color: str, dtype: torch.dtype, device: torch.device, inverse: bool) -> torch.Tensor:
    """The (3, 3) colour matrix (or its inverse; identity for rgb), row-major, made once per device."""
    return color_matrix(color, dtype, device, inverse).contiguous()


def _program_tile(patch: int, levels: int) -> int:
    """Stage-0 positions one program covers along an axis: a power of two, <= MAX_TILE pixels."""
    return min(triton.next_power_of_2(patch), max(1, MAX_TILE >> levels))


def _warps(base: int, levels: int) -> int:
    """Warps per program: `base` for tiles of at most MAX_TILE x MAX_TILE pixels, scaled with the area
    of a larger 2**L square so that each thread holds as many values."""
    return base * max(1, ((1 << levels) // MAX_TILE) ** 2)


def _check_levels(levels: int) -> None:
    if levels > MAX_LEVELS:
        raise ValueError(
            f'impl="triton" runs at most {MAX_LEVELS} levels (one program holds a 2**levels pixel square), '
            f'got {levels}; use impl="cuda" or "reference"'
        )


def _device_guard(t: torch.Tensor):
    """Enter the tensor's CUDA device for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _round_to(x, OUT: tl.constexpr):
    """x (compute dtype) -> OUT, rounded to nearest even as torch's `.to()` rounds. float64 reaches the
    16-bit types through float32, as in torch. bfloat16 is rounded on the bits: the interpreter's own
    float32 -> bfloat16 cast truncates, and its float64 -> bfloat16 cast is wrong."""
    if OUT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN -> the quiet NaN torch writes
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT == tl.float16:
        return x.to(tl.float32).to(tl.float16)
    else:
        return x.to(OUT)


@triton.jit
def _haar_split(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(2*ROWS, 2*COLS, 4) tile -> its polyphase parts a b / c d, each (ROWS, COLS, 4)."""
    x = tl.permute(tl.reshape(x, (ROWS, 2, COLS, 2, 4)), (0, 2, 4, 1, 3))
    even_col, odd_col = tl.split(x)  # (ROWS, COLS, 4, 2): the last axis is the row parity
    a, c = tl.split(even_col)
    b, d = tl.split(odd_col)
    return a, b, c, d


@triton.jit
def _haar_merge(a, b, c, d, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Inverse of `_haar_split`: four (ROWS, COLS, 4) parts -> one (2*ROWS, 2*COLS, 4) tile."""
    x = tl.join(tl.join(a, b), tl.join(c, d))  # (ROWS, COLS, 4, col parity, row parity)
    return tl.reshape(tl.permute(x, (0, 4, 1, 3, 2)), (2 * ROWS, 2 * COLS, 4))


@triton.jit
def _patch_offsets(tile_y, tile_x, PH: tl.constexpr, PW: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """For the (ROWS, COLS) rectangle at tile (tile_y, tile_x) of a PH x PW patch: the position offset
    py*PW + px (ROWS, COLS, 1), the channel index (1, 1, 4) and the mask of real positions/channels."""
    py = tile_y * ROWS + tl.arange(0, ROWS).to(tl.int64)
    px = tile_x * COLS + tl.arange(0, COLS).to(tl.int64)
    ch = tl.arange(0, 4).to(tl.int64)[None, None, :]
    pos = py[:, None, None] * PW + px[None, :, None]
    mask = (py < PH)[:, None, None] & (px < PW)[None, :, None] & (ch < 3)
    return pos, ch, mask


@triton.jit
def _store_details(
    out_ptrs,  # tuple of LEVELS+1 pointers; stage s: (B, GH*GW, dim_s) tokens
    stride_ob,
    stride_og,
    stride_of,
    image,
    cell,
    tile_y,
    tile_x,
    a,  # (BY << (S-1), BX << (S-1), 4) polyphase parts of the finer approximation
    b,
    c,
    d,
    S: tl.constexpr,  # stage of these details
    PH0: tl.constexpr,
    PW0: tl.constexpr,
    BY: tl.constexpr,
    BX: tl.constexpr,
):
    """Write the H, V, D bands of stage S: feature (3 * channel + band) * PH*PW + position."""
    PH: tl.constexpr = PH0 << (S - 1)
    PW: tl.constexpr = PW0 << (S - 1)
    pos, ch, mask = _patch_offsets(tile_y, tile_x, PH, PW, BY << (S - 1), BX << (S - 1))
    token = out_ptrs[S] + image * stride_ob[S] + cell * stride_og[S]
    band = token + ((3 * ch) * (PH * PW) + pos) * stride_of[S]
    out_ty = out_ptrs[S].dtype.element_ty
    tl.store(band, _round_to((a + b - c - d) * 0.5, out_ty), mask=mask)
    tl.store(band + (PH * PW) * stride_of[S], _round_to((a - b + c - d) * 0.5, out_ty), mask=mask)
    tl.store(band + (2 * PH * PW) * stride_of[S], _round_to((a - b - c + d) * 0.5, out_ty), mask=mask)


@triton.jit
def _merge_details(
    planes,  # (BY << (S-1), BX << (S-1), 4) approximation below stage S
    tok_ptrs,  # tuple of LEVELS+1 pointers; stage s: (B, GH*GW, dim_s) tokens
    stride_tb,
    stride_tg,
    stride_tf,
    image,
    cell,
    tile_y,
    tile_x,
    S: tl.constexpr,
    PH0: tl.constexpr,
    PW0: tl.constexpr,
    BY: tl.constexpr,
    BX: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Read the H, V, D bands of stage S and synthesise the approximation twice the size."""
    PH: tl.constexpr = PH0 << (S - 1)
    PW: tl.constexpr = PW0 << (S - 1)
    pos, ch, mask = _patch_offsets(tile_y, tile_x, PH, PW, BY << (S - 1), BX << (S - 1))
    token = tok_ptrs[S] + image * stride_tb[S] + cell * stride_tg[S]
    band = token + ((3 * ch) * (PH * PW) + pos) * stride_tf[S]
    h = tl.load(band, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(band + (PH * PW) * stride_tf[S], mask=mask, other=0.0).to(COMPUTE)
    d = tl.load(band + (2 * PH * PW) * stride_tf[S], mask=mask, other=0.0).to(COMPUTE)
    return _haar_merge(
        (planes + h + v + d) * 0.5,
        (planes + h - v - d) * 0.5,
        (planes - h + v - d) * 0.5,
        (planes - h - v + d) * 0.5,
        BY << (S - 1),
        BX << (S - 1),
    )


@triton.jit
def _tokenize_kernel(
    img_ptr,  # (B, 3, H, W) images
    out_ptrs,  # tuple of LEVELS+1 pointers; stage s: (B, GH*GW, dim_s) tokens
    mix_ptr,  # (3, 3) colour matrix, compute dtype
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_ob,  # tuples of LEVELS+1 strides: batch, token and feature of every stage
    stride_og,
    stride_of,
    LEVELS: tl.constexpr,
    GH: tl.constexpr,
    GW: tl.constexpr,
    PH0: tl.constexpr,  # stage-0 patch height: (H / GH) >> LEVELS
    PW0: tl.constexpr,
    BY: tl.constexpr,  # stage-0 positions per program along rows (power of two)
    BX: tl.constexpr,
    COMPUTE: tl.constexpr,
    MIX: tl.constexpr,  # False for rgb: the channels are copied, not multiplied by the identity
):
    R: tl.constexpr = 1 << LEVELS  # pixels per stage-0 position along each axis
    TILES: tl.constexpr = tl.cdiv(PH0, BY) * tl.cdiv(PW0, BX)  # rectangles per cell
    pid = tl.program_id(0).to(tl.int64)  # (image * GH*GW + cell) * TILES + rectangle, on grid axis 0
    image = pid // (TILES * GH * GW)
    cell = (pid // TILES) % (GH * GW)
    tile_y = (pid % TILES) // tl.cdiv(PW0, BX)
    tile_x = (pid % TILES) % tl.cdiv(PW0, BX)

    # Read the rectangle once: three (BY*R, BX*R) colour planes mixed into one (BY*R, BX*R, 4) tile.
    ry = tile_y * (BY * R) + tl.arange(0, BY * R).to(tl.int64)
    rx = tile_x * (BX * R) + tl.arange(0, BX * R).to(tl.int64)
    mask = (ry < PH0 * R)[:, None] & (rx < PW0 * R)[None, :]
    y = (cell // GW) * (PH0 * R) + ry
    x = (cell % GW) * (PW0 * R) + rx
    pix = img_ptr + image * stride_ib + y[:, None] * stride_ih + x[None, :] * stride_iw
    out_ch = tl.arange(0, 4)
    planes = tl.zeros((BY * R, BX * R, 4), dtype=COMPUTE)
    for c in tl.static_range(3):
        value = tl.load(pix + c * stride_ic, mask=mask, other=0.0).to(COMPUTE)
        if MIX:
            column = tl.load(mix_ptr + 3 * out_ch + c, mask=out_ch < 3, other=0.0)  # matrix[:, c]
            planes += value[:, :, None] * column[None, None, :]
        else:  # rgb: a select, so that a NaN stays in its channel
            planes = tl.where(out_ch[None, None, :] == c, value[:, :, None], planes)

    # Level lvl splits the approximation into four half-size bands; its details are stage L-lvl+1.
    for lvl in tl.static_range(1, LEVELS + 1):
        a, b, c, d = _haar_split(planes, BY << (LEVELS - lvl), BX << (LEVELS - lvl))
        _store_details(
            out_ptrs, stride_ob, stride_og, stride_of, image, cell, tile_y, tile_x, a, b, c, d,
            LEVELS - lvl + 1, PH0, PW0, BY, BX,
        )  # fmt: skip
        planes = (a + b + c + d) * 0.5
    pos, ch, mask = _patch_offsets(tile_y, tile_x, PH0, PW0, BY, BX)
    token = out_ptrs[0] + image * stride_ob[0] + cell * stride_og[0]
    tl.store(
        token + (ch * (PH0 * PW0) + pos) * stride_of[0], _round_to(planes, out_ptrs[0].dtype.element_ty), mask=mask
    )


@triton.jit
def _detokenize_kernel(
    tok_ptrs,  # tuple of LEVELS+1 pointers; stage s: (B, GH*GW, dim_s) tokens
    img_ptr,  # (B, 3, H, W) output images
    mix_ptr,  # (3, 3) inverse colour matrix, compute dtype
    stride_tb,  # tuples of LEVELS+1 strides: batch, token and feature of every stage
    stride_tg,
    stride_tf,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    LEVELS: tl.constexpr,
    GH: tl.constexpr,
    GW: tl.constexpr,
    PH0: tl.constexpr,
    PW0: tl.constexpr,
    BY: tl.constexpr,
    BX: tl.constexpr,
    COMPUTE: tl.constexpr,
    MIX: tl.constexpr,
):
    R: tl.constexpr = 1 << LEVELS
    TILES: tl.constexpr = tl.cdiv(PH0, BY) * tl.cdiv(PW0, BX)
    pid = tl.program_id(0).to(tl.int64)  # (image * GH*GW + cell) * TILES + rectangle
    image = pid // (TILES * GH * GW)
    cell = (pid // TILES) % (GH * GW)
    tile_y = (pid % TILES) // tl.cdiv(PW0, BX)
    tile_x = (pid % TILES) % tl.cdiv(PW0, BX)

    pos, ch, mask = _patch_offsets(tile_y, tile_x, PH0, PW0, BY, BX)
    token = tok_ptrs[0] + image * stride_tb[0] + cell * stride_tg[0]
    planes = tl.load(token + (ch * (PH0 * PW0) + pos) * stride_tf[0], mask=mask, other=0.0).to(COMPUTE)
    # Stage s holds the details of level L-s+1: each one doubles the approximation's size.
    for s in tl.static_range(1, LEVELS + 1):
        planes = _merge_details(
            planes, tok_ptrs, stride_tb, stride_tg, stride_tf, image, cell, tile_y, tile_x, s, PH0, PW0, BY, BX, COMPUTE
        )

    ry = tile_y * (BY * R) + tl.arange(0, BY * R).to(tl.int64)
    rx = tile_x * (BX * R) + tl.arange(0, BX * R).to(tl.int64)
    mask = (ry < PH0 * R)[:, None] & (rx < PW0 * R)[None, :]
    y = (cell // GW) * (PH0 * R) + ry
    x = (cell % GW) * (PW0 * R) + rx
    pix = img_ptr + image * stride_ib + y[:, None] * stride_ih + x[None, :] * stride_iw
    in_ch = tl.arange(0, 4)
    for c in tl.static_range(3):
        if MIX:
            row = tl.load(mix_ptr + 3 * c + in_ch, mask=in_ch < 3, other=0.0)  # matrix[c, :]
            value = tl.sum(planes * row[None, None, :], axis=2)
        else:  # rgb: a select, so that a NaN stays in its channel
            value = tl.sum(tl.where(in_ch[None, None, :] == c, planes, 0.0), axis=2)
        tl.store(pix + c * stride_ic, _round_to(value, img_ptr.dtype.element_ty), mask=mask)


def _launch_shape(levels: int, grid: tuple[int, int], image_size: tuple[int, int]):
    """Stage-0 patch (PH0, PW0), stage-0 positions per program (BY, BX) and rectangles per cell."""
    gh, gw = grid
    ph0, pw0 = (image_size[0] // gh) >> levels, (image_size[1] // gw) >> levels
    by, bx = _program_tile(ph0, levels), _program_tile(pw0, levels)
    return (ph0, pw0), (by, bx), triton.cdiv(ph0, by) * triton.cdiv(pw0, bx)


def _meta(levels, grid, ph0, pw0, by, bx, dtype, color, num_warps):
    return dict(
        MIX=color != "rgb",
        LEVELS=levels,
        GH=grid[0],
        GW=grid[1],
        PH0=ph0,
        PW0=pw0,
        BY=by,
        BX=bx,
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        num_warps=num_warps,
    )


def wavelet_tokenize(
    images: torch.Tensor,
    levels: int,
    grid: tuple[int, int],
    color: str,
    out_dtype: torch.dtype,
    *,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Tokenize images in one fused pass: colour, L Haar levels and patch layout.

    Args:
        images: (B, 3, H, W) float16/bfloat16/float32/float64, any strides; H divisible by
            2**levels * Gh and W by 2**levels * Gw (checked by the public API).
        levels: Haar levels 0 <= L <= MAX_LEVELS.
        grid: (Gh, Gw) token grid.
        color: "ycbcr" or "rgb".
        out_dtype: dtype of the tokens.
        out: optional L+1 preallocated (B, Gh*Gw, dim_s) tensors of out_dtype, any strides, to write.

    Returns:
        L+1 tensors (B, Gh*Gw, dim_s), coarse to fine (contiguous unless `out` was given).
    """
    _check_levels(levels)
    B, _, H, W = images.shape
    gh, gw = grid
    (ph0, pw0), (by, bx), tiles = _launch_shape(levels, grid, (H, W))
    if out is None:
        dims = [3 * ph0 * pw0] + [9 * (ph0 << (s - 1)) * (pw0 << (s - 1)) for s in range(1, levels + 1)]
        out = [torch.empty(B, gh * gw, d, dtype=out_dtype, device=images.device) for d in dims]
    if B == 0:
        return out
    ct = compute_dtype(images.dtype)
    with _device_guard(images):
        _tokenize_kernel[(B * gh * gw * tiles,)](
            images,
            tuple(out),
            _mix_matrix(color, ct, images.device, False),
            *images.stride(),
            tuple(t.stride(0) for t in out),
            tuple(t.stride(1) for t in out),
            tuple(t.stride(2) for t in out),
            **_meta(levels, grid, ph0, pw0, by, bx, ct, color, _warps(TOKENIZE_WARPS, levels)),
        )
    return out


def wavelet_detokenize(
    tokens: list[torch.Tensor],
    levels: int,
    grid: tuple[int, int],
    color: str,
    image_size: tuple[int, int],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild images from stage tokens in one fused pass (inverse of `wavelet_tokenize`).

    Args:
        tokens: L+1 tensors (B, Gh*Gw, dim_s) of one float dtype, any strides.
        levels, grid, color: as given to `wavelet_tokenize`.
        image_size: (H, W).
        out: optional preallocated (B, 3, H, W) tensor of the tokens' dtype, any strides, to write.

    Returns:
        (B, 3, H, W) images in the tokens' dtype (contiguous unless `out` was given).
    """
    _check_levels(levels)
    B = tokens[0].shape[0]
    (ph0, pw0), (by, bx), tiles = _launch_shape(levels, grid, image_size)
    dtype = tokens[0].dtype
    if out is None:
        out = torch.empty(B, 3, *image_size, dtype=dtype, device=tokens[0].device)
    if B == 0:
        return out
    ct = compute_dtype(dtype)
    with _device_guard(out):
        _detokenize_kernel[(B * grid[0] * grid[1] * tiles,)](
            tuple(tokens),
            out,
            _mix_matrix(color, ct, out.device, True),
            tuple(t.stride(0) for t in tokens),
            tuple(t.stride(1) for t in tokens),
            tuple(t.stride(2) for t in tokens),
            *out.stride(),
            **_meta(levels, grid, ph0, pw0, by, bx, ct, color, _warps(DETOKENIZE_WARPS, levels)),
        )
    return out
