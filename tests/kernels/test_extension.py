"""The C++ extension (impl="cpu"; impl="cuda" where a GPU and a CUDA build exist) against the reference.

Tolerance rule (tests/tolerances.py): the error against a float64 oracle is at most twice the
reference's own error in the same dtype (plus one ulp of the output dtype). KV caches are views into
sentinel-filled buffers (the `guards` fixture), so a write outside the target shows up as a changed sentinel.
"""

import pytest
import torch
from helpers import SENTINEL, non_contiguous
from tolerances import assert_close, assert_within_torch_error

import waveclip_kernels as wk
from waveclip_kernels import _library, extension
from waveclip_kernels import reference as ref

_C = extension.load()
pytestmark = pytest.mark.skipif(isinstance(_C, ImportError), reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (levels, grid, (H, W), color, batch): L = 1..4, non-square images, stage-0 patches of 1, 3 and 5
# pixels, the default 224 px / 7x7 / L=3 layout, batch 0, 1 and 2.
CASES = [
    (1, (3, 5), (6, 10), "ycbcr", 2),
    (2, (2, 3), (24, 36), "rgb", 1),
    (3, (7, 7), (224, 224), "ycbcr", 1),
    (4, (1, 2), (80, 96), "ycbcr", 2),
    (3, (3, 1), (72, 40), "rgb", 0),
]


def tokenize(x, levels, grid, color, out_dtype=None):
    return extension.wavelet_tokenize(x, levels, grid, color, out_dtype or x.dtype)


# --------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels,grid,size,color,batch", CASES)
def test_tokenize_matches_reference(levels, grid, size, color, batch, dtype):
    x = torch.randn(batch, 3, *size).to(dtype)
    before = x.clone()
    out = tokenize(x, levels, grid, color)
    oracle = ref.wavelet_tokenize(x.double(), levels, grid, color)
    same = ref.wavelet_tokenize(x, levels, grid, color)
    assert len(out) == levels + 1
    for o, e, r in zip(out, oracle, same):
        assert o.is_contiguous()
        assert_within_torch_error(o, e, r, dtype)
    assert torch.equal(x, before), "the images were written"


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float64),
        (torch.float32, torch.float16),
    ],
)
def test_tokenize_honours_out_dtype(dtype, out_dtype):
    x = torch.randn(2, 3, 24, 40).to(dtype)
    out = tokenize(x, 2, (3, 5), "ycbcr", out_dtype)
    oracle = ref.wavelet_tokenize(x.double(), 2, (3, 5), "ycbcr")
    same = ref.wavelet_tokenize(x, 2, (3, 5), "ycbcr", out_dtype)
    for o, e, r in zip(out, oracle, same):
        assert_within_torch_error(o, e, r, out_dtype)


# --------------------------------------------------------------- the AVX-512 float32 tokenizer

# (levels, grid, (H, W), batch) that the AVX-512 kernel takes (level-1 patches a multiple of 16 wide,
# later patches of whole vectors): one level (the approximation is the stage-0 token), later patch rows
# of two vectors, of one, and 8, 4, 2 and 1 columns wide (16 / pw rows a vector; a 3 x 5 grid of the
# 224 px layout), batch 0.
AVX512_CASES = [
    (1, (2, 3), (64, 96), 2),
    (2, (1, 1), (16, 128), 2),
    (2, (1, 2), (32, 128), 1),
    (3, (3, 5), (96, 160), 1),
    (4, (1, 1), (128, 32), 1),
    (5, (1, 1), (512, 32), 1),
    (2, (1, 1), (32, 32), 0),
]
# Outputs over 1 MiB take non-temporal stores: the 224 px layout with three levels, and with one (A1 is
# then the stage-0 token, streamed by level 1 itself).
AVX512_STREAM_CASES = [(3, (7, 7), (224, 224), 3), (1, (7, 7), (224, 224), 2)]
needs_avx512 = pytest.mark.skipif(
    _C.cpu_tokenizer_kernel(torch.empty(1, 3, 64, 64), 1, 2, 2, torch.float32) != "avx512",
    reason="this CPU has no AVX-512F",
)


