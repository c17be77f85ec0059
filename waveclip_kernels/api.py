"""The public ops: validate, pick an implementation, dispatch.

Every check runs before anything is computed or written. `impl="auto"` takes the fastest
implementation that runs for the inputs' device; an explicit impl that cannot run raises.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
from torch.autograd.graph import increment_version

from . import _library
from .common import FLOAT_DTYPES, image_size_error, normalize_grid, normalize_image_size, normalize_levels, stage_dims
from .kvappend import KVAppendPlan, build_plan

IMPLS = ("auto", "triton", "cuda", "cpu", "reference")
OPS = ("wavelet_tokenize", "wavelet_detokenize", "block_causal_attention", "attention_with_kv_append")

# Preference order of "auto" per (op, device type); the first one that runs wins. Triton on the
# CPU only runs under TRITON_INTERPRET=1 and is far too slow to be picked automatically there.
AUTO_ORDER = {
    ("wavelet_tokenize", "cuda"): ("cuda", "triton", "reference"),
    ("wavelet_detokenize", "cuda"): ("cuda", "triton", "reference"),
    ("block_causal_attention", "cuda"): ("triton", "reference"),
    ("attention_with_kv_append", "cuda"): ("triton", "cuda", "reference"),
    ("wavelet_tokenize", "cpu"): ("cpu", "reference"),
    ("wavelet_detokenize", "cpu"): ("cpu", "reference"),
    ("block_causal_attention", "cpu"): ("cpu", "reference"),
    ("attention_with_kv_append", "cpu"): ("cpu", "reference"),
}


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _unavailable_reason(impl: str, op: str, device_type: str) -> str | None:
    """None when `impl` can run `op` on `device_type`, else a sentence saying why not."""
    if impl == "reference":
        return None
    if impl == "triton":
        if not _triton_importable():
            return "Triton is not installed (import triton failed)"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return None
    if impl in ("cpu", "cuda"):
        if impl != device_type:
            return f'impl="{impl}" needs {impl} tensors, got {device_type} tensors'
        from . import extension

        return extension.unavailable_reason(op, impl)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def available_impls(device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """For each op, the concrete impls that run on `device` here, fastest first for "auto"."""
    device_type = torch.device(device).type
    out = {}
    for op in OPS:
        order = AUTO_ORDER.get((op, device_type), ("reference",))
        rest = [i for i in IMPLS[1:] if i not in order]
        out[op] = [i for i in (*order, *rest) if _unavailable_reason(i, op, device_type) is None]
    return out


def resolve_impl(impl: str, op: str, device: torch.device) -> str:
    """The concrete impl that will run; raises RuntimeError for an explicit impl that cannot."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chosen, reason = _resolve(impl, op, torch.device(device).type)
    if reason is not None:
        raise RuntimeError(f'{op}: impl="{impl}" cannot run: {reason}')
    return chosen


@torch.compiler.assume_constant_result
def _resolve(impl: str, op: str, device_type: str) -> tuple[str, str | None]:
    """(impl that runs, None) or (impl, why it cannot run). What is installed does not change while a
    program runs, so `torch.compile` takes the answer as a constant instead of tracing the imports."""
    if impl == "auto":
        for candidate in AUTO_ORDER.get((op, device_type), ("reference",)):
            if _unavailable_reason(candidate, op, device_type) is None:
                return candidate, None
        return "reference", None
    return impl, _unavailable_reason(impl, op, device_type)


# ----------------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def _check_color(color) -> None:
    if color not in ("ycbcr", "rgb"):
        raise ValueError(f'color must be "ycbcr" or "rgb", got {color!r}')


def check_image_size(image_size: tuple[int, int], levels: int, grid: tuple[int, int]) -> None:
    """Raise a ValueError naming the nearest valid sizes when H or W does not tile."""
    message = image_size_error(image_size, levels, grid)
    if message is not None:
        raise ValueError(message)


# ------------------------------------------------------------------------------------------ ops


