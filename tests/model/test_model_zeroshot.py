"""Zero-shot classification with the margin gate, class text embeddings, and the GFLOPs per exit."""

from __future__ import annotations

import pytest
import torch

from waveclip import WaveCLIP, WaveCLIPConfig, ZeroShotClassifier, class_text_embeddings
from waveclip.flops import exit_gflops

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")
NAMES = ["cat", "dog", "rocket", "cup of coffee", "astronaut"]


def SimpleTokenizer():
    """open_clip's BPE tokenizer; imported here so that the module collects where open_clip is absent."""
    return pytest.importorskip("open_clip.tokenizer").SimpleTokenizer()


def classifier(tiny_tower, thresholds, dtype=torch.float64, classes=5):
    model = tiny_tower(dtype)
    text = torch.randn(classes, TINY.embed_dim, dtype=dtype)
    return ZeroShotClassifier(model, text, NAMES[:classes], logit_scale=30.0, thresholds=thresholds)


def test_thresholds_zero_exit_everyone_at_stage_zero(tiny_tower):
    clf = classifier(tiny_tower, (0.0, 0.0))
    preds = clf.predict(torch.randn(6, 3, 32, 32, dtype=torch.float64))
    assert [p.exit_stage for p in preds] == [0] * 6
    assert all(p.gflops == clf.exit_gflops[0] for p in preds)


def test_thresholds_above_one_send_everyone_to_the_last_stage(tiny_tower):
    clf = classifier(tiny_tower, (1.01, 2.0))
    preds = clf.predict(torch.randn(6, 3, 32, 32, dtype=torch.float64))
    assert [p.exit_stage for p in preds] == [TINY.levels] * 6
    assert all(p.gflops == clf.exit_gflops[-1] for p in preds)


def test_gate_matches_the_full_pass_sample_by_sample(tiny_tower):
    """Each answer is the first stage whose margin clears its threshold, with that stage's probabilities."""
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    clf = classifier(tiny_tower, (0.0, 0.0))
    with torch.no_grad():
        probs = clf.probabilities(clf.model(x))  # (B, S, C)
    margins = clf.margin(probs)  # (B, S)
    thresholds = tuple(margins[:, :-1].median(dim=0).values.tolist())  # about half leave at every stage
    clf.thresholds = thresholds
    preds = clf.predict(x)
    for b, p in enumerate(preds):
        passed = [s for s in range(TINY.levels) if margins[b, s] >= thresholds[s]]
        stage = passed[0] if passed else TINY.levels
        assert p.exit_stage == stage
        torch.testing.assert_close(p.probs, probs[b, stage], rtol=0, atol=1e-12)
        assert p.label == int(probs[b, stage].argmax()) and p.name == NAMES[p.label]
        assert p.gflops == clf.exit_gflops[stage]
    assert len({p.exit_stage for p in preds}) == TINY.num_stages  # every stage answered someone


def test_margin_is_top1_minus_top2():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    torch.testing.assert_close(ZeroShotClassifier.margin(probs), torch.tensor([0.3, 0.25]))
    assert ZeroShotClassifier.margin(torch.ones(2, 1)).tolist() == [1.0, 1.0]


def test_single_class_always_answers_at_stage_zero(tiny_tower):
    preds = classifier(tiny_tower, (0.5, 0.5), classes=1).predict(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert [(p.label, p.exit_stage) for p in preds] == [(0, 0), (0, 0)]


def test_empty_class_list_raises(tiny_tower, tiny_teacher):
    model = tiny_tower()
    with pytest.raises(ValueError, match="class list is empty"):
        ZeroShotClassifier(model, torch.empty(0, TINY.embed_dim))
    with pytest.raises(ValueError, match="class list is empty"):
        ZeroShotClassifier.from_teacher(model, tiny_teacher(torch.float32), SimpleTokenizer(), [])


def test_classifier_rejects_mismatched_inputs(tiny_tower):
    model = tiny_tower()
    with pytest.raises(ValueError, match="features"):
        ZeroShotClassifier(model, torch.randn(3, 8))
    with pytest.raises(ValueError, match="2 class names for 3"):
        ZeroShotClassifier(model, torch.randn(3, TINY.embed_dim), ["a", "b"])
    with pytest.raises(ValueError, match="thresholds"):
        ZeroShotClassifier(model, torch.randn(3, TINY.embed_dim), thresholds=(0.5,))
    with pytest.raises(ValueError, match="thresholds must not be NaN"):
        ZeroShotClassifier(model, torch.randn(3, TINY.embed_dim), thresholds=(0.5, float("nan")))
    with pytest.raises(ValueError, match="takes 32x32, 16x16, 8x8"):
        ZeroShotClassifier(model, torch.randn(3, TINY.embed_dim)).predict(torch.randn(1, 3, 48, 48))


def test_class_text_embeddings_from_the_teacher(tiny_teacher):
    teacher = tiny_teacher(torch.float32)
    tokenizer = SimpleTokenizer()
    names, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a drawing of a {}."]
    text = class_text_embeddings(teacher, tokenizer, names, templates)
    assert text.shape == (3, TINY.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        one = teacher.encode_text(tokenizer(["a photo of a dog.", "a drawing of a dog."]))
    want = torch.nn.functional.normalize(torch.nn.functional.normalize(one, dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(text[1], want)
    student = WaveCLIP.from_open_clip(teacher, TINY)
    clf = ZeroShotClassifier.from_teacher(student, teacher, tokenizer, names, templates)
    assert clf.logit_scale == pytest.approx(teacher.logit_scale.exp().item())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        z = student(x)
    for b, p in enumerate(clf.predict(x)):  # the answer comes from the teacher's class embeddings
        probs = torch.softmax(clf.logit_scale * z[b, p.exit_stage] @ text.T, dim=-1)
        torch.testing.assert_close(p.probs, probs, rtol=1e-4, atol=1e-6)
        assert p.name == names[int(probs.argmax())]
    with pytest.raises(ValueError, match="templates"):
        class_text_embeddings(teacher, tokenizer, names, ["no placeholder"])


def test_gflops_are_the_cumulative_exit_costs(tiny_tower):
    clf = classifier(tiny_tower, (0.0, 0.0))
    assert clf.exit_gflops == exit_gflops(TINY)
    assert all(a < b for a, b in zip(clf.exit_gflops, clf.exit_gflops[1:]))