@needs_avx512
@pytest.mark.parametrize("levels,grid,size,batch", AVX512_CASES + AVX512_STREAM_CASES)
def test_avx512_tokenizer_rgb_is_bit_identical_to_the_reference(levels, grid, size, batch):
    """Without the colour matrix the kernel's arithmetic is the reference's, so float32 tokens are equal
    bit for bit: a misplaced or missing output anywhere shows up (NaN included)."""
    x = torch.randn(batch, 3, *size)
    if batch:
        x[0, 1, 5, 7] = float("nan")
    streams = (levels, grid, size, batch) in AVX512_STREAM_CASES
    assert _C.cpu_tokenizer_kernel(x, levels, *grid, torch.float32) == ("avx512-stream" if streams else "avx512")
    out = tokenize(x, levels, grid, "rgb")
    for o, e in zip(out, ref.wavelet_tokenize(x, levels, grid, "rgb"), strict=True):
        assert o.shape == e.shape and o.is_contiguous()
        torch.testing.assert_close(o, e, rtol=0, atol=0, equal_nan=True)


@needs_avx512
@pytest.mark.parametrize("levels,grid,size,batch", AVX512_CASES + AVX512_STREAM_CASES)
def test_avx512_tokenizer_ycbcr_within_torch_error(levels, grid, size, batch):
    x = torch.randn(batch, 3, *size)
    out = tokenize(x, levels, grid, "ycbcr")
    oracle = ref.wavelet_tokenize(x.double(), levels, grid, "ycbcr")
    for o, e, r in zip(out, oracle, ref.wavelet_tokenize(x, levels, grid, "ycbcr"), strict=True):
        assert_within_torch_error(o, e, r, torch.float32)


@needs_avx512
@pytest.mark.parametrize("color", ["rgb", "ycbcr"])
def test_avx512_tokenizer_strided_images_and_the_generic_kernel(color):
    """A crop of a larger buffer (rows unit-stride, other strides not) takes the AVX-512 kernel and gives
    the contiguous images' tokens exactly; images with strided rows take the generic kernel, which agrees
    (exactly without the colour matrix)."""
    x = torch.randn(2, 3, 96, 160)
    big = torch.full((2, 4, 100, 170), SENTINEL)
    crop = big[:, 1:, 3:99, 5:165]
    crop.copy_(x)
    columns = torch.full((2, 3, 96, 320), SENTINEL)[..., ::2]
    columns.copy_(x)
    assert _C.cpu_tokenizer_kernel(crop, 3, 3, 5, torch.float32) == "avx512"
    assert _C.cpu_tokenizer_kernel(columns, 3, 3, 5, torch.float32) == "generic"
    fast = tokenize(x, 3, (3, 5), color)
    for o, e in zip(tokenize(crop, 3, (3, 5), color), fast):
        assert torch.equal(o, e)
    for o, e in zip(tokenize(columns, 3, (3, 5), color), fast):
        torch.testing.assert_close(o, e, rtol=0, atol=0 if color == "rgb" else 1e-6)


def test_tokenizer_kernel_choice():
    x = torch.randn(1, 3, 64, 96)
    assert _C.cpu_tokenizer_kernel(x, 1, 2, 3, torch.bfloat16) == "generic"  # 16-bit tokens
    assert _C.cpu_tokenizer_kernel(x.double(), 1, 2, 3, torch.float64) == "generic"
    assert _C.cpu_tokenizer_kernel(x, 0, 2, 3, torch.float32) == "generic"  # levels=0
    assert _C.cpu_tokenizer_kernel(x, 2, 2, 4, torch.float32) == "generic"  # level-1 patches 12 wide
    square = torch.randn(1, 3, 64, 64)
    assert _C.cpu_tokenizer_kernel(square, 4, 1, 1, torch.float32) == "avx512"  # 4 x 4 last patches
    assert _C.cpu_tokenizer_kernel(square, 5, 1, 1, torch.float32) == "generic"  # 2 x 2: not a whole vector
    # Non-temporal stores above 1 MiB of tokens (602,112 bytes per 224 px image).
    assert _C.cpu_tokenizer_kernel(torch.randn(1, 3, 224, 224), 3, 7, 7, torch.float32) == "avx512"
    assert _C.cpu_tokenizer_kernel(torch.randn(2, 3, 224, 224), 3, 7, 7, torch.float32) == "avx512-stream"