def wavelet_tokenize(images, levels: int, grid, color: str = "ycbcr", out_dtype=None, impl: str = "auto"):
    """Tokenize images with an L-level Haar DWT on one token grid (docs/design.md section 1).

    Args:
        images: (B, 3, H, W) float tensor, CLIP-preprocessed; H divisible by 2**levels * Gh,
            W by 2**levels * Gw.
        levels: number of wavelet levels L >= 0 (0: one stage, the colour-mixed image on the grid).
        grid: token grid, an int or (Gh, Gw).
        color: "ycbcr" (BT.601, no offsets) or "rgb".
        out_dtype: dtype of the tokens (default: the images' dtype).
        impl: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        A list of L+1 tensors, coarse to fine: stage s is (B, Gh*Gw, dim_s).
    """
    _check_tensor("images", images, 4)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
    levels = normalize_levels(levels)
    grid = normalize_grid(grid)
    _check_color(color)
    check_image_size(tuple(images.shape[-2:]), levels, grid)
    out_dtype = images.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    chosen = resolve_impl(impl, "wavelet_tokenize", images.device)
    return _library.wavelet_tokenize(images, levels, list(grid), color, out_dtype, chosen)


def wavelet_detokenize(tokens, levels: int, grid, color: str = "ycbcr", image_size=None, impl: str = "auto"):
    """Rebuild images from stage tokens: the exact inverse of `wavelet_tokenize`.

    Args:
        tokens: sequence of L+1 tensors (B, Gh*Gw, dim_s), coarse to fine, one dtype and device.
        levels, grid, color: as given to `wavelet_tokenize`.
        image_size: (H, W), or an int for a square image. Required: the token shapes fix the area of
            a grid cell, not its aspect (16 x 64 and 32 x 32 images give the same shapes).
        impl: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        (B, 3, H, W) images in the tokens' dtype.
    """
    levels = normalize_levels(levels)
    grid = normalize_grid(grid)
    _check_color(color)
    if not isinstance(tokens, Sequence) or len(tokens) != levels + 1:
        raise ValueError(f"tokens must be a sequence of levels + 1 = {levels + 1} tensors")
    for s, t in enumerate(tokens):
        _check_tensor(f"tokens[{s}]", t, 3)
        _same(f"tokens[{s}]", t, "tokens[0]", tokens[0])
    if image_size is None:
        raise ValueError(
            "image_size is required: the token shapes fix the area of a grid cell but not its aspect; "
            "pass image_size=(H, W) as given to wavelet_tokenize"
        )
    image_size = normalize_image_size(image_size)
    check_image_size(image_size, levels, grid)
    dims = stage_dims(levels, grid, image_size)
    B = tokens[0].shape[0]
    for s, (t, d) in enumerate(zip(tokens, dims)):
        expected = (B, grid[0] * grid[1], d)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"tokens[{s}] must have shape {expected} for image_size {image_size}, got {tuple(t.shape)}"
            )
    chosen = resolve_impl(impl, "wavelet_detokenize", tokens[0].device)
    return _library.wavelet_detokenize(list(tokens), levels, list(grid), color, list(image_size), chosen)


def _check_qkv(names: tuple[str, str, str], q, k, v) -> None:
    for name, t in zip(names, (q, k, v)):
        _check_tensor(name, t, 4)
    _same(names[1], k, names[0], q)
    _same(names[2], v, names[0], q)
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} {tuple(k.shape)} and {names[2]} {tuple(v.shape)} must have one shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{names[0]} {tuple(q.shape)} and {names[1]} {tuple(k.shape)} must agree in batch, heads and head dim"
        )
    if q.shape[3] < 1:
        raise ValueError(f"the head dim (dim 3) must be at least 1, got {names[0]} {tuple(q.shape)}")


def _scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def block_causal_attention(q, k, v, block_sizes, scale: float | None = None, impl: str = "auto"):
    """Block-causal attention: a query in block i attends to the keys of blocks <= i.

    Args:
        q, k, v: (B, H, N, D) tensors of one dtype and device.
        block_sizes: positive ints that partition N, in sequence order.
        scale: softmax scale (default 1/sqrt(D)).
        impl: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        (B, H, N, D) in q's dtype.
    """
    _check_qkv(("q", "k", "v"), q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} positions but k has {k.shape[2]}; block-causal attention is self-attention"
        )
    sizes = [int(s) for s in block_sizes]
    if not sizes or any(s <= 0 for s in sizes) or sum(sizes) != q.shape[2]:
        raise ValueError(f"block_sizes must be positive and sum to N={q.shape[2]}, got {list(block_sizes)}")
    chosen = resolve_impl(impl, "block_causal_attention", q.device)
    op = _library.block_causal_body if _library.eager_direct(q, k, v) else _library.block_causal_attention
    return op(q, k, v, sizes, _scale(scale, q.shape[-1]), chosen)[0]


