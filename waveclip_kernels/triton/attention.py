"""Block-causal flash attention and attention with fused in-place KV append (Triton).

Both kernels run the same online softmax over key tiles (`_attend_tile`): scores in float32 (float64
for float64 inputs), exp2 with the scale folded into log2(e), a running max and sum per query row,
and the output rescaled once at the end. A query tile of BLOCK_M rows is one program.

Dots. float16/bfloat16 tiles go to the tensor cores natively with float32 accumulation; the
probabilities are rounded to the value dtype before the second dot, as every flash kernel does.
float32 tiles are multiplied with `input_precision="ieee"` (true fp32 FMAs, not TF32), so fp32
results match an fp32 reference to a few ulp; this is the accuracy path, not the fast one. float64
tiles use fp64 dots. Under TRITON_INTERPRET=1 (CPU) bfloat16 `tl.dot` returns garbage, so the
launchers pass UPCAST=True there: half-precision tiles are converted to float32 right before each
dot (after the same rounding of the probabilities); on the GPU UPCAST is False.

Head dims that are not a power of two (e.g. 80) are padded to the next one (>= 16, the smallest
dot size) with masked loads; padded columns are zero and never stored.

Tile sizes. On the GPU `triton.autotune` picks BLOCK_M/BLOCK_N/num_warps/num_stages from a few
configs, keyed on the sequence length and head dim (and, implicitly, the dtypes). Under the
interpreter there is no autotuning: one fixed config (INTERPRET_CONFIG) runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# GPU configs (H100/H200 class): tiles >= 16 on every dot dim.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
# The interpreter runs one config; BLOCK_M != BLOCK_N so tests cover tiles of both shapes.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}

# Split-KV (flash-decoding): used when the (batch, head, query tile) programs cannot fill the GPU.
SPLIT_BLOCK_M = 64  # the query tile assumed when counting programs for that decision
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16
COMBINE_BLOCK_M = 32


def interpreting() -> bool:
    """True when kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _prune_configs(configs, named_args, **kwargs):
    """fp32/fp64 tiles (the accuracy path; fp32 runs on CUDA cores): 64-row tiles only. A 128 x 32
    fp32 tile at head dim 128 took over a minute to compile here, for no use."""
    if named_args["q_ptr"].element_size() >= 4:
        return [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    return configs


def _autotuned(kernel, key):
    return triton.autotune(configs=GPU_CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune_configs})(
        kernel
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU (interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _attend_tile(
    acc,  # (BLOCK_M, D_PAD) running output, unnormalised
    m_i,  # (BLOCK_M,) running max of the scaled scores (log2 domain)
    l_i,  # (BLOCK_M,) running sum of exp2(score - m_i)
    q,  # (BLOCK_M, D_PAD) query tile
    k_ptrs,  # (BLOCK_N, D_PAD) pointers to the key tile
    v_ptrs,  # (BLOCK_N, D_PAD) pointers to the value tile
    kv_mask,  # (BLOCK_N, D_PAD) or (1, D_PAD) load mask, or None
    valid,  # (BLOCK_M, BLOCK_N) or (1, BLOCK_N) scores to keep, or None (all)
    qk_scale,  # softmax scale * log2(e)
    UPCAST: tl.constexpr,
):
    """One online-softmax step over a key tile; returns the updated (acc, m_i, l_i)."""
    if kv_mask is None:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    if valid is not None:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee", out_dtype=acc.dtype)
    return acc, m_new, l_i


@triton.jit
def _block_causal_fwd_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, N, D)
    v_ptr,  # (B, H, N, D)
    o_ptr,  # (B, H, N, D) output
    block_end_ptr,  # (N,) int32: end (exclusive) of the block that holds each position
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program per (batch*head, query tile); the tiles of one head are adjacent (they share its
    # keys in L2) and run last-first, because later blocks see more keys.
    num_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_m).to(tl.int64)
    start_m = (num_m - 1 - pid % num_m) * BLOCK_M
    b = bh // H
    h = bh % H

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    # Rows past N get block end 1: they see key 0 only, stay finite, and are never stored.
    row_end = tl.load(block_end_ptr + offs_m, mask=row_ok, other=1)
    first_end = tl.load(block_end_ptr + start_m)  # every row of the tile sees the keys [0, first_end)
    last_end = tl.load(block_end_ptr + tl.minimum(start_m + BLOCK_M, N) - 1)  # no row sees past last_end

    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    acc = tl.zeros((BLOCK_M, D_PAD), dtype=ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    if HEAD_DIM == D_PAD:
        d_mask = None
    else:
        d_mask = d_ok[None, :]

    # Whole key tiles below the end of the tile's first block: visible to every row, no mask.
    unmasked_end = (first_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, unmasked_end, BLOCK_N):
        cols = (start_n + offs_n)[:, None].to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base + cols * stride_kn, v_base + cols * stride_vn, d_mask, None, qk_scale, UPCAST
        )
    # Up to the end of the last row's block: each row keeps the keys before its own block end.
    # The first of these tiles holds key 0 or an unmasked key of every row, so m_i is finite.
    for start_n in range(unmasked_end, last_end, BLOCK_N):
        cols = start_n + offs_n
        ptr_cols = cols[:, None].to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base + ptr_cols * stride_kn,
            v_base + ptr_cols * stride_vn,
            (cols < last_end)[:, None] & d_ok[None, :],
            cols[None, :] < row_end[:, None],
            qk_scale,
            UPCAST,
        )

    out = acc / l_i[:, None]
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(
        o_base + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _attend_segment(
    acc,
    m_i,
    l_i,
    q,
    k_base,  # (rows, D_PAD) pointers to row 0 of the segment's keys (column offsets applied)
    v_base,
    stride_kn,
    stride_vn,
    start,
    end,
    d_ok,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Attend to the keys [start, end) of one segment: whole tiles unmasked, then one masked tail."""
    offs_n = tl.arange(0, BLOCK_N)
    if HEAD_DIM == D_PAD:
        d_mask = None
    else:
        d_mask = d_ok[None, :]
    n_full = tl.maximum(end - start, 0) // BLOCK_N
    for t in range(0, n_full):
        rows = (start + t * BLOCK_N + offs_n)[:, None].to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base + rows * stride_kn, v_base + rows * stride_vn, d_mask, None, qk_scale, UPCAST
        )
    tail = start + n_full * BLOCK_N
    if tail < end:
        rows = tail + offs_n
        ptr_rows = rows[:, None].to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base + ptr_rows * stride_kn,
            v_base + ptr_rows * stride_vn,
            (rows < end)[:, None] & d_ok[None, :],
            (rows < end)[None, :],
            qk_scale,
            UPCAST,
        )
    return acc, m_i, l_i


@triton.jit
def _attn_kv_append_kernel(
    q_ptr,  # (B, H, n, D)
    kn_ptr,  # (B, H, n, D) new keys
    vn_ptr,  # (B, H, n, D) new values
    kc_ptr,  # (B_cache, H, N_max, D) key cache, written at [c, c+n) of row r
    vc_ptr,  # (B_cache, H, N_max, D) value cache, likewise
    lens_ptr,  # (B,) int32/int64: c, the filled length of each query row's cache row
    index_ptr,  # (B,) int32/int64: cache row r of each query row (read only when HAS_INDEX)
    o_ptr,  # NUM_SPLITS == 1: (B, H, n, D) output; else (B*H, NUM_SPLITS, n, D) partial outputs
    lse_ptr,  # (B*H, NUM_SPLITS, n) log2-sum-exp of each partial (unused when NUM_SPLITS == 1)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_knb,
    stride_knh,
    stride_knn,
    stride_knd,
    stride_vnb,
    stride_vnh,
    stride_vnn,
    stride_vnd,
    stride_kcb,
    stride_kch,
    stride_kcn,
    stride_kcd,
    stride_vcb,
    stride_vch,
    stride_vcn,
    stride_vcd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    n,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
):
    num_m = tl.cdiv(n, BLOCK_M)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    bh = (pid // num_m).to(tl.int64)
    start_m = (pid % num_m) * BLOCK_M
    b = bh // H
    h = bh % H
    c = tl.load(lens_ptr + b).to(tl.int64)
    if HAS_INDEX:
        r = tl.load(index_ptr + b).to(tl.int64)
    else:
        r = b

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    kn_base = kn_ptr + b * stride_knb + h * stride_knh + offs_d[None, :] * stride_knd
    vn_base = vn_ptr + b * stride_vnb + h * stride_vnh + offs_d[None, :] * stride_vnd
    kc_base = kc_ptr + r * stride_kcb + h * stride_kch + offs_d[None, :] * stride_kcd
    vc_base = vc_ptr + r * stride_vcb + h * stride_vch + offs_d[None, :] * stride_vcd

    # The append, fused: the split-0 program of each query tile copies the same rows of k_new/v_new
    # into the cache at [c + start_m, c + start_m + BLOCK_M). No program reads the cache at or past
    # c (the new keys are read from k_new/v_new below), so the writes cannot race with any read.
    if split == 0:
        tl.store(kc_base + (c + rows) * stride_kcn, tl.load(kn_base + rows * stride_knn, mask=io_mask), mask=io_mask)
        tl.store(vc_base + (c + rows) * stride_vcn, tl.load(vn_base + rows * stride_vnn, mask=io_mask), mask=io_mask)

    # Keys [lo, hi) of the row's c + n (split s takes an equal share of the key tiles; a share can be
    # empty): [lo, min(hi, c)) from the cache, [max(lo, c), hi) from k_new/v_new.
    total = c + n
    if NUM_SPLITS == 1:
        lo = 0
        hi = total
    else:
        per_split = tl.cdiv(tl.cdiv(total, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = tl.minimum(split * per_split, total)
        hi = tl.minimum(lo + per_split, total)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows * stride_qn + offs_d[None, :] * stride_qd, mask=io_mask)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, kc_base, vc_base, stride_kcn, stride_vcn, lo, tl.minimum(hi, c), d_ok, qk_scale,
        HEAD_DIM, D_PAD, BLOCK_N, UPCAST,
    )  # fmt: skip
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, kn_base, vn_base, stride_knn, stride_vnn, tl.maximum(lo, c) - c, hi - c, d_ok, qk_scale,
        HEAD_DIM, D_PAD, BLOCK_N, UPCAST,
    )  # fmt: skip

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o = o_ptr + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :] * stride_od
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=io_mask)
    else:
        # An empty share has l_i == 0: it stores a zero output with weight exp2(-inf) = 0.
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        part = (bh * NUM_SPLITS + split) * n
        tl.store(o_ptr + (part + rows) * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(lse_ptr + part + offs_m, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_ptr,  # (B*H, NUM_SPLITS, n, D) partial outputs, each normalised by its own sum
    lse_ptr,  # (B*H, NUM_SPLITS, n) log2-sum-exp of each partial
    o_ptr,  # (B, H, n, D) output
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    n,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    num_m = tl.cdiv(n, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_m).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)

    lse_max = tl.full((BLOCK_M,), float("-inf"), dtype=lse_ptr.dtype.element_ty)
    for s in tl.static_range(NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(lse_ptr + (bh * NUM_SPLITS + s) * n + rows, mask=row_ok, other=0.0))
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=part_ptr.dtype.element_ty)
    total = tl.zeros((BLOCK_M,), dtype=part_ptr.dtype.element_ty)
    for s in tl.static_range(NUM_SPLITS):
        part = (bh * NUM_SPLITS + s) * n
        w = tl.exp2(tl.load(lse_ptr + part + rows, mask=row_ok, other=0.0) - lse_max)
        acc += w[:, None] * tl.load(part_ptr + (part + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask)
        total += w
    out = acc / total[:, None]
    b = bh // H
    h = bh % H
    o = o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask)


_block_causal_fwd_tuned = _autotuned(_block_causal_fwd_kernel, key=["N", "HEAD_DIM"])
_attn_kv_append_tuned = _autotuned(_attn_kv_append_kernel, key=["n", "HEAD_DIM", "NUM_SPLITS", "HAS_INDEX"])


def _launch(kernel, tuned, grid_of, args, meta):
    """Run the autotuned kernel on the GPU, or the fixed interpreter config on the CPU."""
    if interpreting():
        kernel[grid_of(INTERPRET_CONFIG)](*args, **meta, **INTERPRET_CONFIG)
    else:
        tuned[grid_of](*args, **meta)


def _common_meta(q: torch.Tensor) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        D_PAD=_head_dim_pad(q.shape[-1]),
        UPCAST=interpreting() and q.dtype in (torch.float16, torch.bfloat16),
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
    )


@functools.cache
def _block_ends(block_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N,) int32: for each position, the end (exclusive) of its block; made once per device."""
    ends = torch.tensor(block_sizes).cumsum(0)
    return torch.repeat_interleave(ends, torch.tensor(block_sizes)).to(torch.int32).to(device)


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_sizes: list[int],
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-causal flash attention: a query of block i attends to the keys of blocks <= i.

    A query tile visits key tiles only up to the end of its last row's block (fully masked tiles are
    never loaded), without a mask up to the end of its first row's block and with a per-row mask after.

    Args:
        q, k, v: (B, H, N, D) float16/bfloat16/float32/float64, one dtype and device, any strides.
        block_sizes: positive ints summing to N.
        scale: softmax scale.
        out: optional preallocated (B, H, N, D) tensor of q's dtype, any strides, to write.

    Returns:
        (B, H, N, D) in q's dtype (contiguous unless `out` was given).
    """
    B, H, N, D = q.shape
    if out is None:
        out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    args = (q, k, v, out, _block_ends(tuple(block_sizes), q.device))
    args += (*q.stride(), *k.stride(), *v.stride(), *out.stride(), H, N, scale * LOG2E)
    _launch(
        _block_causal_fwd_kernel,
        _block_causal_fwd_tuned,
        lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,),
        args,
        _common_meta(q),
    )
    return out


def num_kv_splits(programs: int, n_max: int, device: torch.device) -> int:
    """How many programs share the keys of one query tile in `attention_with_kv_append`.

    One program per (batch, head, query tile) is enough when there are at least as many as the
    device has SMs. Below that, the keys are split in up to ceil(SMs / programs) shares (flash-
    decoding), but never shares under MIN_KEYS_PER_SPLIT keys of the cache's capacity, and at most
    MAX_SPLITS; a second small kernel combines the shares. On the CPU this always gives 1.
    """
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), triton.cdiv(n_max, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def attention_with_kv_append(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    batch_index: torch.Tensor | None,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Write k_new/v_new into the caches in place and attend q to each row's whole prefix, one launch.

    For query row b with cache row r = batch_index[b] (default b) and c = cache_lens[b]: the caches'
    rows [c, c+n) of r receive k_new[b]/v_new[b], and q[b] attends to the keys [0, c+n) of r. When
    there are more than one share of keys (`num_kv_splits`), a second launch combines the shares.

    Args:
        q, k_new, v_new: (B, H, n, D) float16/bfloat16/float32/float64, any strides.
        k_cache, v_cache: (B_cache, H, N_max, D) of q's dtype, any strides; written in place.
        cache_lens: (B,) int32/int64, c per query row (c + n <= N_max, checked by the public API).
        batch_index: optional (B,) int32/int64 distinct cache rows.
        scale: softmax scale.
        out: optional preallocated (B, H, n, D) tensor of q's dtype, any strides, to write.
        num_splits: key shares per query tile; default `num_kv_splits(...)`. Tests force it.

    Returns:
        (B, H, n, D) in q's dtype (contiguous unless `out` was given).
    """
    B, H, n, D = q.shape
    if out is None:
        out = torch.empty((B, H, n, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if num_splits is None:
        num_splits = num_kv_splits(B * H * triton.cdiv(n, SPLIT_BLOCK_M), k_cache.shape[2], q.device)
    meta = dict(_common_meta(q), NUM_SPLITS=num_splits, HAS_INDEX=batch_index is not None)
    if num_splits == 1:
        partial, lse = out, out  # the kernel writes `out` directly; lse_ptr is not read
    else:
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        partial = torch.empty((B * H, num_splits, n, D), dtype=acc_dtype, device=q.device)
        lse = torch.empty((B * H, num_splits, n), dtype=acc_dtype, device=q.device)
    index = cache_lens if batch_index is None else batch_index
    args = (q, k_new, v_new, k_cache, v_cache, cache_lens, index, partial, lse)
    args += (*q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride())
    args += (H, n, scale * LOG2E)
    _launch(
        _attn_kv_append_kernel,
        _attn_kv_append_tuned,
        lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * B * H, num_splits),
        args,
        meta,
    )
    if num_splits > 1:
        _combine_splits_kernel[(triton.cdiv(n, COMBINE_BLOCK_M) * B * H,)](
            partial,
            lse,
            out,
            *out.stride(),
            H,
            n,
            HEAD_DIM=D,
            D_PAD=meta["D_PAD"],
            BLOCK_M=COMBINE_BLOCK_M,
            NUM_SPLITS=num_splits,
            num_warps=4,
        )
    return out
