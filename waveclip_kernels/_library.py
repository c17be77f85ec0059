"""torch.library registration of the four ops (schemas, fake implementations, autograd).

Each op is one custom op whose last argument names the backend the public API already chose,
so `torch.compile` and FLOP counters see `waveclip::<op>` whatever ran underneath. Backends are
imported inside the op bodies: registering them touches neither Triton nor the extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .common import color_matrix, compute_dtype, stage_dims


def backend(impl: str):
    """The module that implements the ops for a concrete impl name."""
    if impl == "reference":
        return reference
    if impl == "triton":
        from . import triton as triton_backend

        return triton_backend
    if impl in ("cpu", "cuda"):
        from . import extension

        return extension
    raise ValueError(f"unknown impl {impl!r}")


@torch.library.custom_op("waveclip::wavelet_tokenize", mutates_args=())
def wavelet_tokenize(
    images: Tensor, levels: int, grid: list[int], color: str, out_dtype: torch.dtype, impl: str
) -> list[Tensor]:
    return list(backend(impl).wavelet_tokenize(images, levels, tuple(grid), color, out_dtype))


@wavelet_tokenize.register_fake
def _(images, levels, grid, color, out_dtype, impl):
    B, _, H, W = images.shape
    n = grid[0] * grid[1]
    return [images.new_empty(B, n, d, dtype=out_dtype) for d in stage_dims(levels, tuple(grid), (H, W))]


@torch.library.custom_op("waveclip::wavelet_detokenize", mutates_args=())
def wavelet_detokenize(
    tokens: list[Tensor], levels: int, grid: list[int], color: str, image_size: list[int], impl: str
) -> Tensor:
    return backend(impl).wavelet_detokenize(list(tokens), levels, tuple(grid), color, tuple(image_size))


@wavelet_detokenize.register_fake
def _(tokens, levels, grid, color, image_size, impl):
    return tokens[0].new_empty(tokens[0].shape[0], 3, *image_size)


# The tokenizer is linear: tokens = P W (M x), with M the per-pixel colour matrix, W the orthonormal
# Haar analysis (W^T W = I) and P the patch layout (a permutation). Its adjoint is M^T W^T P^T, i.e.
# the rgb detokenizer (W^T P^T) followed by M^T per pixel. The detokenizer is M^-1 W^T P^T, whose
# adjoint P W M^-T is the rgb tokenizer after M^-T per pixel. The backward runs these through the
# same ops and backend, so it is differentiable again (double backward) and as fast as the forward.
def _mix(x: Tensor, color: str, inverse: bool) -> Tensor:
    """x (B, 3, H, W) -> M^T x per pixel (M^-T with `inverse`), computed in x's compute dtype."""
    if color == "rgb":
        return x
    m = color_matrix(color, compute_dtype(x.dtype), x.device, inverse)
    return torch.einsum("co,bchw->bohw", m, x.to(m.dtype)).to(x.dtype)


def _tokenize_setup_context(ctx, inputs, output):
    images, levels, grid, color, _, impl = inputs
    ctx.args = (levels, grid, color, list(images.shape[-2:]), impl)
    ctx.images_dtype = images.dtype


def _tokenize_backward(ctx, grads):
    levels, grid, color, size, impl = ctx.args
    like = next(g for g in grads if g is not None)
    dtype = torch.promote_types(ctx.images_dtype, like.dtype)  # 16-bit tokens of fp32 images: fp32 grads
    B, n = like.shape[:2]
    dims = stage_dims(levels, tuple(grid), tuple(size))
    grads = [like.new_zeros(B, n, d, dtype=dtype) if g is None else g.to(dtype) for g, d in zip(grads, dims)]
    pixels = wavelet_detokenize(grads, levels, grid, "rgb", size, impl)
    return _mix(pixels, color, inverse=False).to(ctx.images_dtype), None, None, None, None, None


wavelet_tokenize.register_autograd(_tokenize_backward, setup_context=_tokenize_setup_context)


def _detokenize_setup_context(ctx, inputs, output):
    tokens, levels, grid, color, _, impl = inputs
    ctx.args = (levels, grid, color, impl)
    ctx.tokens_dtype = tokens[0].dtype


def _detokenize_backward(ctx, grad):
    levels, grid, color, impl = ctx.args
    grad = _mix(grad.to(ctx.tokens_dtype), color, inverse=True)
    tokens = wavelet_tokenize(grad, levels, grid, "rgb", ctx.tokens_dtype, impl)
    return list(tokens), None, None, None, None, None


wavelet_detokenize.register_autograd(_detokenize_backward, setup_context=_detokenize_setup_context)


@torch.library.custom_op("waveclip::block_causal_attention", mutates_args=())
def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, block_sizes: list[int], scale: float, impl: str) -> Tensor:
    return backend(impl).block_causal_attention(q, k, v, list(block_sizes), scale)


@block_causal_attention.register_fake
def _(q, k, v, block_sizes, scale, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, block_sizes, scale, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.block_sizes, ctx.scale = block_sizes, scale


def _attention_backward(ctx, grad_out):
    # Gradients come from autograd through the readable reference, whatever ran forward.
    q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
    with torch.enable_grad():
        out = reference.block_causal_attention(q, k, v, ctx.block_sizes, ctx.scale)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return dq, dk, dv, None, None, None


block_causal_attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("waveclip::attention_with_kv_append", mutates_args=("k_cache", "v_cache"))
def attention_with_kv_append(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    batch_index: Tensor | None,
    scale: float,
    impl: str,
) -> Tensor:
    return backend(impl).attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale)


@attention_with_kv_append.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
