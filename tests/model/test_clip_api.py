"""The open_clip-style API: create_model_and_transforms, get_tokenizer, a CLIP-like model, and a client
nobody here wrote (LAION's CLIP_benchmark) running on it unchanged."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import waveclip  # noqa: E402
from waveclip import TINY_TEACHER, WaveCLIP, WaveCLIPModel, ZeroShotClassifier, load_teacher  # noqa: E402

NAME = "waveclip-tiny"
PHOTOS = {"astronaut": "person", "coffee": "cup", "chelsea": "cat", "rocket": "rocket", "cat": "cat"}


@pytest.fixture(scope="module")
def tiny():
    return waveclip.create_model_and_transforms(NAME, precision="fp64")


@pytest.fixture(scope="module")
def photos(tiny):
    """Real photographs shipped with scikit-image, preprocessed by the model's own eval transform."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    _, _, preprocess = tiny
    images = [preprocess(Image.fromarray(getattr(skimage_data, n)()).convert("RGB")) for n in PHOTOS]
    return torch.stack(images).double()


def test_create_model_and_transforms_gives_a_clip_like_model(tiny, photos):
    model, preprocess_train, _ = tiny
    assert isinstance(model, WaveCLIPModel) and isinstance(model.visual, WaveCLIP) and not model.training
    assert photos.shape == (5, 3, 32, 32) and callable(preprocess_train)
    config = model.visual.config
    assert (config.teacher, config.teacher_config, config.teacher_weights) == ("custom", TINY_TEACHER, None)
    assert config.teacher_text_sha256 is not None and model.visual.dtype == torch.float64
    with torch.no_grad():
        exits = model.visual(photos)
        assert torch.equal(model.encode_image(photos), exits[:, -1])
        torch.testing.assert_close(model.encode_image(photos, exit=0), exits[:, 0], rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match=r"exit 2 is not one this image size reaches \(0..1\)"):
            model.encode_image(photos[:, :, ::2, ::2], exit=2)
        # The text tower is the teacher's: a fresh load of the same teacher encodes the same.
        teacher = load_teacher(TINY_TEACHER).double()
        text = waveclip.get_tokenizer(NAME)(["a photo of a cat.", "a rocket"])
        assert torch.equal(model.encode_text(text), teacher.encode_text(text))
        image_features, text_features, scale = model(photos, text)
        theirs = teacher(photos, text)  # what open_clip's CLIP returns, for its own image tower
    assert len(theirs) == 3 and torch.equal(scale, theirs[2]) and torch.equal(text_features, theirs[1])
    torch.testing.assert_close(image_features, exits[:, -1], rtol=0, atol=1e-12)
    assert torch.equal(model.logit_scale, teacher.logit_scale)


def test_get_tokenizer_is_the_teachers():
    ours, theirs = waveclip.get_tokenizer("waveclip-vit-b-16"), open_clip.get_tokenizer("ViT-B-16")
    text = ["a photo of a cat.", "an astronaut"]
    assert torch.equal(ours(text), theirs(text))
    assert waveclip.get_tokenizer(NAME)(text).shape == (2, 77)
    with pytest.raises(ValueError, match="unknown model 'ViT-B-16'; WaveCLIP models: waveclip-tiny"):
        waveclip.get_tokenizer("ViT-B-16")


def test_a_checkpoint_rebuilds_the_text_tower_it_was_paired_with(tmp_path, photos):
    """Teacher weights from a file: the checkpoint records them, and a reload encodes text exactly as before."""
    teacher = load_teacher(TINY_TEACHER)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))  # "trained" weights, unlike the seeded random ones
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    model, _, _ = waveclip.create_model_and_transforms(NAME, teacher_weights=weights)
    assert model.visual.config.teacher_weights == str(weights)
    model.save_pretrained(tmp_path / "student")
    loaded, _, _ = waveclip.create_model_and_transforms(NAME, pretrained=tmp_path / "student")
    text = waveclip.get_tokenizer(str(tmp_path / "student"))(["a cat", "a cup of coffee"])
    x = photos.float()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))
        assert torch.equal(loaded.encode_text(text), teacher.encode_text(text))
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
    with pytest.raises(ValueError, match="is not the one this student was paired with"):
        random_weights = tmp_path / "random.pt"
        torch.save(load_teacher(TINY_TEACHER).state_dict(), random_weights)
        waveclip.create_model_and_transforms(NAME, pretrained=tmp_path / "student", teacher_weights=random_weights)


def test_bad_arguments_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'waveclip-huge'"):
        waveclip.create_model_and_transforms("waveclip-huge")
    with pytest.raises(ValueError, match="precision must be one of"):
        waveclip.create_model_and_transforms(NAME, precision="fp8")
    WaveCLIP(waveclip.WaveCLIPConfig.from_preset(NAME, image_size=64)).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"is not a waveclip-tiny checkpoint \(image_size \(64, 64\) vs \(32, 32\)\)"):
        waveclip.create_model_and_transforms(NAME, pretrained=tmp_path / "big")
    WaveCLIP(waveclip.WaveCLIPConfig.from_preset(NAME)).save_pretrained(tmp_path / "alone")
    with pytest.raises(ValueError, match="records no teacher: pass teacher="):
        waveclip.create_model_and_transforms(NAME, pretrained=tmp_path / "alone")


def test_clip_benchmark_zero_shot_runs_unmodified_and_agrees_with_the_gate(tiny, photos):
    """CLIP_benchmark's zero_shot_classifier + run_classification on real photographs predict what
    ZeroShotClassifier predicts at the last exit (its accuracy() helper breaks on numpy 2: ours below)."""
    zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    model, _, _ = tiny
    classnames = sorted(set(PHOTOS.values()))
    target = torch.tensor([classnames.index(c) for c in PHOTOS.values()])

    class Photos(torch.utils.data.Dataset):
        classes = classnames

        def __len__(self):
            return len(photos)

        def __getitem__(self, i):
            return photos[i], target[i]

    loader = torch.utils.data.DataLoader(Photos(), batch_size=2)
    templates = ["a photo of a {c}.", "a picture of the {c}."]
    tokenizer = waveclip.get_tokenizer(NAME)
    classifier = zeroshot.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False)
    logits, true = zeroshot.run_classification(model, classifier, loader, "cpu", amp=False)
    assert logits.shape == (5, 4) and torch.equal(true, target)

    gate = ZeroShotClassifier(model.visual, classifier.T, classnames, logit_scale=100.0, thresholds=(2.0, 2.0))
    preds = gate.predict(photos)
    assert [p.exit_stage for p in preds] == [2] * 5
    assert [p.label for p in preds] == logits.argmax(dim=1).tolist()
    torch.testing.assert_close(torch.stack([p.probs for p in preds]).float(), logits.softmax(dim=1), rtol=0, atol=1e-5)
    ours = waveclip.class_text_embeddings(model, tokenizer, classnames, [t.replace("{c}", "{}") for t in templates])
    torch.testing.assert_close(ours.T.float(), classifier.float(), rtol=0, atol=1e-6)
    accuracy = (logits.argmax(dim=1) == true).float().mean().item()
    assert accuracy == pytest.approx(sum(p.label == t for p, t in zip(preds, target.tolist())) / 5)
