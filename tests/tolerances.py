"""Error bounds of the parity tests, in one place.

Two rules, both on the largest absolute error over a whole tensor:

- `assert_close`: against a float64 oracle computed from the same inputs, the error is at most
  `atol + rtol * max|oracle|` for the output's dtype (`TOLERANCES`). Float64 differs from the oracle only
  by rounding order; float32 within ~100 ulp; half precision within 4 ulp of the output dtype.
- `assert_within_torch_error` (FlashAttention's rule for low precision): against an oracle, our error is at
  most twice PyTorch's own error on the same rounded inputs in the same dtype, plus `ulp(dtype) * scale`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    atol: float  # absolute slack
    rtol: float  # relative to the largest |value| of the oracle


def _half(dtype: torch.dtype) -> Tolerance:
    eps = 4 * torch.finfo(dtype).eps
    return Tolerance(eps, eps)


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-12, 1e-12),
    torch.float32: Tolerance(1e-5, 1e-5),
    torch.float16: _half(torch.float16),
    torch.bfloat16: _half(torch.bfloat16),
}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def scale_of(t: torch.Tensor) -> float:
    """max(1, max |t|): the magnitude that relative bounds are taken against."""
    return max(1.0, t.double().abs().max().item()) if t.numel() else 1.0


def ulp(dtype: torch.dtype) -> float:
    """One unit of rounding of `dtype` at magnitude 1 (1e-12 for float64: rounding order alone)."""
    return 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps


def bound(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error `assert_close` accepts for an output of `dtype` against `oracle`."""
    tol = TOLERANCES[dtype]
    peak = oracle.double().abs().max().item() if oracle.numel() else 0.0
    return tol.atol + tol.rtol * peak


def assert_close(out: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """`out` (of `dtype`, default its own) is within the per-dtype bound of the float64 `oracle`."""
    dtype = out.dtype if dtype is None else dtype
    assert out.dtype == dtype, f"dtype {out.dtype}, expected {dtype}"
    assert out.shape == oracle.shape, f"shape {tuple(out.shape)}, expected {tuple(oracle.shape)}"
    err, limit = max_err(out, oracle), bound(oracle, dtype)
    assert err <= limit, f"max error {err:.3g} > {limit:.3g} ({dtype})"


def torch_error_bound(torch_same: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, atol=None) -> float:
    """2 * max|torch_same - oracle| + atol (default one ulp of `dtype` times the oracle's scale)."""
    slack = ulp(dtype) * scale_of(oracle) if atol is None else atol
    return 2 * max_err(torch_same, oracle) + slack


def assert_within_torch_error(out, oracle, torch_same, dtype: torch.dtype | None = None, atol=None) -> None:
    """FlashAttention's rule: our error against `oracle` is at most twice PyTorch's same-dtype error."""
    dtype = out.dtype if dtype is None else dtype
    assert out.dtype == dtype and out.shape == oracle.shape
    err, limit = max_err(out, oracle), torch_error_bound(torch_same, oracle, dtype, atol)
    assert err <= limit, f"error {err:.3g} vs PyTorch's own {max_err(torch_same, oracle):.3g} ({dtype})"