def _layouts(x):
    """The same images stored transposed, channels-last, and as a strided window of a larger buffer."""
    B, C, H, W = x.shape
    window = torch.full((B, C + 1, H + 3, 2 * W + 1), SENTINEL, dtype=x.dtype)[:, 1:, 1 : H + 1, 1::2]
    window.copy_(x)
    return {
        "transposed": non_contiguous(x),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "window": window,
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "window"])
def test_tokenize_non_contiguous_input(layout, dtype):
    x = torch.randn(2, 3, 24, 36).to(dtype)
    strided = _layouts(x)[layout]
    assert not strided.is_contiguous()
    for o, e in zip(tokenize(strided, 2, (3, 3), "ycbcr"), tokenize(x, 2, (3, 3), "ycbcr")):
        assert torch.equal(o, e)


def test_auto_and_public_api_use_the_extension():
    assert wk.resolve_impl("auto", "wavelet_tokenize", torch.device("cpu")) == "cpu"
    assert wk.resolve_impl("auto", "wavelet_detokenize", torch.device("cpu")) == "cpu"
    assert wk.resolve_impl("auto", "attention_with_kv_append", torch.device("cpu")) == "cpu"
    assert wk.resolve_impl("auto", "block_causal_attention", torch.device("cpu")) == "cpu"
    x = torch.randn(2, 3, 32, 48)
    out = wk.wavelet_tokenize(x, 2, (2, 3), impl="cpu")
    for o, e in zip(out, ref.wavelet_tokenize(x, 2, (2, 3))):
        assert_close(o, e)
    back = wk.wavelet_detokenize(out, 2, (2, 3), image_size=(32, 48), impl="cpu")
    assert_close(back, x)


