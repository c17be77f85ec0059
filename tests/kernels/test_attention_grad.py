"""Gradients of `block_causal_attention`: the fused Triton backward (under the interpreter on the CPU)
and the composed CPU backward, against autograd through the readable reference and SDPA.

Shapes are tiny: the interpreter costs ~0.5 ms per program plus a few ms per dot step.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import non_contiguous
from tolerances import assert_within_torch_error, max_err

import waveclip_kernels as wk
from waveclip_kernels import _library
from waveclip_kernels import reference as ref
from waveclip_kernels import triton as tri

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)

# (B, H, N, D, block sizes): blocks of size 1, N not a multiple of any tile (16/32), head dims
# 16/40/64/80 (40 and 80 padded), batch 1 and 2.
GRAD_CASES = [
    (1, 1, 7, 16, [1, 1, 5]),
    (2, 1, 19, 40, [3, 16]),
    (1, 2, 35, 64, [17, 1, 17]),
    (1, 1, 21, 80, [5, 1, 15]),
]
CASE_IDS = [f"B{b}H{h}N{n}D{d}" for b, h, n, d, _ in GRAD_CASES]


def inputs(B, H, N, D, dtype=torch.float64, requires_grad=True):
    """q, k, v with their last two axes transposed in memory (non-contiguous)."""
    out = [non_contiguous(torch.randn(B, H, N, D, dtype=torch.float64).to(dtype)) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in out]


def reference_grads(q, k, v, blocks, grad, scale=None):
    """Autograd through the reference on float64 copies of the inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = ref.block_causal_attention(*leaves, blocks, scale)
    return torch.autograd.grad(out, leaves, grad.double())


# ------------------------------------------------------------------------------- Triton backward


@interpreter
@pytest.mark.parametrize("B,H,N,D,blocks", GRAD_CASES, ids=CASE_IDS)
def test_triton_gradcheck_fp64(B, H, N, D, blocks):
    q, k, v = inputs(B, H, N, D)
    assert torch.autograd.gradcheck(
        lambda a, b, c: wk.block_causal_attention(a, b, c, blocks, impl="triton"), (q, k, v), fast_mode=True
    )


@interpreter
@pytest.mark.parametrize("B,H,N,D,blocks", GRAD_CASES, ids=CASE_IDS)
def test_triton_backward_matches_reference_fp64(B, H, N, D, blocks):
    q, k, v = inputs(B, H, N, D, requires_grad=False)
    grad = non_contiguous(torch.randn(B, H, N, D, dtype=torch.float64))
    out, lse = tri.block_causal_attention_forward(q, k, v, blocks, 0.3)
    got = tri.block_causal_attention_backward(grad, q, k, v, out, lse, blocks, 0.3)
    for g, e in zip(got, reference_grads(q, k, v, blocks, grad, 0.3)):
        assert g.is_contiguous() and g.dtype == torch.float64
        assert max_err(g, e) <= 1e-12 * max(1.0, e.abs().max().item())


@interpreter
def test_triton_forward_lse_is_the_masked_logsumexp():
    blocks = [4, 1, 12]
    q, k, v = inputs(2, 2, 17, 16, requires_grad=False)
    _, lse = tri.block_causal_attention_forward(q, k, v, blocks, 0.3)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    expected = scores.masked_fill(~ref.block_causal_mask(blocks), float("-inf")).logsumexp(-1)
    assert lse.shape == (2, 2, 17) and lse.dtype == torch.float64 and lse.is_contiguous()
    assert max_err(lse, expected) < 1e-12
    _, lse32 = tri.block_causal_attention_forward(q.float(), k.float(), v.float(), blocks, 0.3)
    assert lse32.dtype == torch.float32 and max_err(lse32, expected) < 1e-5


