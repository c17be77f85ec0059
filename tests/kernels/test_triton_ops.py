"""impl="triton" against the reference, on the CPU through the Triton interpreter (tiny shapes).

Guard bands: outputs are written into views of sentinel-filled buffers (the launchers' `out=`), and
caches are such views (the `guards` fixture), so a write outside the target shows up as a changed sentinel.
Bounds: `tolerances.assert_close` against a float64 oracle (the tokenizer's 16-bit stores round to
nearest even; test_tokenizer_backends.py checks them bit for bit).
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import non_contiguous
from tolerances import assert_close, max_err

import waveclip_kernels as wk
from waveclip_kernels import _library
from waveclip_kernels import reference as ref
from waveclip_kernels import triton as tri
from waveclip_kernels.common import stage_dims
from waveclip_kernels.triton import attention as tri_attention

# These run Triton on CPU tensors; the compiled GPU versions live in tests/test_triton_gpu.py.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


# --------------------------------------------------------------------------------------- tokenizer

# (levels, grid, (H, W), color, input dtype, out dtype): odd grids, non-square images, stage-0
# patches that are not powers of two (3, 5), and a cell wider than one program (PW0 = 12 > 8).
TOKENIZE_CASES = [
    (1, (3, 2), (18, 20), "rgb", torch.float32, torch.float32),
    (2, (1, 3), (12, 24), "ycbcr", torch.float64, torch.float64),
    (3, (2, 1), (32, 24), "ycbcr", torch.float32, torch.bfloat16),
    (3, (1, 1), (8, 96), "rgb", torch.float64, torch.float64),
    (2, (2, 2), (16, 16), "ycbcr", torch.float16, torch.float32),
    (1, (1, 2), (6, 4), "ycbcr", torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("levels,grid,size,color,dtype,out_dtype", TOKENIZE_CASES)
def test_tokenize_matches_reference(levels, grid, size, color, dtype, out_dtype):
    x = torch.randn(2, 3, *size, dtype=torch.float64).to(dtype)
    tokens = wk.wavelet_tokenize(non_contiguous(x), levels, grid, color, out_dtype=out_dtype, impl="triton")
    expected = ref.wavelet_tokenize(x.double(), levels, grid, color)
    assert len(tokens) == levels + 1
    for t, e in zip(tokens, expected):
        assert t.is_contiguous()
        assert_close(t, e, out_dtype if dtype != torch.float64 else torch.float64)


def test_tokenize_guard_bands_and_strided_outputs(guards):
    levels, grid, size = 2, (2, 3), (16, 36)
    x = torch.randn(1, 3, *size)
    dims = stage_dims(levels, grid, size)
    views = [guards.new((1, 6, d), torch.float32, dim=dim) for d, dim in zip(dims, (2, 1, 0))]
    out = tri.wavelet_tokenize(x, levels, grid, "ycbcr", torch.float32, out=views)
    for t, e, view in zip(out, ref.wavelet_tokenize(x.double(), levels, grid), views):
        assert t is view
        assert_close(t, e, torch.float32)
    guards.check()


@pytest.mark.parametrize(
    "levels,grid,size,color,dtype",
    [
        (2, (3, 1), (24, 8), "ycbcr", torch.float64),
        (3, (1, 2), (16, 32), "rgb", torch.float32),
        (1, (2, 2), (12, 4), "ycbcr", torch.bfloat16),
    ],
)
def test_detokenize_matches_reference(levels, grid, size, color, dtype, guards):
    dims = stage_dims(levels, grid, size)
    g = grid[0] * grid[1]
    tokens = [torch.randn(2, g, d, dtype=torch.float64).to(dtype) for d in dims]
    image = guards.new((2, 3, *size), dtype, dim=3)
    out = tri.wavelet_detokenize([non_contiguous(t) for t in tokens], levels, grid, color, size, out=image)
    expected = ref.wavelet_detokenize([t.double() for t in tokens], levels, grid, color, size)
    assert_close(out, expected, dtype)
    guards.check()
    public = wk.wavelet_detokenize(tokens, levels, grid, color, image_size=size, impl="triton")
    assert public.is_contiguous() and torch.equal(public, out)


def test_roundtrip_float64_is_exact():
    x = torch.randn(1, 3, 24, 40, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, 3, (1, 5), impl="triton")
    back = wk.wavelet_detokenize(tokens, 3, (1, 5), image_size=(24, 40), impl="triton")
    assert max_err(back, x) < 1e-13


def test_wavelet_empty_batch():
    tokens = tri.wavelet_tokenize(torch.randn(0, 3, 8, 8), 2, (2, 2), "ycbcr", torch.float16)
    assert [tuple(t.shape) for t in tokens] == [(0, 4, 3), (0, 4, 9), (0, 4, 36)]
    assert all(t.dtype == torch.float16 for t in tokens)
    assert tri.wavelet_detokenize(tokens, 2, (2, 2), "ycbcr", (8, 8)).shape == (0, 3, 8, 8)


# --------------------------------------------------------------------------- block-causal attention

# (B, H, N, D, block sizes): N in {1, 17, 50, 97}, blocks not aligned to the 32 x 16 interpreter tiles,
# a head dim below the smallest dot (8), and one that is padded (80).
ATTENTION_CASES = [
    (1, 1, 1, 8, [1]),
    (1, 2, 17, 16, [5, 3, 9]),
    (2, 1, 50, 32, [50]),
    (1, 2, 97, 32, [7, 33, 1, 56]),
    (1, 1, 50, 80, [20, 1, 29]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,D,blocks", ATTENTION_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_block_causal_matches_reference(B, H, N, D, blocks, dtype, guards):
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64).to(dtype) for _ in range(3))
    out = guards.new((B, H, N, D), dtype, dim=2)
    got = tri.block_causal_attention(non_contiguous(q), k, non_contiguous(v), blocks, 0.3, out=out)
    expected = ref.block_causal_attention(q.double(), k.double(), v.double(), blocks, 0.3)
    assert_close(got, expected, dtype)
    guards.check()


def test_block_causal_public_api_contiguous_output():
    q, k, v = (torch.randn(1, 2, 17, 16).transpose(1, 2).contiguous().transpose(1, 2) for _ in range(3))
    out = wk.block_causal_attention(q, k, v, [9, 8], impl="triton")
    assert out.is_contiguous() and out.shape == (1, 2, 17, 16)
    assert_close(out, ref.block_causal_attention(q.double(), k.double(), v.double(), [9, 8]), torch.float32)


def test_block_causal_later_blocks_do_not_leak():
    """Changing the keys/values of the last block leaves every earlier row bit-identical."""
    q, k, v = (torch.randn(1, 1, 40, 16, dtype=torch.float64) for _ in range(3))
    blocks = [10, 13, 17]
    before = tri.block_causal_attention(q, k, v, blocks, 0.25)
    k[:, :, 23:] = 1e3 * torch.randn(1, 1, 17, 16, dtype=torch.float64)
    v[:, :, 23:] = 1e3
    after = tri.block_causal_attention(q, k, v, blocks, 0.25)
    assert torch.equal(after[:, :, :23], before[:, :, :23])
    assert not torch.equal(after[:, :, 23:], before[:, :, 23:])


@pytest.mark.parametrize("where", ["v", "k"])
def test_block_causal_nan_in_later_block_stays_there(where):
    """A NaN/inf in a later block's keys or values never reaches an earlier block's rows (a query tile
    spanning two blocks used to compute 0 x NaN inside its dot)."""
    q, k, v = (torch.randn(1, 1, 10, 16) for _ in range(3))
    blocks = [4, 6]
    expected = ref.block_causal_attention(q.double(), k.double(), v.double(), blocks)
    bad = {"v": v, "k": k}[where]
    bad[0, 0, 8, 0] = float("nan")
    bad[0, 0, 9, 3] = float("inf")
    got = tri.block_causal_attention(q, k, v, blocks, 16**-0.5)
    assert torch.isfinite(got[:, :, :4]).all()
    assert_close(got[:, :, :4], expected[:, :, :4], torch.float32)


def test_block_causal_tiles_never_span_blocks():
    """Block-aligned tiles: ceil(n / tile) tiles per block."""
    assert tri_attention.aligned_tiles([4, 6], 32) == 2
    assert tri_attention.aligned_tiles([50] * 4, 64) == 4
    assert tri_attention.aligned_tiles([197] * 4, 64) == 16
    assert tri_attention.aligned_tiles([1, 33], 16) == 4


def test_block_causal_empty_batch():
    q = torch.randn(0, 2, 17, 16)
    assert tri.block_causal_attention(q, q, q, [17], 0.25).shape == (0, 2, 17, 16)


def test_block_causal_gradients_through_reference_backward():
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(wk.block_causal_attention(q, k, v, [4, 5], impl="triton").sum(), (q, k, v))
    expected = torch.autograd.grad(wk.block_causal_attention(q, k, v, [4, 5], impl="reference").sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


# -------------------------------------------------------------------- attention with KV append

# (B, B_cache, H, n, N_max, D, cache_lens, batch_index): empty and full prefixes, n=1 decode,
# routing through batch_index with an untouched cache row, a padded head dim.
KV_CASES = [
    (1, 1, 1, 1, 1, 8, [0], None),
    (2, 2, 2, 17, 60, 16, [0, 40], None),
    (2, 4, 1, 5, 50, 80, [33, 3], [2, 0]),
    (3, 4, 2, 1, 70, 16, [69, 0, 17], [1, 3, 0]),
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,B_cache,H,n,n_max,D,lens,batch_index", KV_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_kv_append_matches_reference(B, B_cache, H, n, n_max, D, lens, batch_index, dtype, num_splits, kv_case, guards):
    # Never-written slots hold NaN: a read past c+n poisons the output.
    case = kv_case(B, H, n, D, B_cache, n_max, lens, batch_index, dtype=dtype, nan_tail=True)
    q, k_new, v_new, kc, vc, lens_t, index = case.args(torch.int32)
    k_expected, v_expected = (c.to(torch.float64, copy=True) for c in (case.k_before, case.v_before))
    expected = ref.attention_with_kv_append(
        q.double(), k_new.double(), v_new.double(), k_expected, v_expected, lens_t, index, 0.3
    )
    out = guards.new((B, H, n, D), dtype, dim=0)
    got = tri.attention_with_kv_append(
        non_contiguous(q), k_new, non_contiguous(v_new), kc, vc, lens_t, index, 0.3, out=out, num_splits=num_splits
    )
    assert_close(got, expected, dtype)
    case.assert_caches_written()  # the appended slots are bit-exact copies and nothing else changed
    guards.check()


def test_kv_append_splits_with_empty_shares_and_int64_lens(kv_case):
    """6 shares of a 1-tile key range: five are empty and must not disturb the combine."""
    case = kv_case(2, 1, 3, 16, 2, 40, [0, 2], dtype=torch.float32, nan_tail=True)
    q, k_new, v_new, kc, vc, lens, _ = case.args()
    got = tri.attention_with_kv_append(q, k_new, v_new, kc, vc, lens, None, q.shape[-1] ** -0.5, num_splits=6)
    assert_close(got, case.oracle(dtype=torch.float64), torch.float32)


def test_kv_append_public_api_and_sequential_equals_block_causal():
    """Stage by stage through the cache gives the full block-causal pass (the model's refine path)."""
    blocks = [5, 5, 7]
    q, k, v = (torch.randn(2, 2, 17, 16, dtype=torch.float64) for _ in range(3))
    full = wk.block_causal_attention(q, k, v, blocks, impl="triton")
    kc, vc = torch.zeros(2, 2, 20, 16, dtype=torch.float64), torch.zeros(2, 2, 20, 16, dtype=torch.float64)
    lens, start, parts = torch.zeros(2, dtype=torch.int64), 0, []
    for size in blocks:
        s = slice(start, start + size)
        parts.append(wk.attention_with_kv_append(q[:, :, s], k[:, :, s], v[:, :, s], kc, vc, lens, impl="triton"))
        lens += size
        start += size
    assert max_err(torch.cat(parts, dim=2), full) < 1e-12
    assert torch.equal(kc[:, :, :17], k) and torch.equal(vc[:, :, :17], v)


def test_kv_append_empty_batch_writes_nothing():
    q = torch.randn(0, 2, 3, 16)
    cache = torch.randn(2, 2, 8, 16)
    before = cache.clone()
    out = tri.attention_with_kv_append(q, q, q, cache, cache, torch.zeros(0, dtype=torch.int64), None, 0.25)
    assert out.shape == (0, 2, 3, 16) and torch.equal(cache, before)


def test_num_kv_splits_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert tri.num_kv_splits(1, 10_000, cpu) == 1  # the CPU counts as one SM: never split by default
    monkeypatch.setattr(tri_attention, "_sm_count", lambda device: 132)
    assert tri.num_kv_splits(132, 10_000, cpu) == 1  # enough programs
    assert tri.num_kv_splits(12, 788, cpu) == 4  # ceil(788 / 256) shares of >= 256 keys
    assert tri.num_kv_splits(12, 100_000, cpu) == 11  # ceil(132 / 12)
    assert tri.num_kv_splits(1, 100_000, cpu) == 16  # at most MAX_SPLITS


# ------------------------------------------------------------ registration: opcheck, torch.compile


@pytest.mark.slow
def test_opcheck_triton_ops():
    x = torch.randn(1, 3, 8, 12)
    torch.library.opcheck(_library.wavelet_tokenize, (x, 1, [2, 3], "ycbcr", torch.float32, "triton"))
    q, k, v = (torch.randn(1, 1, 7, 16) for _ in range(3))
    torch.library.opcheck(_library.block_causal_attention, (q, k, v, [3, 4], 0.35, "triton"))
    qn = torch.randn(2, 1, 3, 16)
    cache = torch.randn(3, 1, 10, 16)
    args = (qn, qn.clone(), qn.clone(), cache, cache.clone(), torch.tensor([1, 4]), torch.tensor([2, 0]), 0.35)
    torch.library.opcheck(_library.attention_with_kv_append, (*args, "triton"))


@pytest.mark.slow
def test_torch_compile_aot_eager():
    def f(x, q, cache):
        tokens = wk.wavelet_tokenize(x, 1, 2, impl="triton")
        attn = wk.block_causal_attention(q, q, q, [2, 3], scale=0.5, impl="triton")
        step = wk.attention_with_kv_append(q, q, q, cache, cache.clone(), [1], impl="triton")
        return tokens[1].sum() + attn.sum() + step.sum()

    x, q, cache = torch.randn(1, 3, 8, 8), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x, q, cache), f(x, q, cache))


