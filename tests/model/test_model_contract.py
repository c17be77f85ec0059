"""The tower, cache and gate: documented defaults, dtypes, impl pass-through and exact error messages."""

from __future__ import annotations

import os

import pytest
import torch

from waveclip import InferenceState, WaveCLIP, WaveCLIPConfig, ZeroShotClassifier

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")


def test_constructor_defaults_to_auto():
    assert WaveCLIP(TINY).impl == "auto"


def test_fresh_parameters_have_clip_scale():
    """class, position and level embeddings and proj start as N(0, width^-1), as CLIP initialises them."""
    model = WaveCLIP(WaveCLIPConfig.from_preset("waveclip-tiny", width=256, heads=4))
    for name in ("class_embedding", "positional_embedding", "level_embedding", "proj"):
        std = getattr(model, name).detach().std().item()
        assert 0.8 * 256**-0.5 < std < 1.25 * 256**-0.5, (name, std)
    assert all(p.bias is None for p in model.stage_proj)


def test_a_float64_tower_takes_float32_images(tiny_tower):
    model = tiny_tower(torch.float64)
    x = torch.randn(2, 3, 32, 32)
    assert all(t.dtype == torch.float64 for t in model.tokenize(x))
    with torch.no_grad():
        assert model(x).dtype == torch.float64
    assert model.start(x).embeddings.dtype == torch.float64


def test_impl_override_reaches_every_op(tiny_tower, ran):
    """An impl given to forward/start wins over the tower's own, in tokenize, attention and KV append."""
    model = tiny_tower(torch.float64)
    model.impl = "triton"  # would launch Triton kernels if the override were lost
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model(x, impl="reference")
    state = model.start(x, impl="reference")
    model.refine(state)
    assert ran.backends() == {"reference"}
    assert {"wavelet_tokenize", "block_causal_attention", "attention_with_kv_append"} <= set(ran.reference)


def test_tokenize_override_is_used(tiny_tower):
    with pytest.raises(RuntimeError, match='impl="cuda" cannot run'):
        tiny_tower().tokenize(torch.randn(1, 3, 32, 32), impl="cuda")


def test_tower_input_messages(tiny_tower):
    model = tiny_tower()
    with pytest.raises(ValueError, match=r"got <class 'list'>$"):
        model.tokenize([1, 2])
    with pytest.raises(ValueError, match=r"got torch\.Size\(\[3, 32, 32\]\)$"):
        model.tokenize(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"^an image of 30x32 pixels does not fit this tower"):
        model.tokenize(torch.randn(1, 3, 30, 32))
    tokens = model.tokenize(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"^tokens\[1\] must be a float tensor of shape \(2, 4, 144\)"):
        model.forward_tokens([tokens[0], tokens[1][:1], tokens[2]])


def test_from_open_clip_passes_impl(tiny_teacher):
    assert WaveCLIP.from_open_clip(tiny_teacher(), TINY, impl="reference").impl == "reference"


# ----------------------------------------------------------------------------------------- cache


def test_allocated_state_has_run_nothing():
    tokens = [torch.randn(3, 4, d) for d in TINY.stage_dims()]
    state = InferenceState.allocate(
        tokens, num_stages=3, layers=2, heads=2, seq_len=15, head_dim=16, embed_dim=16, impl="reference"
    )
    assert state.stage == -1 and not state.done
    assert state.last_stage.tolist() == [-1, -1, -1] and state.last_stage.dtype == torch.int64
    assert state.cache_lens.tolist() == [0, 0, 0] and state.active.tolist() == [0, 1, 2]
    assert state.keys.shape == (2, 3, 2, 15, 16) and state.embeddings.isnan().all()


@pytest.mark.parametrize("active", [[0.0], [[0]], torch.tensor([[0, 1]])], ids=["floats", "nested", "2-d"])
def test_select_rejects_indices_that_are_not_1d_ints(tiny_tower, active):
    state = tiny_tower().start(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match=r"^active must be a boolean mask or a 1-D sequence of batch indices"):
        state.select(active)


def test_select_returns_int64_rows(tiny_tower):
    state = tiny_tower().start(torch.randn(3, 3, 32, 32))
    rows = state.select(torch.tensor([2, 0], dtype=torch.int32))
    assert rows.dtype == torch.int64 and rows.tolist() == [0, 2]


# ------------------------------------------------------------------------------------------ gate


def test_classifier_defaults_and_dtype(tiny_tower):
    model = tiny_tower(torch.float64)
    text = torch.randn(3, TINY.embed_dim)  # float32 embeddings for a float64 tower
    clf = ZeroShotClassifier(model, text)
    assert clf.logit_scale == 100.0 and clf.thresholds == TINY.thresholds
    assert clf.class_embeddings.dtype == torch.float64
    torch.testing.assert_close(clf.class_embeddings.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert len(clf.predict(torch.randn(2, 3, 32, 32, dtype=torch.float64))) == 2


def test_classifier_input_messages(tiny_tower):
    model = tiny_tower()
    with pytest.raises(ValueError, match=r"^class_embeddings must be a \(C, embed_dim\) tensor, got None$"):
        ZeroShotClassifier(model, [[0.0] * 16])
    with pytest.raises(
        ValueError, match=r"^class_embeddings must be a \(C, embed_dim\) tensor, got torch\.Size\(\[16\]\)$"
    ):
        ZeroShotClassifier(model, torch.randn(16))
    with pytest.raises(
        ValueError, match=r"^zero-shot classification needs at least one class; the class list is empty$"
    ):
        ZeroShotClassifier(model, torch.empty(0, 16))


class TextOnly:
    """A teacher with a text tower and no logit_scale."""

    def __init__(self, teacher):
        self.encode_text = teacher.encode_text


def test_from_teacher_scale_thresholds_and_messages(tiny_tower, tiny_teacher):
    from open_clip.tokenizer import SimpleTokenizer

    model, teacher, tokenizer = tiny_tower(), tiny_teacher(torch.float32), SimpleTokenizer()
    clf = ZeroShotClassifier.from_teacher(model, TextOnly(teacher), tokenizer, ["cat", "dog"], thresholds=(0.1, 0.2))
    assert clf.logit_scale == 100.0 and clf.thresholds == (0.1, 0.2)
    with pytest.raises(
        ValueError, match=r"^zero-shot classification needs at least one class name; the class list is empty$"
    ):
        ZeroShotClassifier.from_teacher(model, teacher, tokenizer, [])


def test_margin_over_any_leading_shape():
    assert ZeroShotClassifier.margin(torch.ones(2, 3, 1)).tolist() == [[1.0] * 3] * 2
    torch.testing.assert_close(ZeroShotClassifier.margin(torch.tensor([[0.7, 0.3]])), torch.tensor([0.4]))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_forward_impl_reaches_the_attention(tiny_tower, ran):
    """forward(impl="triton") runs the Triton attention, not the reference (which "auto" would pick here)."""
    with torch.no_grad():
        tiny_tower(torch.float64)(torch.randn(1, 3, 32, 32, dtype=torch.float64), impl="triton")
    assert ran.triton and "block_causal_attention" not in ran.reference
