"""Block-causal flash attention (forward and backward) and attention with fused in-place KV append (Triton).

Forward kernels run the same online softmax over key tiles (`_attend_tile`): scores in float32
(float64 for float64 inputs), exp2 with the scale folded into log2(e), a running max and sum per
query row, and the output rescaled once at the end.

Block-aligned tiles. A query tile of the block-causal kernels never spans two blocks
(`_aligned_tile`: tiles are counted block by block from the last block backwards, so the programs
that see the most keys start first). Every row of a tile then sees exactly the prefix [0, end of its
block): key tiles below it are loaded without a mask, the last one with its rows past the prefix
loaded as 0 and their scores set to -inf. Nothing past the prefix is ever read, so a NaN or inf in a
later block cannot reach an earlier one (no 0 x NaN inside a dot), and no fully masked tile is visited.

Backward (FlashAttention-2 style, docs/design.md section 3): the forward also writes each row's
log-sum-exp; `_bwd_preprocess_kernel` computes delta = rowsum(dO * O); `_bwd_dkdv_kernel` runs one
program per block-aligned key tile over the queries that see it (its own block and every later one,
a contiguous range, so no mask); `_bwd_dq_kernel` one program per query tile over its prefix, as the
forward does. The probabilities are recomputed from the log-sum-exp; no program writes another's
output (no atomics: results do not depend on program order).

Dots. float16/bfloat16 tiles go to the tensor cores natively with float32 accumulation; the
probabilities are rounded to the value dtype before the second dot, as every flash kernel does.
float32 tiles follow `torch.get_float32_matmul_precision()` (`dot_precision`): "highest" -> IEEE
fp32 FMAs (smaller tiles, the accuracy path), "high" -> 3xTF32, "medium" -> TF32. float64 tiles use
fp64 dots, and the softmax scale reaches the kernels as a float64 tensor (a Python float argument is
typed fp32 by compiled Triton). Under TRITON_INTERPRET=1 (CPU) bfloat16 `tl.dot` returns garbage, so
the launchers pass UPCAST=True there: half-precision tiles are converted to float32 right before each
dot (after the same rounding of the probabilities); on the GPU UPCAST is False.

Head dims that are not a power of two (e.g. 80) are padded to the next one (>= 16, the smallest
dot size) with masked loads; padded columns are zero and never stored.

Tile sizes. On the GPU `triton.autotune` picks BLOCK_M/BLOCK_N/num_warps/num_stages among
`attention_configs(kernel, dtype, head_dim, precision)`: a few candidates per precision, pruned by an
estimate of the shared memory they need (`shared_memory_estimate`, an upper bound of what the
compiler allocates) against SHARED_MEMORY_LIMIT. Under the interpreter one fixed config runs
(INTERPRET_CONFIGS).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # the same constants as kernels may read them
_LN2 = tl.constexpr(LN2)

SHARED_MEMORY_LIMIT = 232_448  # bytes of shared memory one block may use on H100/H200 (sm_90)
# 32-bit registers per thread that the resident tiles of a float16/bfloat16 config may take (of the
# 255 a thread has): above it ptxas spilled on sm_90 (`register_estimate`, bench/compile_sweep.py)
HALF_REGISTER_BUDGET = 240

KERNELS = ("forward", "kv_append", "backward_dq", "backward_dkdv")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel and precision class. BLOCK_M is the
# query tile, BLOCK_N the key tile; in backward_dkdv the key tile stays resident and the query tiles
# stream, in the other three the query tile stays. "ieee" fp32 runs on the CUDA cores, where a dot
# keeps its whole reduction extent per thread: 64 x 64 tiles spill KBs there; 32 x 32 with 8 warps
# still spills 160 B at head dim 64 (255 registers), the least of the small tiles tried.
# The 3xTF32 backward kernels spill 32-240 B with 64-row tiles at head dim 64, none at 32 x 32. Block-aligned tiles pad each block's
# last tile: 32-row tiles keep that waste low for blocks of 197 tokens (the 448 preset).
_CANDIDATES = {
    ("forward", "half"): [
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (128, 128, 8, 2),
        (32, 64, 4, 3),
    ],
    ("forward", "tf32"): [(64, 64, 4, 3), (64, 32, 4, 3)],
    ("forward", "ieee"): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("forward", "fp64"): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 3), (16, 16, 4, 2)],
    ("backward_dq", "half"): [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    ("backward_dq", "tf32"): [(32, 32, 4, 2)],
    ("backward_dq", "ieee"): [(32, 32, 4, 2), (16, 32, 4, 2)],
    ("backward_dq", "fp64"): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("backward_dkdv", "half"): [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
    ("backward_dkdv", "tf32"): [(32, 32, 4, 2)],
    ("backward_dkdv", "ieee"): [(32, 32, 4, 2), (32, 16, 4, 2)],
    ("backward_dkdv", "fp64"): [(32, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
}
_CANDIDATES.update({("kv_append", p): c for (k, p), c in list(_CANDIDATES.items()) if k == "forward"})

# The interpreter runs one config per kernel; BLOCK_M != BLOCK_N so tests cover tiles of both shapes.
INTERPRET_CONFIGS = {
    "forward": {"BLOCK_M": 32, "BLOCK_N": 16},
    "kv_append": {"BLOCK_M": 32, "BLOCK_N": 16},
    "backward_dq": {"BLOCK_M": 16, "BLOCK_N": 32},
    "backward_dkdv": {"BLOCK_M": 32, "BLOCK_N": 16},
}
PREPROCESS_BLOCK_M = 64  # rows per program of the delta = rowsum(dO * O) kernel

# Split-KV (flash-decoding): used when the (batch, head, query tile) programs cannot fill the GPU.
SPLIT_BLOCK_M = 64  # the query tile assumed when counting programs for that decision
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16
COMBINE_BLOCK_M = 32

_F32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def interpreting() -> bool:
    """True when kernels run on the CPU through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for tiles of `dtype`: fp32 follows torch.get_float32_matmul_precision()."""
    if dtype == torch.float32:
        return _F32_PRECISION[torch.get_float32_matmul_precision()]
    return "ieee"


def _precision_class(dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "ieee" if precision == "ieee" else "tf32"
    return "half"


def _head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def shared_memory_estimate(
    kernel: str, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int, num_stages: int
) -> int:
    """Bytes of shared memory a config needs: an upper bound of what Triton 3.x allocates on sm_90.

    The resident tiles, num_stages buffers of each streamed tile (tensor-core dots use that many,
    FMA dots one fewer), one score-sized scratch per probability/gradient tile that changes layout
    between dots (FMA dots), and 1 KB for reductions. Checked against `kernel.metadata.shared` of
    sm_90 compiles (tests/kernels/test_attention_sm90.py). It rejects the former fp64 forward configs
    at head dim 128 (64 x 64 x 3 stages and 64 x 32 x 4 stages, which need 352 KB and 272 KB).
    """
    e = torch.empty((), dtype=dtype).element_size()
    d = _head_dim_pad(head_dim)
    if kernel in ("forward", "kv_append"):
        tiles, scratch = block_m + 2 * block_n * num_stages, block_m * block_n
    elif kernel == "backward_dq":
        tiles, scratch = 2 * block_m + 2 * block_n * num_stages, 2 * block_m * block_n
    elif kernel == "backward_dkdv":
        tiles, scratch = 2 * block_n + 2 * block_m * num_stages, 2 * block_m * block_n
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return e * (d * tiles + scratch) + 1024


def register_estimate(
    kernel: str, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int, num_warps: int
) -> float:
    """32-bit registers per thread that a config's resident tiles hold: the float32 accumulators, the
    input-dtype tiles kept across the inner loop, the float32 score-sized tiles, spread over the
    block's threads, plus 32 for the KV kernel's extra pointers (cache and new keys). Fitted to
    ptxas on sm_90 for the tensor-core (float16/bfloat16) configs: at head dim 80/128, 256 words
    (backward_dkdv 64 x 64, 4 warps) and 224 + 32 (kv_append 128 x 32, 4 warps) spilled, 224
    (forward 128 x 32, backward_dkdv 32 x 64 and 32 x 128) did not.
    """
    d = _head_dim_pad(head_dim)
    e = torch.empty((), dtype=dtype).element_size() / 4
    if kernel in ("forward", "kv_append"):
        words = block_m * d * (1 + e) + block_m * block_n + (32 * 32 * num_warps if kernel == "kv_append" else 0)
    elif kernel == "backward_dq":
        words = block_m * d * (1 + 2 * e) + 2 * block_m * block_n
    elif kernel == "backward_dkdv":
        words = 2 * block_n * d * (1 + e) + 2 * block_m * block_n
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return words / (32 * num_warps)


def _fits(kernel: str, dtype: torch.dtype, head_dim: int, precision_class: str, config: tuple) -> bool:
    m, n, warps, stages = config
    if shared_memory_estimate(kernel, dtype, head_dim, m, n, stages) > SHARED_MEMORY_LIMIT:
        return False
    return precision_class != "half" or register_estimate(kernel, dtype, head_dim, m, n, warps) <= HALF_REGISTER_BUDGET


@functools.cache
def attention_configs(kernel: str, dtype: torch.dtype, head_dim: int, precision: str = "ieee") -> list[triton.Config]:
    """The autotune configs kept for one kernel, dtype, head dim and fp32 dot precision.

    Candidates whose `shared_memory_estimate` exceeds SHARED_MEMORY_LIMIT are dropped, and float16/
    bfloat16 ones whose `register_estimate` exceeds HALF_REGISTER_BUDGET (they would spill; float32
    and float64 spills are accepted). The smallest candidate is always kept, so the list is never
    empty. This is the full list of what the GPU may compile for these arguments.
    """
    precision_class = _precision_class(dtype, precision)
    candidates = _CANDIDATES[(kernel, precision_class)]
    fits = [c for c in candidates if _fits(kernel, dtype, head_dim, precision_class, c)]
    if not fits:
        fits = [min(candidates, key=lambda c: shared_memory_estimate(kernel, dtype, head_dim, c[0], c[1], c[3]))]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in fits]


def _autotuned(kernel_fn, name: str, key: list[str]):
    """`triton.autotune` over `attention_configs(name, ...)` of the launch's dtype, head dim and precision."""

    def prune(configs, named_args, **kwargs):
        return attention_configs(name, named_args["q_ptr"].dtype, kwargs["HEAD_DIM"], kwargs["DOT_PRECISION"])

    every = {
        (m, n, w, s) for (kernel, _), candidates in _CANDIDATES.items() if kernel == name for m, n, w, s in candidates
    }
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sorted(every)]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel_fn)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU (interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_guard(device: torch.device):
    """The context a launch runs in: the tensors' CUDA device made current (nothing on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _scales(scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2,) [scale * log2(e), scale] in the accumulation dtype, made once per (scale, dtype, device)."""
    return torch.tensor([scale * LOG2E, scale], dtype=_acc_dtype(dtype), device=device)


@triton.jit
def _aligned_tile(
    r,  # tile index, counted from the last block backwards
    bounds_ptr,  # (NUM_BLOCKS + 1,) int32 block boundaries [0, end_0, end_1, ..., N]
    NUM_BLOCKS,
    TILE: tl.constexpr,
):
    """(first row, block start, block end) of block-aligned tile r: each block is cut into
    ceil(size / TILE) tiles of its own, blocks taken last-first."""
    row = 0
    lo = 0
    hi = 0
    seen = 0
    for i in range(0, NUM_BLOCKS):
        start = tl.load(bounds_ptr + NUM_BLOCKS - 1 - i)
        end = tl.load(bounds_ptr + NUM_BLOCKS - i)
        tiles = tl.cdiv(end - start, TILE)
        hit = (r >= seen) & (r < seen + tiles)
        row = tl.where(hit, start + (r - seen) * TILE, row)
        lo = tl.where(hit, start, lo)
        hi = tl.where(hit, end, hi)
        seen += tiles
    return row, lo, hi


@triton.jit
def _round_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """`x` (accumulation dtype) rounded to `dtype` (a dot operand or an output). With UPCAST
    (interpreter, half precision) the result stays float32, exactly representable in `dtype`;
    bfloat16 is rounded to nearest-even by hand there, because the interpreter's float32 ->
    bfloat16 conversion truncates."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)
    return x.to(dtype)


@triton.jit
def _attend_tile(
    acc,  # (BLOCK_M, D_PAD) running output, unnormalised
    m_i,  # (BLOCK_M,) running max of the scaled scores (log2 domain)
    l_i,  # (BLOCK_M,) running sum of exp2(score - m_i)
    q,  # (BLOCK_M, D_PAD) query tile
    k_ptrs,  # (BLOCK_N, D_PAD) pointers to the key tile
    v_ptrs,  # (BLOCK_N, D_PAD) pointers to the value tile
    kv_mask,  # (BLOCK_N, D_PAD) or (1, D_PAD) load mask, or None
    valid,  # (1, BLOCK_N) keys to keep, or None (all)
    qk_scale,  # softmax scale * log2(e), in the accumulation dtype
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=acc.dtype) * qk_scale
    if valid is not None:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = _round_to(p, v.dtype, UPCAST)
    if UPCAST:
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc, m_new, l_i


@triton.jit
def _block_causal_fwd_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, N, D)
    v_ptr,  # (B, H, N, D)
    o_ptr,  # (B, H, N, D) output
    lse_ptr,  # (B, H, N) contiguous, accumulation dtype: natural log-sum-exp of each row's scaled scores
    bounds_ptr,  # (NUM_BLOCKS + 1,) int32 block boundaries
    scale_ptr,  # (2,) accumulation dtype: [scale * log2(e), scale]
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
    NUM_BLOCKS,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid (B*H, query tiles): all heads of the heaviest tiles (last block) start first.
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m, _, kv_end = _aligned_tile(tl.program_id(1), bounds_ptr, NUM_BLOCKS, BLOCK_M)
    qk_scale = tl.load(scale_ptr)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < kv_end  # the tile's rows inside its block; every one sees the keys [0, kv_end)
    d_ok = offs_d < HEAD_DIM
    rows = offs_m[:, None].to(tl.int64)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(
        q_base + rows * stride_qn + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0
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
    # Whole key tiles of the prefix, no mask; then the tail, its keys past kv_end loaded as 0 and scored -inf.
    full_end = (kv_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        cols = (start_n + offs_n)[:, None].to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base + cols * stride_kn, v_base + cols * stride_vn, d_mask, None, qk_scale,
            UPCAST, DOT_PRECISION,
        )  # fmt: skip
    if full_end < kv_end:
        cols = full_end + offs_n
        ptr_cols = cols[:, None].to(tl.int64)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base + ptr_cols * stride_kn, v_base + ptr_cols * stride_vn,
            (cols < kv_end)[:, None] & d_ok[None, :], (cols < kv_end)[None, :], qk_scale, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(
        o_base + rows * stride_on + offs_d[None, :] * stride_od,
        _round_to(out, o_ptr.dtype.element_ty, UPCAST).to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + bh * N + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    o_ptr,  # (B, H, N, D) forward output
    do_ptr,  # (B, H, N, D) gradient of the output
    delta_ptr,  # (B, H, N) contiguous, accumulation dtype: rowsum(dO * O)
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    H,
    N,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(
        o_ptr + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0
    )
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1)
    tl.store(delta_ptr + bh * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, N, D)
    v_ptr,  # (B, H, N, D)
    do_ptr,  # (B, H, N, D) gradient of the output
    lse_ptr,  # (B, H, N) contiguous: the forward's log-sum-exp
    delta_ptr,  # (B, H, N) contiguous: rowsum(dO * O)
    dq_ptr,  # (B, H, N, D) contiguous output: gradient of q
    bounds_ptr,  # (NUM_BLOCKS + 1,) int32 block boundaries
    scale_ptr,  # (2,) accumulation dtype: [scale * log2(e), scale]
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
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    H,
    N,
    NUM_BLOCKS,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (batch*head, block-aligned query tile): dQ = scale * sum over the prefix of dS K.
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m, _, kv_end = _aligned_tile(tl.program_id(1), bounds_ptr, NUM_BLOCKS, BLOCK_M)
    qk_scale = tl.load(scale_ptr)
    scale = tl.load(scale_ptr + 1)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < kv_end
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows * stride_qn + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0
    )
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :] * stride_dod,
        mask=io_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # Rows outside the tile's block: q = dO = 0 and finite lse/delta, so they add nothing and are not stored.
    lse2 = tl.load(lse_ptr + bh * N + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + bh * N + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    dq = tl.zeros((BLOCK_M, D_PAD), dtype=ACC)
    for start_n in range(0, kv_end, BLOCK_N):
        cols = start_n + offs_n
        ptr_cols = cols[:, None].to(tl.int64)
        kv_mask = (cols < kv_end)[:, None] & d_ok[None, :]
        k = tl.load(k_base + ptr_cols * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_base + ptr_cols * stride_vn, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale
        p = tl.where((cols < kv_end)[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC)
        ds = _round_to(p * (dp - delta[:, None]), k_ptr.dtype.element_ty, UPCAST)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION, out_dtype=ACC)

    tl.store(dq_ptr + bh * N * HEAD_DIM + rows * HEAD_DIM + offs_d[None, :], _round_to(dq * scale, dq_ptr.dtype.element_ty, UPCAST).to(dq_ptr.dtype.element_ty),
             mask=io_mask)  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, N, D)
    v_ptr,  # (B, H, N, D)
    do_ptr,  # (B, H, N, D) gradient of the output
    lse_ptr,  # (B, H, N) contiguous: the forward's log-sum-exp
    delta_ptr,  # (B, H, N) contiguous: rowsum(dO * O)
    dk_ptr,  # (B, H, N, D) contiguous output: gradient of k
    dv_ptr,  # (B, H, N, D) contiguous output: gradient of v
    bounds_ptr,  # (NUM_BLOCKS + 1,) int32 block boundaries
    scale_ptr,  # (2,) accumulation dtype: [scale * log2(e), scale]
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
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    H,
    N,
    NUM_BLOCKS,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (batch*head, block-aligned key tile). Its keys lie in one block, so the queries
    # that see them are exactly [block start, N): query tiles stream over that range without a mask.
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    start_n, q_start, block_end = _aligned_tile(tl.program_id(1), bounds_ptr, NUM_BLOCKS, BLOCK_N)
    qk_scale = tl.load(scale_ptr)
    scale = tl.load(scale_ptr + 1)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < block_end)[:, None] & d_ok[None, :]
    key_rows = offs_n[:, None].to(tl.int64)
    k = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + key_rows * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_vb + h * stride_vh + key_rows * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = q_ptr + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
    do_base = do_ptr + b * stride_dob + h * stride_doh + offs_d[None, :] * stride_dod

    dk = tl.zeros((BLOCK_N, D_PAD), dtype=ACC)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=ACC)
    for start_m in range(q_start, N, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N
        ptr_rows = rows[:, None].to(tl.int64)
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + ptr_rows * stride_qn, mask=q_mask, other=0.0)
        do = tl.load(do_base + ptr_rows * stride_don, mask=q_mask, other=0.0)
        # Rows past N: lse = +inf gives p = 0, and dO = 0.
        lse2 = tl.load(lse_ptr + bh * N + rows, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(delta_ptr + bh * N + rows, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])
        dv = tl.dot(
            _round_to(p_t, do_ptr.dtype.element_ty, UPCAST), do, dv, input_precision=DOT_PRECISION, out_dtype=ACC
        )
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC)
        ds_t = _round_to(p_t * (dp_t - delta[None, :]), q_ptr.dtype.element_ty, UPCAST)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION, out_dtype=ACC)

    out = bh * N * HEAD_DIM + key_rows * HEAD_DIM + offs_d[None, :]
    tl.store(
        dk_ptr + out, _round_to(dk * scale, dk_ptr.dtype.element_ty, UPCAST).to(dk_ptr.dtype.element_ty), mask=kv_mask
    )
    tl.store(dv_ptr + out, _round_to(dv, dv_ptr.dtype.element_ty, UPCAST).to(dv_ptr.dtype.element_ty), mask=kv_mask)


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
    DOT_PRECISION: tl.constexpr,
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
            acc, m_i, l_i, q, k_base + rows * stride_kn, v_base + rows * stride_vn, d_mask, None, qk_scale, UPCAST,
            DOT_PRECISION,
        )  # fmt: skip
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
            DOT_PRECISION,
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
    scale_ptr,  # (2,) accumulation dtype: [scale * log2(e), scale]
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
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
        tl.store(
            kc_base + (c + rows) * stride_kcn,
            tl.load(kn_base + rows * stride_knn, mask=io_mask, other=0.0),
            mask=io_mask,
        )
        tl.store(
            vc_base + (c + rows) * stride_vcn,
            tl.load(vn_base + rows * stride_vnn, mask=io_mask, other=0.0),
            mask=io_mask,
        )

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

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + rows * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)
    qk_scale = tl.load(scale_ptr)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, kc_base, vc_base, stride_kcn, stride_vcn, lo, tl.minimum(hi, c), d_ok, qk_scale,
        HEAD_DIM, D_PAD, BLOCK_N, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, kn_base, vn_base, stride_knn, stride_vnn, tl.maximum(lo, c) - c, hi - c, d_ok, qk_scale,
        HEAD_DIM, D_PAD, BLOCK_N, UPCAST, DOT_PRECISION,
    )  # fmt: skip

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o = o_ptr + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :] * stride_od
        tl.store(o, _round_to(out, o_ptr.dtype.element_ty, UPCAST).to(o_ptr.dtype.element_ty), mask=io_mask)
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
        acc += w[:, None] * tl.load(
            part_ptr + (part + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0
        )
        total += w
    out = acc / total[:, None]
    b = bh // H
    h = bh % H
    o = o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask)


_block_causal_fwd_tuned = _autotuned(_block_causal_fwd_kernel, "forward", key=["N", "HEAD_DIM", "DOT_PRECISION"])
_bwd_dq_tuned = _autotuned(_bwd_dq_kernel, "backward_dq", key=["N", "HEAD_DIM", "DOT_PRECISION"])
_bwd_dkdv_tuned = _autotuned(_bwd_dkdv_kernel, "backward_dkdv", key=["N", "HEAD_DIM", "DOT_PRECISION"])
_attn_kv_append_tuned = _autotuned(
    _attn_kv_append_kernel, "kv_append", key=["n", "HEAD_DIM", "NUM_SPLITS", "HAS_INDEX", "DOT_PRECISION"]
)


def _launch(kernel, tuned, name: str, grid_of, args, meta):
    """Run the autotuned kernel on the GPU, or the fixed interpreter config on the CPU."""
    if interpreting():
        config = INTERPRET_CONFIGS[name]
        kernel[grid_of(config)](*args, **meta, **config)
    else:
        tuned[grid_of](*args, **meta)


def _common_meta(q: torch.Tensor) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        D_PAD=_head_dim_pad(q.shape[-1]),
        UPCAST=interpreting() and q.dtype in (torch.float16, torch.bfloat16),
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        DOT_PRECISION=dot_precision(q.dtype),
    )


@functools.cache
def _block_bounds(block_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(len + 1,) int32 block boundaries [0, end_0, ..., N]; made once per (block sizes, device)."""
    return torch.tensor((0, *block_sizes), dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def aligned_tiles(block_sizes, tile: int) -> int:
    """Number of block-aligned tiles of `tile` rows: each block cut on its own."""
    return sum(triton.cdiv(n, tile) for n in block_sizes)


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_sizes: list[int],
    scale: float,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-causal flash attention: a query of block i attends to the keys of blocks <= i.

    Query tiles are block-aligned: a tile reads the keys of its block's prefix and nothing past it.

    Args:
        q, k, v: (B, H, N, D) float16/bfloat16/float32/float64, one dtype and device, any strides.
        block_sizes: positive ints summing to N.
        scale: softmax scale.
        out: optional preallocated (B, H, N, D) tensor of q's dtype, any strides, to write.
        lse: optional contiguous (B, H, N) float32 (float64 for float64 inputs) tensor that receives
            each row's natural log-sum-exp of its scaled scores (what the backward needs).

    Returns:
        (B, H, N, D) in q's dtype (contiguous unless `out` was given).
    """
    B, H, N, D = q.shape
    if out is None:
        out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, N), dtype=_acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out
    sizes = tuple(block_sizes)
    args = (q, k, v, out, lse, _block_bounds(sizes, q.device), _scales(scale, q.dtype, q.device))
    args += (*q.stride(), *k.stride(), *v.stride(), *out.stride(), H, N, len(sizes))
    with device_guard(q.device):
        _launch(
            _block_causal_fwd_kernel,
            _block_causal_fwd_tuned,
            "forward",
            lambda meta: (B * H, aligned_tiles(sizes, meta["BLOCK_M"])),
            args,
            _common_meta(q),
        )
    return out


def block_causal_attention_forward(q, k, v, block_sizes: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_causal_attention` returning (out, lse): the pair the backward needs.

    Returns:
        out (B, H, N, D) contiguous in q's dtype; lse (B, H, N) contiguous float32 (float64 for float64).
    """
    lse = torch.empty(q.shape[:3], dtype=_acc_dtype(q.dtype), device=q.device)
    return block_causal_attention(q, k, v, block_sizes, scale, lse=lse), lse


def block_causal_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_sizes: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `block_causal_attention` from its output and log-sum-exp (FlashAttention-2 style).

    Args:
        grad_out: (B, H, N, D) gradient of the output, any strides, q's dtype.
        q, k, v: the forward's inputs, any strides.
        out, lse: what `block_causal_attention_forward` returned.
        block_sizes, scale: as given to the forward.

    Returns:
        (dq, dk, dv), each (B, H, N, D) contiguous in q's dtype.
    """
    B, H, N, D = q.shape
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    sizes = tuple(block_sizes)
    meta = _common_meta(q)
    acc = _acc_dtype(q.dtype)
    delta = torch.empty((B, H, N), dtype=acc, device=q.device)
    bounds, scales = _block_bounds(sizes, q.device), _scales(scale, q.dtype, q.device)
    with device_guard(q.device):
        _bwd_preprocess_kernel[(B * H, triton.cdiv(N, PREPROCESS_BLOCK_M))](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, N,
            HEAD_DIM=D, D_PAD=meta["D_PAD"], BLOCK_M=PREPROCESS_BLOCK_M, ACC=meta["ACC"],
        )  # fmt: skip
        strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), H, N, len(sizes))
        _launch(
            _bwd_dkdv_kernel,
            _bwd_dkdv_tuned,
            "backward_dkdv",
            lambda m: (B * H, aligned_tiles(sizes, m["BLOCK_N"])),
            (q, k, v, grad_out, lse, delta, dk, dv, bounds, scales, *strides),
            meta,
        )
        _launch(
            _bwd_dq_kernel,
            _bwd_dq_tuned,
            "backward_dq",
            lambda m: (B * H, aligned_tiles(sizes, m["BLOCK_M"])),
            (q, k, v, grad_out, lse, delta, dq, bounds, scales, *strides),
            meta,
        )
    return dq, dk, dv


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
        partial = torch.empty((B * H, num_splits, n, D), dtype=_acc_dtype(q.dtype), device=q.device)
        lse = torch.empty((B * H, num_splits, n), dtype=_acc_dtype(q.dtype), device=q.device)
    index = cache_lens if batch_index is None else batch_index
    args = (q, k_new, v_new, k_cache, v_cache, cache_lens, index, partial, lse, _scales(scale, q.dtype, q.device))
    args += (*q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride())
    args += (H, n)
    with device_guard(q.device):
        _launch(
            _attn_kv_append_kernel,
            _attn_kv_append_tuned,
            "kv_append",
            lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * B * H, num_splits),
            args,
            meta,
        )
        if num_splits > 1:
            _combine_splits_kernel[(triton.cdiv(n, COMBINE_BLOCK_M) * B * H,)](
                partial, lse, out, *out.stride(), H, n,
                HEAD_DIM=D, D_PAD=meta["D_PAD"], BLOCK_M=COMBINE_BLOCK_M, NUM_SPLITS=num_splits, num_warps=4,
            )  # fmt: skip
    return out