# ------------------------------------------------------------------ GPU code generation, no GPU

SM90_COMPILE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from bench.compile_sweep import H200  # a fake driver for an sm_90 target
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


driver.set_active(H200())
compiled = []
launch = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append(self.fn.__name__)
    return kernel


def first_config(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    return self.fn.run(*args, **kwargs, **self.prune_configs(kwargs)[0].all_kwargs())


JITFunction.run, Autotuner.run = compile_only, first_config
from waveclip_kernels import triton as T

q = torch.randn(2, 12, 200, 80, dtype=torch.bfloat16)
T.block_causal_attention(q, q, q, [50] * 4, 0.125)
cache = torch.randn(2, 12, 256, 80, dtype=torch.bfloat16)
for splits in (1, 4):
    T.attention_with_kv_append(q, q, q, cache, cache.clone(), torch.tensor([5, 0]), None, 0.125, num_splits=splits)
x = torch.randn(2, 3, 224, 224, dtype=torch.float16)
T.wavelet_detokenize(T.wavelet_tokenize(x, 3, (7, 7), "ycbcr", torch.float16), 3, (7, 7), "ycbcr", (224, 224))
print(" ".join(compiled))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel goes through Triton's full GPU pipeline (to an sm_90 cubin) without a GPU: the
    interpreter does not enforce GPU typing and shape rules, ptxas does."""
    done = subprocess.run([sys.executable, "-c", SM90_COMPILE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [
        "_block_causal_fwd_kernel",
        "_attn_kv_append_kernel",
        "_attn_kv_append_kernel",
        "_combine_splits_kernel",
        "_tokenize_kernel",
        "_detokenize_kernel",
    ]
