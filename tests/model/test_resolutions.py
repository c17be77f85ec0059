"""One tower, several input sizes: an image of image_size / 2**k runs the first L+1-k stages.

For y the 2 x 2 box average of x, orthonormal Haar gives A_1(x) = 2 y, so every later level of x is the
transform of 2 y: tokens(y, L-1)[s] = tokens(x, L)[s] / 2 for s < L, and by induction
tokens(y, L-k)[s] = tokens(x, L)[s] / 2**k. The tower multiplies a small image's tokens by 2**k, so its
exits are those of any full-size image it is the box average of. Also: progressive input (stage tokens
arriving one stage at a time), larger images, the gate and the FLOP count at every size.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from waveclip import WaveCLIPConfig, ZeroShotClassifier
from waveclip.flops import exit_gflops, fvcore_exit_gflops

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")  # 32 px, L = 2
L = TINY.levels
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def box_average(x, k):
    return F.avg_pool2d(x, 2**k) if k else x


def same_box_average(x, k):
    """Another full-size image with the same 2**k x 2**k box averages: x plus detail of zero block mean."""
    detail = torch.randn_like(x)
    detail = detail - F.interpolate(box_average(detail, k), scale_factor=2**k, mode="nearest")
    assert box_average(detail, k).abs().max() < 1e-6 and detail.abs().max() > 0.5
    return x + detail


@pytest.mark.parametrize("k", range(1, L + 1))
def test_haar_coefficients_of_the_box_average_are_scaled_by_2_to_the_k(k):
    """The relation the tower relies on, checked with PyWavelets (an independent DWT)."""
    pywt = pytest.importorskip("pywt")
    x = torch.randn(64, 64, dtype=torch.float64)
    y = box_average(x[None, None], k)[0, 0]
    big, small = pywt.wavedec2(x.numpy(), "haar", level=L + 1), pywt.wavedec2(y.numpy(), "haar", level=L + 1 - k)
    torch.testing.assert_close(torch.tensor(small[0]) * 2**k, torch.tensor(big[0]), rtol=0, atol=1e-12)
    for s in range(1, L + 2 - k):
        for a, b in zip(small[s], big[s]):
            torch.testing.assert_close(torch.tensor(a) * 2**k, torch.tensor(b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", range(1, L + 1))
def test_small_image_tokens_are_the_leading_stages_of_the_full_image(k, dtype, tiny_tower):
    model = tiny_tower(dtype)
    x = torch.randn(2, 3, *TINY.image_size, dtype=dtype)
    small, full = model.tokenize(box_average(x, k)), model.tokenize(x)
    assert len(small) == model.num_stages_for(small_size(k)) == L + 1 - k
    for a, b in zip(small, full):
        assert (a - b).abs().max() <= TOL[dtype] * b.abs().max()


def small_size(k):
    return (TINY.image_size[0] >> k, TINY.image_size[1] >> k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", range(1, L + 1))
def test_small_image_exits_equal_those_of_any_full_image_it_averages(k, dtype, tiny_tower):
    model = tiny_tower(dtype)
    x = torch.randn(3, 3, *TINY.image_size, dtype=dtype)
    y = box_average(x, k)
    n = L + 1 - k
    with torch.no_grad():
        small = model(y)
        fulls = [model(x), model(same_box_average(x, k))]
    assert small.shape == (3, n, TINY.embed_dim)
    for full in fulls:
        torch.testing.assert_close(small, full[:, :n], rtol=0, atol=TOL[dtype])
    assert (fulls[0][:, n:] - fulls[1][:, n:]).abs().max() > 1e-3  # the finer stages do see the detail
    state = model.start(y)
    assert state.num_stages == n and state.embeddings.shape == (3, n, TINY.embed_dim)
    for _ in range(n - 1):
        model.refine(state)
    assert state.done
    with pytest.raises(ValueError, match="every stage has run"):
        model.refine(state)
    torch.testing.assert_close(state.embeddings, fulls[0][:, :n], rtol=0, atol=TOL[dtype])
    assert state.cache_lens.tolist() == [sum(TINY.block_sizes[:n])] * 3


def test_larger_image_is_answered_as_its_box_average(tiny_tower):
    model = tiny_tower(torch.float64)
    big = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        got, want = model(big), model(box_average(big, 2))
    assert got.shape == (2, TINY.num_stages, TINY.embed_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_progressive_tokens_give_the_answers_of_the_image(tiny_tower):
    """start(tokens=[stage 0]), then each refine brings the next stage's tokens (for everyone, or for
    the samples that go on only): the exits equal those from the image."""
    model = tiny_tower(torch.float64)
    x = torch.randn(4, 3, *TINY.image_size, dtype=torch.float64)
    tokens = model.tokenize(x)
    from_image = model.start(x)
    model.refine(from_image, active=[0, 1, 3])
    model.refine(from_image, active=[1, 3])
    state = model.start(tokens=tokens[:1])
    assert state.num_stages == TINY.num_stages
    torch.testing.assert_close(state.latest(), from_image.embeddings[:, 0], rtol=0, atol=1e-12)
    model.refine(state, active=[0, 1, 3], tokens=tokens[1])  # the whole batch's stage-1 tokens
    model.refine(state, active=[1, 3], tokens=tokens[2][[1, 3]])  # only the rows that go on
    assert torch.equal(state.last_stage, from_image.last_stage)
    torch.testing.assert_close(state.embeddings, from_image.embeddings, rtol=0, atol=1e-12, equal_nan=True)


def test_progressive_tokens_are_checked_before_anything_runs(tiny_tower):
    model = tiny_tower()
    tokens = model.tokenize(torch.randn(2, 3, *TINY.image_size))
    state = model.start(tokens=tokens[:1])
    lens = state.cache_lens.clone()
    with pytest.raises(ValueError, match="stage 1's tokens are not known yet"):
        model.refine(state)
    with pytest.raises(ValueError, match=r"tokens\[1\] must be a float tensor of shape \(2, 4, 144\)"):
        model.refine(state, tokens=tokens[2])
    assert state.stage == 0 and torch.equal(state.cache_lens, lens) and len(state.tokens) == 1
    with pytest.raises(ValueError, match="known already"):
        model.refine(model.start(tokens=tokens[:2]), tokens=tokens[1])
    with pytest.raises(ValueError, match="exactly one of them"):
        model.start()
    with pytest.raises(ValueError, match="expected 1 to 3 stage token tensors"):
        model.start(tokens=[])


@pytest.mark.parametrize("k", range(L + 1))
def test_zero_shot_predicts_at_every_size(k, tiny_tower):
    model = tiny_tower(torch.float64)
    classes = torch.randn(4, TINY.embed_dim, dtype=torch.float64)
    clf = ZeroShotClassifier(model, classes, logit_scale=30.0, thresholds=(2.0,) * L)  # nobody exits early
    y = box_average(torch.randn(3, 3, *TINY.image_size, dtype=torch.float64), k)
    preds = clf.predict(y)
    last = L - k
    with torch.no_grad():
        probs = clf.probabilities(model(y)[:, last])
    gflops = exit_gflops(TINY, small_size(k))
    for p, want in zip(preds, probs):
        assert p.exit_stage == last and p.gflops == gflops[last] and p.label == int(want.argmax())
        torch.testing.assert_close(p.probs, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", range(L + 1))
def test_exit_gflops_at_every_size_match_fvcore(k, tiny_tower):
    model = tiny_tower()
    size = small_size(k)
    gflops = exit_gflops(TINY, size)
    assert len(gflops) == L + 1 - k
    full = exit_gflops(TINY)
    # Past stage 0 a stage costs the same at every size; stage 0 differs by the tokenizer alone.
    steps = [b - a for a, b in itertools.pairwise(gflops)]
    assert steps == pytest.approx([b - a for a, b in itertools.pairwise(full[: len(gflops)])], rel=1e-12)
    assert gflops[0] < full[0] or k == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counted = fvcore_exit_gflops(model, torch.randn(2, 3, *size))
    assert counted == pytest.approx(gflops, rel=1e-9)
    assert exit_gflops(TINY, (64, 64))[1:] == pytest.approx([g + 3 * 64 * 64 / 1e9 for g in full[1:]], rel=1e-12)


def test_a_levels_zero_tower_is_one_stage_without_a_gate(tiny_tower):
    """levels=0: one stage (the colour-mixed image on the grid), nothing to refine, the only exit answers."""
    model = tiny_tower(torch.float64, image_size=8, levels=0, thresholds=())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        full = model(x)
    state = model.start(x)
    assert full.shape == (3, 1, TINY.embed_dim) and state.done
    torch.testing.assert_close(state.latest(), full[:, 0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="every stage has run"):
        model.refine(state)
    preds = ZeroShotClassifier(model, torch.randn(4, TINY.embed_dim, dtype=torch.float64)).predict(x)
    assert [p.exit_stage for p in preds] == [0, 0, 0]
