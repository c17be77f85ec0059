"""torch.library registration of the four ops (schemas, fake implementations, autograd).

Each op is one custom op whose last argument names the backend the public API already chose,
so `torch.compile` and FLOP counters see `waveclip::<op>` whatever ran underneath. Backends are
imported inside the op bodies: registering them touches neither Triton nor the extension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import kvappend, reference
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


def eager_direct(*tensors: Tensor) -> bool:
    """Whether calling an attention op's body directly runs exactly what dispatching its custom op would:
    plain tensors on a CPU or CUDA device, nothing for autograd to record, and no compiler, tracer,
    profiler, mode or functorch transform that must see the op. (Dispatch costs ~20 us a call.)"""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.autograd._profiler_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    grad = torch.is_grad_enabled()
    return all(
        type(t) is Tensor and t.device.type in ("cpu", "cuda") and not (grad and t.requires_grad) for t in tensors
    )


def block_causal_body(
    q: Tensor, k: Tensor, v: Tensor, block_sizes: list[int], scale: float, impl: str
) -> tuple[Tensor, Tensor]:
    """What `waveclip::block_causal_attention` runs: (out, lse)."""
    if impl == "triton":
        from . import triton as triton_backend

        return triton_backend.block_causal_attention_forward(q, k, v, list(block_sizes), scale)
    out = backend(impl).block_causal_attention(q, k, v, list(block_sizes), scale)
    return out, q.new_empty((0,), dtype=compute_dtype(q.dtype))


@torch.library.custom_op("waveclip::block_causal_attention", mutates_args=())
def block_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, block_sizes: list[int], scale: float, impl: str
) -> tuple[Tensor, Tensor]:
    """(out, lse): lse is the per-row log-sum-exp the Triton backward reads, (B, H, N) in the
    accumulation dtype for impl="triton" and an empty tensor for the others (their backward
    recomputes what it needs)."""
    return block_causal_body(q, k, v, block_sizes, scale, impl)


@block_causal_attention.register_fake
def _(q, k, v, block_sizes, scale, impl):
    lse_shape = q.shape[:3] if impl == "triton" else (0,)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(lse_shape, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("waveclip::block_causal_attention_backward", mutates_args=())
def block_causal_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    block_sizes: list[int],
    scale: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): the fused Triton backward for impl="triton", else `composed_attention_backward`."""
    if impl == "triton":
        from . import triton as triton_backend

        return triton_backend.block_causal_attention_backward(grad_out, q, k, v, out, lse, list(block_sizes), scale)
    return composed_attention_backward(grad_out, q, k, v, list(block_sizes), scale)


@block_causal_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, block_sizes, scale, impl):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_CPU_FLASH_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def composed_attention_backward(grad_out, q, k, v, block_sizes: list[int], scale: float):
    """Block-causal gradients without a fused kernel: block i's queries against its prefix [0, end_i).

    On the CPU each block runs PyTorch's flash-attention CPU forward (for its log-sum-exp) and
    backward on prefix views, the key/value gradients summed in place; elsewhere autograd through
    one SDPA call per block. No N x N score matrix is formed (docs/design.md section 3).

    Returns:
        (dq, dk, dv) in q's dtype.
    """
    if q.device.type != "cpu":
        return _per_block_sdpa_backward(grad_out, q, k, v, block_sizes, scale)
    # The CPU flash backward returns wrong dq/dk for inputs whose last dim is strided.
    grad_out, q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (grad_out, q, k, v))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    start = 0
    for size in block_sizes:
        end = start + size
        qs, ks, vs = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        out, lse = _CPU_FLASH_FORWARD(qs, ks, vs, scale=scale)
        gq, gk, gv = _CPU_FLASH_BACKWARD(grad_out[:, :, start:end], qs, ks, vs, out, lse, 0.0, False, scale=scale)
        dq[:, :, start:end] = gq
        dk[:, :, :end] += gk
        dv[:, :, :end] += gv
        start = end
    return dq, dk, dv


def _per_block_sdpa_backward(grad_out, q, k, v, block_sizes: list[int], scale: float):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        outs, start = [], 0
        for size in block_sizes:
            end = start + size
            outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=scale))
            start = end
        return torch.autograd.grad(torch.cat(outs, dim=2), (q, k, v), grad_out)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, block_sizes, scale, impl = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.block_sizes, ctx.scale, ctx.impl = block_sizes, scale, impl


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: a differentiable composition of PyTorch ops on the saved inputs.
        if ctx.impl == "triton":
            raise RuntimeError(
                'block_causal_attention(impl="triton") has no double backward (create_graph=True): '
                'use impl="reference" for higher-order gradients'
            )
        expected = reference.block_causal_attention(q, k, v, ctx.block_sizes, ctx.scale)
        dq, dk, dv = torch.autograd.grad(expected, (q, k, v), grad_out, create_graph=True)
    else:
        dq, dk, dv = block_causal_attention_backward(grad_out, q, k, v, out, lse, ctx.block_sizes, ctx.scale, ctx.impl)
    return dq, dk, dv, None, None, None


block_causal_attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def kv_append_body(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale, impl, lens=None, rows=None):
    """What `waveclip::attention_with_kv_append` runs. lens/rows: the checked host values of
    cache_lens/batch_index (0..B-1 when batch_index is None), or None: then they are read and checked
    here, before anything is written."""
    if lens is None or rows is None:
        lens, rows = kvappend.host_lens_rows(cache_lens, batch_index, q.shape[0], q.shape[2], k_cache)
    if impl in ("cpu", "cuda"):  # the extension checks the memory overlaps itself (the same rules)
        from . import extension

        return extension.attention_with_kv_append_planned(q, k_new, v_new, k_cache, v_cache, lens, rows, scale)
    kvappend.check_kv_memory(q, k_new, v_new, k_cache, v_cache)
    return backend(impl).attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale)


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
    lens: list[int] | None = None,
    rows: list[int] | None = None,
) -> Tensor:
    return kv_append_body(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale, impl, lens, rows)


@attention_with_kv_append.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index, scale, impl, lens=None, rows=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------- FLOP formulas
# For torch.utils.flop_counter.FlopCounterMode (1 multiply-add = 2 FLOPs): QK^T and PV over the
# (query, key) pairs each op computes, 2 * pairs * (D + Dv) per (batch, head), i.e. docs/design.md's
# 4*B*H*D*sum_s n_s*P_s. The tokenizer and its inverse are linear maps of a few FLOPs per pixel
# (waveclip.flops counts them); here they count 0, as FlopCounterMode counts other elementwise work.


@register_flop_formula(torch.ops.waveclip.block_causal_attention)
def _block_causal_flop(q_shape, k_shape, v_shape, block_sizes, *args, out_shape=None, **kwargs) -> int:
    B, H, _, D = q_shape
    pairs, prefix = 0, 0
    for n in block_sizes:
        prefix += n
        pairs += n * prefix
    return 2 * B * H * pairs * (D + v_shape[-1])


@register_flop_formula(torch.ops.waveclip.attention_with_kv_append, get_raw=True)
def _kv_append_flop(
    q, k_new, v_new, k_cache, v_cache, cache_lens, batch_index=None, scale=None, impl=None, lens=None, *args, **kwargs
) -> int:
    B, H, n, D = q.shape
    keys = sum(lens) if lens is not None else int(cache_lens.sum())
    return 2 * H * n * (keys + B * n) * (D + v_new.shape[-1])


@register_flop_formula([torch.ops.waveclip.wavelet_tokenize, torch.ops.waveclip.wavelet_detokenize])
def _tokenizer_flop(*args, **kwargs) -> int:
    return 0
