"""Contracts every tokenizer backend that runs here must keep (reference, the C++ CPU op, Triton under
the interpreter): levels=0, rounding of 16-bit outputs, the image size of the inverse, argument
validation, and gradients (docs/design.md section 1)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import waveclip_kernels as wk
from waveclip_kernels.common import YCBCR_FROM_RGB

IMPLS = [i for i in ("reference", "cpu", "triton") if i in wk.available_impls("cpu")["wavelet_tokenize"]]


def layout_oracle(x: torch.Tensor, grid, color: str) -> torch.Tensor:
    """levels=0 written out: colour-mix every pixel, then token (gy, gx) feature (c, py, px) is pixel
    (gy*Ph + py, gx*Pw + px) of channel c."""
    if color == "ycbcr":
        x = torch.einsum("oc,bchw->bohw", torch.tensor(YCBCR_FROM_RGB, dtype=x.dtype), x)
    B, _, H, W = x.shape
    gh, gw = grid
    ph, pw = H // gh, W // gw
    out = torch.empty(B, gh * gw, 3 * ph * pw, dtype=x.dtype)
    for gy in range(gh):
        for gx in range(gw):
            out[:, gy * gw + gx] = x[:, :, gy * ph : (gy + 1) * ph, gx * pw : (gx + 1) * pw].reshape(B, -1)
    return out


# ------------------------------------------------------------------------------------ levels=0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("color", ["ycbcr", "rgb"])
def test_levels_zero_is_colour_and_layout_alone(impl, color):
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, 0, (3, 2), color, impl=impl)
    assert len(tokens) == 1 and tokens[0].shape == (2, 6, 30)
    torch.testing.assert_close(tokens[0], layout_oracle(x, (3, 2), color), rtol=0, atol=1e-14)
    back = wk.wavelet_detokenize(tokens, 0, (3, 2), color, image_size=(6, 10), impl=impl)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("impl", IMPLS)
def test_levels_zero_low_precision_and_strided(impl):
    x = torch.randn(1, 3, 8, 12).transpose(-1, -2).contiguous().transpose(-1, -2)
    (tokens,) = wk.wavelet_tokenize(x, 0, (2, 3), "rgb", out_dtype=torch.float16, impl=impl)
    assert torch.equal(tokens, layout_oracle(x, (2, 3), "rgb").to(torch.float16))
    back = wk.wavelet_detokenize([tokens.transpose(0, 1).contiguous().transpose(0, 1)], 0, (2, 3), "rgb", (8, 12), impl)
    assert torch.equal(back, x.to(torch.float16))


# ---------------------------------------------------------------------------- 16-bit rounding


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("in_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_16bit_tokens_round_to_nearest_even(impl, in_dtype, out_dtype):
    """rgb keeps every backend's arithmetic identical to the reference's, so the 16-bit tokens must be
    bit-identical to torch's own rounding of the reference's tokens (truncation is off by one ulp in
    half of the elements; a float64 -> bfloat16 cast gone wrong gives zeros and NaN)."""
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64).to(in_dtype)
    x[0, 0, 0, 0] = float("nan")
    tokens = wk.wavelet_tokenize(x, 2, (2, 3), "rgb", out_dtype=out_dtype, impl=impl)
    exact = wk.wavelet_tokenize(x, 2, (2, 3), "rgb", impl="reference")
    for t, e in zip(tokens, exact):
        expected = e.to(out_dtype)
        assert t.dtype == out_dtype
        assert torch.equal(t.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert finite.sum() > 0.9 * finite.numel()
        assert torch.equal(t[finite], expected[finite])


@pytest.mark.parametrize("impl", IMPLS)
def test_16bit_tokens_ycbcr_within_one_rounding(impl):
    """With the colour matrix, backends may round float32 sums differently: at most one bfloat16 ulp."""
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, 2, (2, 3), out_dtype=torch.bfloat16, impl=impl)
    exact = wk.wavelet_tokenize(x, 2, (2, 3), impl="reference")
    for t, e in zip(tokens, exact):
        ulp = torch.finfo(torch.bfloat16).eps * e.abs().clamp_min(1e-3)
        assert ((t.double() - e).abs() <= 0.5 * ulp + 1e-12).float().mean() > 0.99
        assert ((t.double() - e).abs() <= ulp).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_image_rounds_to_nearest_even(impl):
    tokens = [t.to(torch.bfloat16) for t in wk.wavelet_tokenize(torch.randn(2, 3, 8, 16), 1, (1, 2), "rgb")]
    image = wk.wavelet_detokenize(tokens, 1, (1, 2), "rgb", (8, 16), impl=impl)
    exact = wk.wavelet_detokenize([t.double() for t in tokens], 1, (1, 2), "rgb", (8, 16), impl="reference")
    assert torch.equal(image, exact.to(torch.bfloat16))


# ------------------------------------------------------------------------------- image size


@pytest.mark.parametrize("impl", IMPLS)
def test_detokenize_needs_the_image_size(impl):
    """16 x 64 and 32 x 32 images give tokens of one shape: the inverse cannot guess which."""
    x = torch.randn(1, 3, 16, 64, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, 1, 1, impl=impl)
    assert [t.shape for t in tokens] == [t.shape for t in wk.wavelet_tokenize(torch.randn(1, 3, 32, 32), 1, 1)]
    with pytest.raises(ValueError, match="image_size is required"):
        wk.wavelet_detokenize(tokens, 1, 1, impl=impl)
    torch.testing.assert_close(wk.wavelet_detokenize(tokens, 1, 1, image_size=(16, 64), impl=impl), x)
    with pytest.raises(ValueError, match="tokens\\[0\\] must have shape"):
        wk.wavelet_detokenize(tokens, 1, 1, image_size=16, impl=impl)  # an int is a square: 16 x 16


@pytest.mark.parametrize(
    "image_size", [(16,), (16, 16, 3), "16", 16.0, True, (16, True), (0, 16), (np.int64(-16), 16), None]
)
def test_detokenize_bad_image_size(image_size):
    tokens = wk.wavelet_tokenize(torch.randn(1, 3, 16, 16), 1, 2, impl="reference")
    with pytest.raises(ValueError, match="image_size"):
        wk.wavelet_detokenize(tokens, 1, 2, image_size=image_size, impl="reference")


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("grid", [True, (2, True), False, 2.0, (2, 2, 2), "2", np.bool_(True)])
def test_grid_refuses_bools_floats_and_wrong_lengths(grid):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="grid must be"):
        wk.wavelet_tokenize(x, 1, grid, impl="reference")
    tokens = wk.wavelet_tokenize(x, 1, 2, impl="reference")
    with pytest.raises(ValueError, match="grid must be"):
        wk.wavelet_detokenize(tokens, 1, grid, image_size=16, impl="reference")


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_ints_are_ints(impl):
    x = torch.randn(1, 3, 16, 32, dtype=torch.float64)
    expected = wk.wavelet_tokenize(x, 2, (2, 4), impl="reference")
    grid = (np.int64(2), np.int32(4))
    tokens = wk.wavelet_tokenize(x, np.int64(2), grid, impl=impl)
    for t, e in zip(tokens, expected):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-14)
    square = wk.wavelet_tokenize(x[..., :16], 1, np.int64(2), impl=impl)
    back = wk.wavelet_detokenize(square, np.int64(1), np.int64(2), image_size=np.int64(16), impl=impl)
    torch.testing.assert_close(back, x[..., :16])
    back = wk.wavelet_detokenize(tokens, 2, grid, image_size=(np.int64(16), np.int64(32)), impl=impl)
    torch.testing.assert_close(back, x)


# -------------------------------------------------------------------------------- gradients

# (levels, grid, (H, W)): levels=0, a non-square cell, two levels; tiny for the interpreter.
GRAD_CASES = [(0, (1, 2), (2, 4)), (1, (1, 2), (4, 8)), (2, (1, 1), (4, 8))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("color", ["ycbcr", "rgb"])
@pytest.mark.parametrize("levels,grid,size", GRAD_CASES)
def test_gradcheck_tokenize_and_detokenize(impl, color, levels, grid, size, one_thread):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    tokenize = lambda x: tuple(wk.wavelet_tokenize(x, levels, grid, color, impl=impl))  # noqa: E731
    assert torch.autograd.gradcheck(tokenize, (x,), fast_mode=impl != "reference")
    tokens = tuple(t.detach().requires_grad_() for t in tokenize(x))
    detokenize = lambda *t: wk.wavelet_detokenize(list(t), levels, grid, color, size, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(detokenize, tokens, fast_mode=impl != "reference")


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "triton"])
def test_double_backward(impl, one_thread):
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    tokenize = lambda x: tuple(wk.wavelet_tokenize(x, 1, (1, 2), impl=impl))  # noqa: E731
    assert torch.autograd.gradgradcheck(tokenize, (x,))
    tokens = tuple(t.detach().requires_grad_() for t in tokenize(x))
    detokenize = lambda *t: wk.wavelet_detokenize(list(t), 1, (1, 2), image_size=(4, 8), impl=impl)  # noqa: E731
    assert torch.autograd.gradgradcheck(detokenize, tokens)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_of_one_stage_against_autograd_through_the_math(impl):
    """Only the finest stage used, 16-bit tokens, float32 images: the gradient has the images' dtype and equals
    autograd through the transform written out with torch ops (colour einsum, polyphase Haar)."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(2, 4, 36)
    (wk.wavelet_tokenize(x, 2, 2, out_dtype=torch.bfloat16, impl=impl)[2].float() * w).sum().backward()
    assert x.grad.dtype == torch.float32

    y = torch.einsum("oc,bchw->bohw", torch.tensor(YCBCR_FROM_RGB), x)
    a, b, c, d = y[..., 0::2, 0::2], y[..., 0::2, 1::2], y[..., 1::2, 0::2], y[..., 1::2, 1::2]
    details = torch.stack(((a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2), dim=2)  # level 1
    stage1 = details.reshape(2, 9, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 36)
    (expected,) = torch.autograd.grad((stage1 * w.bfloat16().float()).sum(), x)  # .float()'s grad is bf16
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the C++ header mirrors common


@pytest.mark.skipif("cpu" not in IMPLS, reason="the C++ extension is not built")
def test_csrc_header_mirrors_common():
    """csrc/waveclip.h's colour matrix and stage geometry, read through the extension, equal common's."""
    from waveclip_kernels import common, extension

    ext = extension.load()
    assert ext.color_matrix(True, False) == [list(row) for row in common.YCBCR_FROM_RGB]
    for ycbcr, color in ((True, "ycbcr"), (False, "rgb")):
        for inverse in (False, True):
            expected = common.color_matrix(color, torch.float64, inverse=inverse)
            got = torch.tensor(ext.color_matrix(ycbcr, inverse), dtype=torch.float64)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    for levels, grid, size in [
        (0, (2, 3), (6, 9)),
        (1, (3, 5), (6, 10)),
        (3, (7, 7), (224, 224)),
        (4, (1, 2), (80, 96)),
    ]:
        shapes = common.stage_shapes(levels, size)
        patches = common.stage_patches(levels, grid, size)
        dims = common.stage_dims(levels, grid, size)
        expected = [[c, ph, pw, d] for (c, _, _), (ph, pw), d in zip(shapes, patches, dims)]
        assert ext.stage_geometry(levels, *grid, *size) == expected


# -------------------------------------------------------------------------- Triton launch rules

triton_only = pytest.mark.skipif("triton" not in IMPLS, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


@triton_only
def test_triton_launches_on_grid_axis_0_inside_the_device_guard(monkeypatch):
    """Grid axes 1 and 2 are capped at 65535 on a GPU: every program sits on axis 0. The launch runs
    inside the tensors' device guard (Triton launches on the current CUDA device)."""
    from waveclip_kernels.triton import wavelet

    grids, guarded_devices = [], []
    for kernel in (wavelet._tokenize_kernel, wavelet._detokenize_kernel):
        real = kernel.run

        def run(*args, grid, _real=real, **kwargs):
            grids.append(grid)
            return _real(*args, grid=grid, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    real_guard = wavelet._device_guard
    monkeypatch.setattr(wavelet, "_device_guard", lambda t: guarded_devices.append(t.device) or real_guard(t))
    x = torch.randn(2, 3, 16, 48)
    tokens = wk.wavelet_tokenize(x, 1, (1, 1), impl="triton")  # 8 x 24 stage-0 patch: 2 programs a cell
    wk.wavelet_detokenize(tokens, 1, (1, 1), image_size=(16, 48), impl="triton")
    assert grids == [(2 * 2,), (2 * 2,)]
    assert guarded_devices == [x.device, x.device]
    assert not isinstance(wavelet._device_guard(x), torch.cuda.device)


@triton_only
def test_triton_device_guard_names_the_tensor_device():
    from types import SimpleNamespace

    from waveclip_kernels.triton import wavelet

    guard = wavelet._device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@triton_only
def test_triton_refuses_levels_it_would_spill_on():
    from waveclip_kernels.triton import wavelet

    x = torch.randn(1, 3, 1 << (wavelet.MAX_LEVELS + 1), 1 << (wavelet.MAX_LEVELS + 1))
    with pytest.raises(ValueError, match="at most 6 levels"):
        wk.wavelet_tokenize(x, wavelet.MAX_LEVELS + 1, 1, impl="triton")


# ---------------------------------------------------------------- sm_90 code generation, no GPU

SM90_TOKENIZER = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
import torch
from bench.compile_sweep import H200  # a fake driver for an sm_90 target
from triton.runtime import driver
from triton.runtime.jit import JITFunction


driver.set_active(H200())
launch = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
    sys.stderr.flush()
    print("KERNEL", self.fn.__name__, kwargs["LEVELS"], kwargs["BY"], kwargs["BX"], kwargs["num_warps"], flush=True)
    return kernel


JITFunction.run = compile_only
from waveclip_kernels import triton as T

for levels, size, grid, dtypes in %s:
    for name in dtypes:
        print("CASE", levels, size, name, flush=True)
        x = torch.randn(1, 3, size, size, dtype=getattr(torch, name))
        tokens = T.wavelet_tokenize(x, levels, (grid, grid), "ycbcr", x.dtype)
        T.wavelet_detokenize(tokens, levels, (grid, grid), "ycbcr", (size, size))
"""

# (levels, image size, grid, dtypes): the default layout, 64 px cells (448 px, 7x7: a 64 x 64 tile before),
# levels 0 and 5, and L = 6, where one 64 x 64 square is one program.
SM90_CASES = [
    (3, 224, 7, ("bfloat16", "float16", "float32", "float64")),
    (3, 448, 7, ("float32", "float64")),
    (0, 64, 2, ("float32",)),
    (6, 64, 1, ("bfloat16", "float32", "float64")),
]


@pytest.mark.slow
def test_tokenizer_kernels_compile_for_sm90_without_spills(tmp_path):
    """Through ptxas for sm_90 (registers and spills from its log): the 16- and 32-bit tokenizer
    kernels spill nothing and need at most 128 registers; float64 may spill a little (printed)."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}  # a cold cache: every kernel goes through ptxas
    done = subprocess.run(
        [sys.executable, "-c", SM90_TOKENIZER % (SM90_CASES,)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200, env=env,
    )  # fmt: skip
    log = done.stdout  # the ptxas log (printed by Triton) and the KERNEL / CASE lines, in order
    assert done.returncode == 0, log[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    kernels = [line.split()[1:] for line in log.splitlines() if line.startswith("KERNEL")]
    cases = [line.split()[1:] for line in log.splitlines() if line.startswith("CASE")]
    assert len(spills) == len(registers) == len(kernels) == 2 * len(cases)
    for k, ((name, levels, by, bx, warps), regs, spill) in enumerate(zip(kernels, registers, spills)):
        _, size, dtype = cases[k // 2]
        tile = f"{int(by) << int(levels)}x{int(bx) << int(levels)}"
        print(
            f"L={levels} {size}px {dtype:8s} {name:18s} tile {tile:5s} warps {warps:2s}: {regs} regs, {spill} B spilled"
        )
        if dtype != "float64":  # no spills, and registers for at least 2 programs of 8 warps per SM
            assert spill == 0 and regs <= 128, f"{name} at L={levels} in {dtype}: {regs} registers, {spill} B spilled"


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "triton"])
def test_opcheck_with_gradients(impl):
    """torch.library's own checks of the registration, autograd included (inputs that require grad)."""
    from waveclip_kernels import _library

    x = torch.randn(1, 3, 8, 12, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(_library.wavelet_tokenize, (x, 1, [2, 3], "ycbcr", torch.float64, impl))
    tokens = [t.detach().requires_grad_() for t in wk.wavelet_tokenize(x, 1, (2, 3), impl=impl)]
    torch.library.opcheck(_library.wavelet_detokenize, (tokens, 1, [2, 3], "ycbcr", [8, 12], impl))