def _check_index_tensor(name: str, t: torch.Tensor, batch: int, device: torch.device) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold int32 or int64 values, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_caches(q, k_new, v_new, k_cache, v_cache) -> None:
    _check_qkv(("q", "k_new", "v_new"), q, k_new, v_new)
    if q.shape != k_new.shape:
        raise ValueError(f"q {tuple(q.shape)} and k_new {tuple(k_new.shape)} must have one shape")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, 4)
        _same(name, cache, "q", q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    if k_cache.shape[1] != q.shape[1] or k_cache.shape[3] != q.shape[3]:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} must match q {tuple(q.shape)} in heads (dim 1) and head dim (dim 3)"
        )


def _check_plan(plan: KVAppendPlan, q: torch.Tensor, k_cache: torch.Tensor) -> None:
    B, _, n, _ = q.shape
    made_for = (plan.batch, plan.new_tokens, plan.cache_rows, plan.cache_len)
    if made_for != (B, n, k_cache.shape[0], k_cache.shape[2]) or plan.cache_lens.device != q.device:
        raise ValueError(
            f"the plan was made for (B, n, B_cache, N_max) = {made_for} on {plan.cache_lens.device}, but q is "
            f"{tuple(q.shape)} and k_cache {tuple(k_cache.shape)} on {q.device}"
        )


def attention_with_kv_append(
    q,
    k_new,
    v_new,
    k_cache,
    v_cache,
    cache_lens,
    batch_index=None,
    scale: float | None = None,
    impl: str = "auto",
):
    """Append k_new/v_new to the caches in place, then attend q to each row's whole prefix.

    Args:
        q, k_new, v_new: (B, H, n, D).
        k_cache, v_cache: (B_cache, H, N_max, D) of q's dtype and device; written at [c, c+n).
        cache_lens: filled length c of each row before the append (the caller advances it): a (B,)
            int32/int64 tensor (its values are read and checked inside the op, before it writes), a
            sequence of B ints, or a `KVAppendPlan` from `kv_append_plan`, checked once for many calls
            (the lengths and rows then come from the plan: leave batch_index None).
        batch_index: optional (B,) distinct ints in [0, B_cache): cache row of each query row.
        scale: softmax scale (default 1/sqrt(D)).
        impl: "auto", "triton", "cuda", "cpu" or "reference".

    Returns:
        (B, H, n, D) in q's dtype.
    """
    _check_caches(q, k_new, v_new, k_cache, v_cache)
    B, _, n, _ = q.shape
    if isinstance(cache_lens, KVAppendPlan):
        if batch_index is not None:
            raise ValueError("with a KVAppendPlan the rows come from the plan: pass batch_index to kv_append_plan")
        _check_plan(cache_lens, q, k_cache)
        plan = cache_lens
    elif isinstance(cache_lens, torch.Tensor) and (batch_index is None or isinstance(batch_index, torch.Tensor)):
        plan = None
        _check_index_tensor("cache_lens", cache_lens, B, q.device)
        if batch_index is None and B > k_cache.shape[0]:
            raise ValueError(f"q has batch {B} but the caches hold {k_cache.shape[0]} rows; pass batch_index")
        if batch_index is not None:
            _check_index_tensor("batch_index", batch_index, B, q.device)
    else:
        plan = build_plan(cache_lens, batch_index, B, n, k_cache)
    chosen = resolve_impl(impl, "attention_with_kv_append", q.device)
    if plan is None:
        lens_t, index_t, lens, rows = cache_lens, batch_index, None, None
    else:
        lens_t, index_t, lens, rows = plan.cache_lens, plan.batch_index, list(plan.lens), list(plan.rows)
    args = (q, k_new, v_new, k_cache, v_cache, lens_t, index_t, _scale(scale, q.shape[-1]), chosen, lens, rows)
    if not _library.eager_direct(q, k_new, v_new, k_cache, v_cache):
        return _library.attention_with_kv_append(*args)
    out = _library.kv_append_body(*args)
    increment_version((k_cache, v_cache))  # as the custom op records its in-place writes
    return out