def test_opcheck_with_the_extension():
    x = torch.randn(2, 3, 16, 24)
    torch.library.opcheck(_library.wavelet_tokenize, (x, 2, [2, 3], "ycbcr", torch.float32, "cpu"))
    tokens = ref.wavelet_tokenize(x, 2, (2, 3))
    torch.library.opcheck(_library.wavelet_detokenize, (tokens, 2, [2, 3], "ycbcr", [16, 24], "cpu"))
    q, k, v = (torch.randn(2, 2, 3, 8) for _ in range(3))
    caches = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    args = (q, k, v, *caches, torch.tensor([2, 5]), torch.tensor([2, 0]), 0.3, "cpu")
    torch.library.opcheck(_library.attention_with_kv_append, args)
    torch.library.opcheck(_library.attention_with_kv_append, args, {"lens": [2, 5], "rows": [2, 0]})
    qf, kf, vf = (torch.randn(2, 2, 7, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(_library.block_causal_attention, (qf, kf, vf, [3, 4], 0.35, "cpu"))


# ------------------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels,grid,size,color,batch", CASES)
def test_detokenize_matches_reference(levels, grid, size, color, batch, dtype):
    x = torch.randn(batch, 3, *size)
    tokens = [t.to(dtype) for t in ref.wavelet_tokenize(x, levels, grid, color)]
    out = extension.wavelet_detokenize(tokens, levels, grid, color, size)
    oracle = ref.wavelet_detokenize([t.double() for t in tokens], levels, grid, color, size)
    same = ref.wavelet_detokenize(tokens, levels, grid, color, size)
    assert out.is_contiguous()
    assert_within_torch_error(out, oracle, same, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_detokenize_non_contiguous_tokens(dtype):
    x = torch.randn(2, 3, 24, 36, dtype=torch.float64)
    tokens = [t.to(dtype) for t in ref.wavelet_tokenize(x, 2, (3, 3), "ycbcr")]
    strided = []
    for t in tokens:
        big = torch.full((t.shape[0], t.shape[1], 2 * t.shape[2]), SENTINEL, dtype=dtype)
        big[:, :, ::2] = t
        strided.append(big[:, :, ::2] if len(strided) % 2 else non_contiguous(t))
    assert not any(t.is_contiguous() for t in strided)
    expected = extension.wavelet_detokenize(tokens, 2, (3, 3), "ycbcr", (24, 36))
    assert torch.equal(extension.wavelet_detokenize(strided, 2, (3, 3), "ycbcr", (24, 36)), expected)


@pytest.mark.parametrize("color", ["ycbcr", "rgb"])
def test_round_trip_is_exact_in_float64(color):
    x = torch.randn(3, 3, 40, 56, dtype=torch.float64)
    tokens = tokenize(x, 3, (5, 7), color)
    assert_close(extension.wavelet_detokenize(tokens, 3, (5, 7), color, (40, 56)), x)


# ----------------------------------------------------------------------------- attention with KV append


def _kv_case(kv_case, dtype, B=3, n=4, D=16, lens=(3, 0, 20), batch_index=None, device="cpu"):
    """H=2 heads, 5 cache rows of 24 slots, guarded."""
    return kv_case(B, 2, n, D, 5, 24, list(lens)[:B], batch_index, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lens,batch_index",
    [
        ([3, 0, 20], [4, 0, 2]),  # ragged lengths, permuted rows, the last row filled to N_max
        ([5, 5, 5], None),  # one SDPA call over rows 0..2
        ([7, 7, 7], [1, 2, 3]),  # one SDPA call over rows 1..3
        ([0, 9, 2], None),
    ],
)
def test_kv_append_matches_concat_sdpa(lens, batch_index, dtype, kv_case, guards):
    case = _kv_case(kv_case, dtype, lens=lens, batch_index=batch_index)
    q, k_new, v_new, k_cache, v_cache, cache_lens, index = case.args()
    out = extension.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, cache_lens, index, 0.3)
    case.assert_caches_written()
    guards.check()
    assert out.is_contiguous()
    assert_within_torch_error(out, case.oracle(0.3, torch.float64), case.oracle(0.3), dtype)


def test_kv_append_int32_lens_non_contiguous_inputs(kv_case, guards):
    case = _kv_case(kv_case, torch.float32, lens=(1, 6, 2), batch_index=[3, 1, 0])
    q, k_new, v_new = non_contiguous(case.q), non_contiguous(case.k_new), non_contiguous(case.v_new)
    lens, index = case.cache_lens(torch.int32), case.index(torch.int32)
    out = extension.attention_with_kv_append(q, k_new, v_new, case.k_cache, case.v_cache, lens, index, 0.25)
    case.assert_caches_written()
    guards.check()
    assert_close(out, case.oracle(0.25, torch.float64).float())


def test_kv_append_empty_batch_writes_nothing(kv_case, guards):
    case = _kv_case(kv_case, torch.float32, B=0)
    q, k_new, v_new, k_cache, v_cache, lens, _ = case.args()
    out = extension.attention_with_kv_append(q, k_new, v_new, k_cache, v_cache, lens, None, 1.0)
    assert out.shape == q.shape
    assert torch.equal(k_cache, case.k_before) and torch.equal(v_cache, case.v_before)
    guards.check()


# --------------------------------------------------------------------------- block-causal attention

# (B, H, block sizes, D): blocks of size 1, a block of 301 rows (two query tiles, 151 and 150 rows), N not
# a multiple of anything, batch 0 and 1, head dims 1, 40 and 64.
BLOCK_CASES = [
    (2, 3, [1, 4, 1, 6], 16),
    (1, 2, [130, 7], 40),
    (1, 1, [301, 4], 8),
    (3, 1, [5], 1),
    (0, 2, [3, 2], 8),
    (1, 12, [50, 50, 50, 50], 64),
]


def _masked_sdpa(q, k, v, sizes, scale, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
    mask = ref.block_causal_mask(sizes)
    return torch.nn.functional.scaled_dot_product_attention(cast(q), cast(k), cast(v), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,sizes,D", BLOCK_CASES)
def test_block_causal_matches_masked_sdpa(B, H, sizes, D, dtype):
    q, k, v = (torch.randn(B, H, sum(sizes), D).to(dtype) for _ in range(3))
    out = wk.block_causal_attention(q, k, v, sizes, scale=0.3, impl="cpu")
    oracle = _masked_sdpa(q, k, v, sizes, 0.3, torch.float64)
    assert out.is_contiguous()
    assert_within_torch_error(out, oracle, _masked_sdpa(q, k, v, sizes, 0.3), dtype)


def test_block_causal_non_contiguous_and_strided_inputs():
    sizes = [3, 70, 2]
    base = torch.randn(2, 4, 75, 16)
    q = non_contiguous(base)  # head dim not unit-stride
    k = torch.randn(2, 75, 4, 16).transpose(1, 2)  # (B, N, H, D) memory, as a fused QKV gives
    v = torch.randn(1, 4, 75, 16).expand(2, 4, 75, 16)  # stride-0 batch
    out = wk.block_causal_attention(q, k, v, sizes, impl="cpu")
    assert_close(out, ref.block_causal_attention(q.double(), k.double(), v.double(), sizes).float())


def test_block_causal_nan_in_a_later_block_stays_there():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    v[0, 0, 8, 0] = float("nan")
    k[0, 1, 9, 3] = float("inf")
    out = wk.block_causal_attention(q, k, v, [4, 6], impl="cpu")
    assert out[:, :, :4].isfinite().all()
    assert out[0, 0, 4:, 0].isnan().all()


# ------------------------------------------------------------------------------ thread independence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(kv_case, dtype):
    x = torch.randn(3, 3, 48, 72, dtype=dtype)
    wide = torch.randn(3, 3, 96, 160, dtype=dtype)
    streamed = torch.randn(3, 3, 224, 224)  # 1.8 MB of float32 tokens: the AVX-512 kernel's streaming stores
    # 70 new rows: one query tile per (batch, head).
    case = kv_case(3, 2, 70, 8, 5, 96, [4, 0, 26], [2, 4, 0], dtype=dtype)
    q, k_new, v_new, k_cache, v_cache, lens, index = case.args()
    # One job per (batch, head, query tile), for one (batch, head) and for many; a block of 290 rows
    # has two query tiles.
    attention = [(torch.randn(1, 1, 9, 16, dtype=dtype), [9]), (torch.randn(2, 3, 150, 16, dtype=dtype), [20, 130])]
    attention.append((torch.randn(1, 2, 300, 8, dtype=dtype), [290, 10]))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            tokens = tokenize(x, 2, (3, 3), "ycbcr")
            wide_tokens = tokenize(wide, 3, (3, 5), "ycbcr")  # float32: the AVX-512 kernel, where the CPU has it
            wide_tokens += tokenize(streamed, 3, (7, 7), "ycbcr")
            image = extension.wavelet_detokenize(tokens, 2, (3, 3), "ycbcr", (48, 72))
            kc, vc = k_cache.clone(), v_cache.clone()
            out = extension.attention_with_kv_append(q, k_new, v_new, kc, vc, lens, index, 0.5)
            full = [extension.block_causal_attention(a, a * 2, a.flip(2), sizes, 0.3) for a, sizes in attention]
            results.append([*tokens, *wide_tokens, image, out, kc, vc, *full])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ------------------------------------------------------------------------ bad input from Python to _C


def _tok_args(**change):
    args = dict(images=torch.randn(1, 3, 16, 16), levels=2, grid_h=2, grid_w=2, color="ycbcr", out_dtype=torch.float32)
    return {**args, **change}


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"images": torch.randn(3, 16, 16)}, ValueError, r"images must have shape \(B, 3, H, W\)"),
        ({"images": torch.randn(1, 4, 16, 16)}, ValueError, "images must have 3 channels"),
        ({"images": torch.randint(0, 9, (1, 3, 16, 16))}, TypeError, "images must be float16, bfloat16"),
        ({"images": torch.randn(1, 3, 16, 16, device="meta")}, ValueError, "images must be a CPU or CUDA tensor"),
        ({"images": torch.randn(1, 3, 12, 16)}, ValueError, "image height 12 must be a positive multiple"),
        ({"images": torch.randn(1, 3, 16, 20)}, ValueError, "image width 20 must be a positive multiple"),
        ({"levels": -1}, ValueError, "levels must be in"),
        ({"levels": 64}, ValueError, "levels must be in"),
        ({"grid_w": 0}, ValueError, "grid must be positive"),
        ({"color": "hsv"}, ValueError, 'color must be "ycbcr" or "rgb"'),
        ({"out_dtype": torch.int8}, TypeError, "out_dtype must be"),
    ],
)
def test_tokenize_bad_input_is_a_python_exception(change, error, match):
    with pytest.raises(error, match=match):
        _C.wavelet_tokenize(**_tok_args(**change))


