"""The reference tokenizer against PyWavelets, in float64 (docs/design.md section 1)."""

import numpy as np
import pytest
import torch
from helpers import pywt_tokens

import waveclip_kernels as wk
from waveclip_kernels.common import YCBCR_FROM_RGB

CASES = [  # (levels, grid, (H, W))
    (0, (1, 1), (3, 5)),
    (0, (2, 3), (6, 9)),
    (1, (1, 1), (2, 2)),
    (1, (3, 5), (6, 20)),
    (2, (7, 7), (56, 56)),
    (2, (2, 3), (24, 36)),
    (3, (7, 7), (224, 224)),
    (3, (2, 4), (48, 32)),
    (4, (1, 2), (32, 64)),
    (4, (3, 3), (96, 144)),
]


@pytest.mark.parametrize("levels,grid,size", CASES)
@pytest.mark.parametrize("color", ["ycbcr", "rgb"])
def test_tokenize_matches_pywt(levels, grid, size, color):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, levels, grid, color=color, impl="reference")
    expected = pywt_tokens(x.numpy(), levels, grid, color)
    assert len(tokens) == levels + 1
    for t, e in zip(tokens, expected):
        assert t.shape == e.shape and t.dtype == torch.float64
        np.testing.assert_allclose(t.numpy(), e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("levels,grid,size", CASES)
@pytest.mark.parametrize("color", ["ycbcr", "rgb"])
def test_roundtrip_and_energy(levels, grid, size, color):
    x = torch.randn(3, 3, *size, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, levels, grid, color=color, impl="reference")
    back = wk.wavelet_detokenize(tokens, levels, grid, color=color, image_size=size, impl="reference")
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    if color == "rgb":  # the Haar transform is orthonormal; the colour matrix is not
        energy = sum((t**2).sum() for t in tokens)
        torch.testing.assert_close(energy, (x**2).sum(), rtol=1e-12, atol=0)


def test_design_example_shapes():
    tokens = wk.wavelet_tokenize(torch.randn(1, 3, 224, 224), 3, 7, impl="reference")
    assert [tuple(t.shape) for t in tokens] == [(1, 49, 48), (1, 49, 144), (1, 49, 576), (1, 49, 2304)]


def test_haar_on_one_block():
    """docs/design.md's formulas on a single 2x2 block a=1 b=2 c=3 d=4, rgb, one level."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).expand(1, 3, 2, 2)
    a, d = wk.wavelet_tokenize(x, 1, 1, color="rgb", impl="reference")
    assert a[0, 0].tolist() == [5.0, 5.0, 5.0]
    assert d[0, 0].tolist() == [-2.0, -1.0, 0.0] * 3  # channel-major (H, V, D) per channel


def test_levels_zero_is_the_colour_mixed_image_on_the_grid():
    """levels=0: one stage, the colour transform and the patch layout alone."""
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    (tokens,) = wk.wavelet_tokenize(x, 0, (2, 3), impl="reference")
    y = torch.einsum("oc,bchw->bohw", torch.tensor(YCBCR_FROM_RGB, dtype=torch.float64), x)
    # grid cell (1, 2) covers rows 2-3, columns 4-5; features are (channel, py, px)
    torch.testing.assert_close(tokens[:, 5], y[:, :, 2:4, 4:6].reshape(2, 12), rtol=0, atol=1e-15)


def test_detokenize_int_image_size_means_square():
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, 2, 4, impl="reference")
    torch.testing.assert_close(wk.wavelet_detokenize(tokens, 2, 4, image_size=32, impl="reference"), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_and_out_dtype(dtype):
    x = torch.randn(2, 3, 32, 48)
    ref = wk.wavelet_tokenize(x.double(), 2, (2, 3), impl="reference")
    tokens = wk.wavelet_tokenize(x.to(dtype), 2, (2, 3), impl="reference", out_dtype=torch.float32)
    eps = torch.finfo(dtype).eps
    for t, r in zip(tokens, ref):
        assert t.dtype == torch.float32
        assert (t.double() - r).abs().max() <= 8 * eps * r.abs().max()


def test_non_contiguous_and_empty_batch():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    nc = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not nc.is_contiguous()
    for a, b in zip(wk.wavelet_tokenize(nc, 2, 2, impl="reference"), wk.wavelet_tokenize(x, 2, 2, impl="reference")):
        assert torch.equal(a, b)
    empty = wk.wavelet_tokenize(torch.randn(0, 3, 32, 32), 2, 2, impl="reference")
    assert [tuple(t.shape) for t in empty] == [(0, 4, 48), (0, 4, 144), (0, 4, 576)]


def test_nan_propagates_locally():
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    tokens = wk.wavelet_tokenize(x, 2, 2, color="rgb", impl="reference")
    assert all(t.isnan().any() for t in tokens)
    assert not tokens[0][0, 3].isnan().any()  # a grid cell away from the NaN stays finite