@interpreter
def test_triton_backward_later_blocks_do_not_leak_into_earlier_queries():
    """dq of block 0 depends on block 0 alone: a NaN/inf in a later block's keys or values leaves it
    bit-identical (and finite)."""
    blocks = [4, 6]
    q, k, v = (torch.randn(1, 1, 10, 16, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(1, 1, 10, 16, dtype=torch.float64)
    out, lse = tri.block_causal_attention_forward(q, k, v, blocks, 0.25)
    before = tri.block_causal_attention_backward(grad, q, k, v, out, lse, blocks, 0.25)[0]
    v[0, 0, 8, 0] = float("nan")
    k[0, 0, 9, 3] = float("inf")
    out, lse = tri.block_causal_attention_forward(q, k, v, blocks, 0.25)
    after = tri.block_causal_attention_backward(grad, q, k, v, out, lse, blocks, 0.25)[0]
    assert torch.equal(after[:, :, :4], before[:, :, :4])


def _sdpa_grads(q, k, v, blocks, grad):
    """PyTorch's own gradients in the inputs' dtype: SDPA with the boolean block-causal mask."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=ref.block_causal_mask(blocks))
    return torch.autograd.grad(out, leaves, grad)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_gradients_within_twice_torch_error(dtype):
    """Error against an fp32 reference (same rounded inputs) at most 2x SDPA's own in that dtype."""
    blocks = [20, 1, 29]
    q, k, v = inputs(2, 2, 50, 64, dtype=dtype, requires_grad=False)
    grad = torch.randn(2, 2, 50, 64).to(dtype)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref32 = torch.autograd.grad(ref.block_causal_attention(*leaves, blocks), leaves, grad.float())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ours = torch.autograd.grad(wk.block_causal_attention(*leaves, blocks, impl="triton"), leaves, grad)
    theirs = _sdpa_grads(q, k, v, blocks, grad)
    for o, t, r in zip(ours, theirs, ref32):
        assert_within_torch_error(o, r, t, dtype, atol=1e-5)


@interpreter
def test_triton_saves_only_inputs_output_and_lse():
    """The autograd node keeps q, k, v, the output and the (B, H, N) log-sum-exp: nothing N x N."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wk.block_causal_attention(q, k, v, [5, 12], impl="triton")
    assert sorted(saved) == sorted([(1, 2, 17, 16)] * 4 + [(1, 2, 17)])


@interpreter
def test_triton_refuses_double_backward():
    q, k, v = inputs(1, 1, 9, 16)
    out = wk.block_causal_attention(q, k, v, [4, 5], impl="triton")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    # without create_graph the same graph gives plain gradients
    out = wk.block_causal_attention(q, k, v, [4, 5], impl="triton")
    assert all(g.grad_fn is None for g in torch.autograd.grad(out.square().sum(), (q, k, v)))


@interpreter
def test_triton_empty_batch_backward():
    q, k, v = (torch.randn(0, 2, 9, 16, requires_grad=True) for _ in range(3))
    out = wk.block_causal_attention(q, k, v, [4, 5], impl="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == (0, 2, 9, 16) for g in grads)


@interpreter
def test_tiny_tower_parameter_gradients_triton_equal_reference(tiny_tower):
    model = tiny_tower(torch.float64)
    images = torch.randn(2, 3, *model.config.image_size, dtype=torch.float64)
    tokens = model.tokenize(images, impl="reference")
    grads = {}
    for impl in ("triton", "reference"):
        model.zero_grad()
        exits = model.forward_tokens(tokens, impl=impl)
        (exits * torch.linspace(-1, 1, exits.shape[-1], dtype=torch.float64)).sum().backward()
        grads[impl] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["reference"].keys() and len(grads["triton"]) > 10
    for name, g in grads["triton"].items():
        torch.testing.assert_close(g, grads["reference"][name], rtol=1e-9, atol=1e-11, msg=name)


@interpreter
@pytest.mark.slow
def test_triton_forward_and_backward_under_torch_compile():
    def loss(q, k, v):
        return wk.block_causal_attention(q, k, v, [3, 6], impl="triton").square().sum()

    q, k, v = inputs(1, 2, 9, 16)
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------ CPU composition


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,N,D,blocks", GRAD_CASES, ids=CASE_IDS)
def test_composed_backward_matches_reference(B, H, N, D, blocks, dtype):
    """Per-block CPU flash backward on prefix views, non-contiguous inputs and gradient."""
    q, k, v = inputs(B, H, N, D, dtype=dtype, requires_grad=False)
    grad = non_contiguous(torch.randn(B, H, N, D).to(dtype))
    got = _library.composed_attention_backward(grad, q, k, v, blocks, 0.3)
    expected = reference_grads(q, k, v, blocks, grad, 0.3)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 30 * torch.finfo(dtype).eps)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == (B, H, N, D)
        assert max_err(g, e) <= tol * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_cpu_impls_gradcheck_and_gradgradcheck(impl):
    """The CPU autograd formula (first order: the composed backward; create_graph: differentiable
    through the reference) passes fp64 gradcheck and gradgradcheck."""
    q, k, v = inputs(1, 1, 6, 8)

    def f(a, b, c):
        return wk.block_causal_attention(a, b, c, [2, 1, 3], impl=impl)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (q, k, v), fast_mode=True)


def test_cpu_backward_runs_the_composition(monkeypatch):
    """The reference impl's backward goes through `composed_attention_backward`, not the dense path."""
    calls = []
    composed = _library.composed_attention_backward
    monkeypatch.setattr(_library, "composed_attention_backward", lambda *a: calls.append(1) or composed(*a))
    q, k, v = inputs(1, 1, 9, 16)
    torch.autograd.grad(wk.block_causal_attention(q, k, v, [4, 5], impl="reference").sum(), (q, k, v))
    assert calls == [1]


# ------------------------------------------------------------------------------------- benchmark


def test_live_bytes_sees_the_peak_of_a_step():
    from bench.bench_training import peak_bytes

    def step():
        a = torch.empty(2**18)  # 1 MiB
        b = torch.empty(2**17)  # 0.5 MiB while a is alive
        del a, b
        torch.empty(2**16)  # 0.25 MiB after both died

    assert 1.5 * 2**20 <= peak_bytes(step, torch.device("cpu")) < 1.75 * 2**20


@pytest.mark.slow
def test_bench_training_quick_run(tmp_path):
    from bench import bench_training

    rows = bench_training.run(tmp_path, "cpu", quick=True)
    ran = {(r["kind"], r["provider"]) for r in rows if r["status"] == "ok"}
    for kind in ("attention", "tower"):
        assert {(kind, "waveclip:reference"), (kind, "sdpa_mask"), (kind, "sdpa_per_stage")} <= ran
    assert all(r["peak_mb"] > 0 for r in rows if r["status"] == "ok")
    assert (tmp_path / "training.csv").exists() and (tmp_path / "training.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=interpreter), "reference"])
def test_opcheck_backward_op(impl):
    q, k, v, grad = (torch.randn(1, 1, 7, 16) for _ in range(4))
    out, lse = _library.block_causal_attention(q, k, v, [3, 4], 0.35, impl)
    torch.library.opcheck(_library.block_causal_attention_backward, (grad, q, k, v, out, lse, [3, 4], 0.35, impl))