def test_detokenize_bad_input_is_a_python_exception():
    tokens = ref.wavelet_tokenize(torch.randn(1, 3, 16, 16), 2, (2, 2))
    with pytest.raises(ValueError, match="tokens must hold levels \\+ 1 = 4 tensors"):
        _C.wavelet_detokenize(tokens, 3, 2, 2, "ycbcr", 16, 16)
    with pytest.raises(ValueError, match=r"tokens\[1\] must have shape \(1, 4, 36\)"):
        _C.wavelet_detokenize([tokens[0], tokens[2], tokens[1]], 2, 2, 2, "ycbcr", 16, 16)
    with pytest.raises(TypeError, match=r"tokens\[2\] has dtype Double but tokens\[0\] has Float"):
        _C.wavelet_detokenize([tokens[0], tokens[1], tokens[2].double()], 2, 2, 2, "ycbcr", 16, 16)
    with pytest.raises(ValueError, match=r"tokens\[0\] must have shape \(B, Gh\*Gw, dim\)"):
        _C.wavelet_detokenize([tokens[0][0], tokens[1], tokens[2]], 2, 2, 2, "ycbcr", 16, 16)
    with pytest.raises(ValueError, match="image width 20"):
        _C.wavelet_detokenize(tokens, 2, 2, 2, "ycbcr", 16, 20)
    with pytest.raises(TypeError):
        _C.wavelet_detokenize([tokens[0], None, tokens[2]], 2, 2, 2, "ycbcr", 16, 16)


