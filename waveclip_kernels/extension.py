"""Loader and thin wrappers for the compiled extension `waveclip_kernels._C` (impl "cpu"/"cuda").

Nothing is imported until an op asks: the package works when the extension was never built.
"""

from __future__ import annotations

import functools
import importlib

# Ops each build of the extension provides.
CPU_OPS = ("wavelet_tokenize", "wavelet_detokenize", "block_causal_attention", "attention_with_kv_append")
ATTENTION_OPS = ("block_causal_attention", "attention_with_kv_append")
CUDA_OPS = ("wavelet_tokenize", "wavelet_detokenize", "attention_with_kv_append")


@functools.cache
def load():
    """The extension module, or the ImportError that says why it is missing."""
    import torch  # noqa: F401  (libc10 must be loaded before the extension)

    try:
        return importlib.import_module("waveclip_kernels._C")
    except ImportError as err:
        return err


def unavailable_reason(op: str, impl: str) -> str | None:
    """None when the extension runs `op` for `impl` ("cpu" or "cuda"), else why not."""
    ext = load()
    if isinstance(ext, ImportError):
        return f"the C++ extension is not built ({ext}); run `make setup` or `pip install -e . --no-build-isolation`"
    ops = CPU_OPS if impl == "cpu" else CUDA_OPS
    if op not in ops:
        return f"the extension has no {impl} {op}"
    if impl == "cuda" and not ext.has_cuda():
        return "the extension was built without CUDA"
    if impl == "cpu" and op in ATTENTION_OPS and not ext.cpu_attention_available():
        return "this torch exports no BLAS sgemm_/dgemm_ for the CPU attention kernels"
    return None


def _ext():
    ext = load()
    if isinstance(ext, ImportError):
        raise RuntimeError(f"the C++ extension is not built ({ext})")
    return ext


def wavelet_tokenize(images, levels: int, grid: tuple[int, int], color: str, out_dtype) -> list:
    """Fused tokenizer (CPU OpenMP or CUDA, by the images' device).

    Args:
        images: (B, 3, H, W) float tensor, any strides.
        levels, grid, color, out_dtype: as in `waveclip_kernels.wavelet_tokenize`.

    Returns:
        L+1 contiguous tensors (B, Gh*Gw, dim_s), coarse to fine.
    """
    return _ext().wavelet_tokenize(images, levels, grid[0], grid[1], color, out_dtype)


def wavelet_detokenize(tokens: list, levels: int, grid: tuple[int, int], color: str, image_size: tuple[int, int]):
    """Inverse of `wavelet_tokenize`: L+1 token tensors -> contiguous (B, 3, H, W) in their dtype."""
    return _ext().wavelet_detokenize(list(tokens), levels, grid[0], grid[1], color, image_size[0], image_size[1])


def block_causal_attention(q, k, v, block_sizes: list, scale: float):
    """Block-causal attention on the CPU: q, k, v (B, H, N, D) -> contiguous (B, H, N, D).

    One job per (batch, head, block, query tile of <= 64 rows): scores against the block's prefix only
    (masked pairs are never computed), softmax, then P V, through BLAS; fp16/bf16 compute in fp32.
    The result does not depend on the thread count.
    """
    return _ext().block_causal_attention(q, k, v, list(block_sizes), scale)


def attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale: float):
    """Writes k_new/v_new (B, H, n, D) into the caches at [c, c+n) of each row (in place), then
    attends q to each row's prefix [0, c+n) on the caches themselves (the CPU attention kernels; SDPA
    on CUDA). Reads and checks cache_lens/batch_index. Returns (B, H, n, D)."""
    return _ext().attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale)


def attention_with_kv_append_planned(q, k_new, v_new, k_cache, v_cache, lens: list, rows: list, scale: float):
    """`attention_with_kv_append` with the lengths and (distinct) cache rows already checked on the host:
    no index tensor is read; the C++ side checks shapes and bounds again (O(B))."""
    return _ext().attention_with_kv_append_planned(q, k_new, v_new, k_cache, v_cache, list(lens), list(rows), scale)
