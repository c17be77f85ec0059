"""The tiny WaveCLIP tower gives the same exits with impl="triton" (interpreter) as with the reference."""

from __future__ import annotations

import os

import pytest
import torch

from waveclip.zeroshot import ZeroShotClassifier

# These run Triton on CPU tensors; the compiled GPU versions live in tests/test_triton_gpu.py.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_full_and_incremental_exits_match_reference(dtype, tol, tiny_tower):
    model = tiny_tower(dtype)
    x = torch.randn(3, 3, *model.config.image_size, dtype=dtype)
    with torch.no_grad():
        full = model(x, impl="triton")
        expected = model(x, impl="reference")
    assert (full - expected).abs().max().item() < tol

    # Incremental, with a sample leaving after stage 0 (cache rows routed through batch_index).
    states = {impl: model.start(x, impl=impl) for impl in ("triton", "reference")}
    for state in states.values():
        model.refine(state, active=[0, 2])
        model.refine(state)
    got, want = states["triton"], states["reference"]
    assert torch.equal(got.last_stage, want.last_stage) and torch.equal(got.cache_lens, want.cache_lens)
    torch.testing.assert_close(got.embeddings, want.embeddings, rtol=0, atol=tol, equal_nan=True)
    for row, length in enumerate(want.cache_lens.tolist()):  # slots past a row's length were never written
        torch.testing.assert_close(got.keys[:, row, :, :length], want.keys[:, row, :, :length], rtol=0, atol=tol)
        torch.testing.assert_close(got.values[:, row, :, :length], want.values[:, row, :, :length], rtol=0, atol=tol)
    assert (got.embeddings[[0, 2], -1] - expected[[0, 2], -1]).abs().max().item() < 10 * tol


@pytest.mark.slow
def test_zero_shot_predictions_match_reference(tiny_tower):
    model = tiny_tower(torch.float32)
    classes = torch.randn(5, model.config.embed_dim)
    classifier = ZeroShotClassifier(model, classes, logit_scale=30.0, thresholds=(0.6, 0.9))
    x = torch.randn(6, 3, *model.config.image_size)
    got = classifier.predict(x, impl="triton")
    want = classifier.predict(x, impl="reference")
    assert {p.exit_stage for p in want} == {0, 1, 2}  # the batch really splits across the stages
    assert [(p.label, p.exit_stage) for p in got] == [(p.label, p.exit_stage) for p in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.probs, w.probs, rtol=1e-4, atol=1e-5)