def _kv_args(**change):
    q = torch.randn(2, 2, 3, 4)
    args = dict(
        q=q,
        k_new=torch.randn(2, 2, 3, 4),
        v_new=torch.randn(2, 2, 3, 4),
        k_cache=torch.randn(3, 2, 8, 4),
        v_cache=torch.randn(3, 2, 8, 4),
        cache_lens=torch.tensor([0, 1]),
        batch_index=None,
        scale=0.5,
    )
    return {**args, **change}


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"k_cache": torch.randn(3, 2, 8, 4).double()}, TypeError, "k_cache has dtype Double but q has Float"),
        ({"q": torch.randn(2, 2, 3, 4).half()}, TypeError, "k_new has dtype Float but q has Half"),
        ({"v_new": torch.randn(2, 2, 2, 4)}, ValueError, "must have q's shape"),
        ({"k_cache": torch.randn(3, 2, 8)}, ValueError, r"k_cache must have shape \(B_cache, H, N_max, D\)"),
        ({"v_cache": torch.randn(3, 2, 9, 4)}, ValueError, "must have one shape"),
        ({"k_cache": torch.randn(3, 1, 8, 4), "v_cache": torch.randn(3, 1, 8, 4)}, ValueError, "in heads"),
        ({"k_cache": torch.randn(3, 2, 8, 4, device="meta")}, ValueError, "k_cache must be a CPU or CUDA tensor"),
        ({"cache_lens": torch.tensor([0, 6])}, ValueError, r"cache overflow: row 1 \(cache row 1\) has cache_lens=6"),
        ({"cache_lens": torch.tensor([-1, 0])}, ValueError, r"cache_lens\[0\] = -1 must be >= 0"),
        ({"cache_lens": torch.tensor([0, 2**62])}, ValueError, "cache overflow: row 1"),
        ({"cache_lens": torch.tensor([0.0, 1.0])}, TypeError, "cache_lens must hold int32 or int64"),
        ({"cache_lens": torch.tensor([0])}, ValueError, r"cache_lens must have shape \(2,\)"),
        ({"batch_index": torch.tensor([1, 1])}, ValueError, "batch_index has the cache row 1 twice"),
        ({"batch_index": torch.tensor([0, 3])}, ValueError, r"batch_index\[1\] = 3 must lie in \[0, 3\)"),
        (
            {
                "q": torch.randn(4, 2, 3, 4),
                "k_new": torch.randn(4, 2, 3, 4),
                "v_new": torch.randn(4, 2, 3, 4),
                "cache_lens": torch.zeros(4, dtype=torch.long),
            },
            ValueError,
            "pass batch_index",
        ),
    ],
)
def test_kv_append_bad_input_is_a_python_exception_and_writes_nothing(change, error, match):
    args = _kv_args(**change)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(error, match=match):
        _C.attention_with_kv_append(**args)
    if args["k_cache"].device.type == "cpu" and args["k_cache"].shape == args["v_cache"].shape:
        assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_cuda_tensor_without_cuda_build_is_a_python_exception():
    if _C.has_cuda():
        pytest.skip("this build has the CUDA kernels")
    assert extension.unavailable_reason("wavelet_tokenize", "cuda") == "the extension was built without CUDA"


# ------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and not isinstance(_C, ImportError) and _C.has_cuda()),
    reason="needs a CUDA device and a CUDA build of the extension",
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels,grid,size,color,batch", [*CASES, (5, (1, 1), (64, 96), "ycbcr", 2)])
def test_cuda_tokenize_and_inverse_match_reference(levels, grid, size, color, batch, dtype):
    x = torch.randn(batch, 3, *size).to(dtype)
    for images in (x, _layouts(x)["channels_last"]):
        out = extension.wavelet_tokenize(images.cuda(), levels, grid, color, dtype)
        oracle = ref.wavelet_tokenize(x.double(), levels, grid, color)
        same = ref.wavelet_tokenize(x, levels, grid, color)
        for o, e, r in zip(out, oracle, same):
            assert_within_torch_error(o.cpu(), e, r, dtype)
    tokens = [t.to(dtype) for t in ref.wavelet_tokenize(x.double(), levels, grid, color)]
    for toks in (tokens, [non_contiguous(t) for t in tokens]):
        back = extension.wavelet_detokenize([t.cuda() for t in toks], levels, grid, color, size)
        oracle = ref.wavelet_detokenize([t.double() for t in tokens], levels, grid, color, size)
        same = ref.wavelet_detokenize(tokens, levels, grid, color, size)
        assert_within_torch_error(back.cpu(), oracle, same, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 6])  # 16-byte rows for every dtype; element-wise rows
def test_cuda_kv_append_matches_cpu(dtype, D, kv_case, guards):
    case = _kv_case(kv_case, dtype, D=D, batch_index=[4, 0, 2], device="cuda")
    out = extension.attention_with_kv_append(*case.args(), 0.3)
    case.assert_caches_written()
    guards.check()
    assert_within_torch_error(out.cpu(), case.oracle(0.3, torch.float64).cpu(), case.oracle(0.3).cpu(), dtype)
