"""Teacher interop: student init from a tiny open_clip ViT, the analytic stage projections, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import waveclip_kernels as wk
from waveclip import TINY_TEACHER, WaveCLIP, WaveCLIPConfig, load_paired_teacher, load_teacher
from waveclip.initialization import stage_projection_init, text_tower_sha256, trunk_config
from waveclip.interop import _cached_hf_checkpoint

pytest.importorskip("open_clip")

TINY = WaveCLIPConfig.from_preset("waveclip-tiny")


def mean_patch_embedding_per_cell(teacher, x, grid):
    """(B, Gh*Gw, width): the teacher's patch embeddings averaged over every grid cell."""
    patches = teacher.visual.conv1(x)  # (B, width, H/P, W/P)
    cells = F.adaptive_avg_pool2d(patches, grid)
    return cells.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("color", ["ycbcr", "rgb"])
def test_analytic_stage_projection_init_property(color, tiny_teacher):
    """Per grid cell, sum_s W_s @ token_s == mean of the teacher's patch embeddings over the cell."""
    teacher = tiny_teacher()
    config = dataclasses.replace(TINY, color=color)
    student = WaveCLIP.from_open_clip(teacher, config)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    tokens = student.tokenize(x)
    got = sum(proj(t) for proj, t in zip(student.stage_proj, tokens))
    want = mean_patch_embedding_per_cell(teacher, x, config.grid)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_analytic_init_on_the_vit_b_16_geometry():
    """Same property at 224 px, L=3, 7x7 grid with 16 px patches (4 patches per 32 px cell)."""
    config = WaveCLIPConfig.from_preset("waveclip-vit-b-16", width=8, heads=1)
    conv = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    weights = stage_projection_init(conv, config)
    assert [tuple(w.shape) for w in weights] == [(8, d) for d in config.stage_dims()]
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    tokens = wk.wavelet_tokenize(x, config.levels, config.grid, config.color)
    got = sum(t @ w.T for t, w in zip(tokens, weights))
    want = F.adaptive_avg_pool2d(F.conv2d(x, conv, stride=16), (7, 7)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_analytic_init_rejects_cells_that_are_not_whole_patches():
    with pytest.raises(ValueError, match="whole number"):
        stage_projection_init(torch.randn(4, 3, 6, 6), TINY)


def test_from_open_clip_copies_and_initialises(tiny_teacher):
    teacher = tiny_teacher()
    visual = teacher.visual
    student = WaveCLIP.from_open_clip(teacher, TINY)
    assert student.dtype == torch.float64 and student.config.quick_gelu
    for name, value in visual.transformer.state_dict().items():
        assert torch.equal(student.transformer.state_dict()[name], value), name
    for part in ("ln_pre", "ln_post"):
        for name, value in getattr(visual, part).state_dict().items():
            assert torch.equal(getattr(student, part).state_dict()[name], value)
    assert torch.equal(student.proj, visual.proj)
    cls = visual.class_embedding + visual.positional_embedding[0]
    assert torch.equal(student.class_embedding, cls.expand(TINY.num_stages, -1))
    assert torch.equal(student.level_embedding, torch.zeros_like(student.level_embedding))
    # 4x4 teacher patch grid -> 2x2: bilinear halving averages each 2x2 group of position embeddings.
    pos = visual.positional_embedding[1:].reshape(4, 4, -1)
    pooled = pos.reshape(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)
    torch.testing.assert_close(student.positional_embedding, pooled, rtol=0, atol=1e-12)
    # A full-resolution teacher's visual tower, or just its `.visual`, gives the same student.
    again = WaveCLIP.from_open_clip(visual, TINY)
    for (name, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_copied_trunk_block_matches_the_open_clip_block(dtype, tol, quick_gelu, tiny_teacher):
    """One full (unmasked) block: our block on the copied weights == open_clip's ResidualAttentionBlock."""
    teacher = tiny_teacher(dtype, quick_gelu)
    config = dataclasses.replace(TINY, quick_gelu=quick_gelu)
    student = WaveCLIP.from_open_clip(teacher, config)
    x = torch.randn(3, 9, 32, dtype=dtype)
    with torch.no_grad():
        for ours, theirs in zip(student.transformer.resblocks, teacher.visual.transformer.resblocks):
            want = theirs(x)
            got = ours(x, lambda q, k, v: wk.block_causal_attention(q, k, v, [9]))
            assert (want - got).abs().max() <= tol * want.abs().max()


def test_trunk_config_reads_the_teacher(tiny_teacher):
    cfg = trunk_config(tiny_teacher())
    assert cfg == dict(width=32, layers=2, heads=2, mlp_ratio=4.0, embed_dim=16, quick_gelu=True, teacher_patch_size=8)


def test_from_open_clip_rejects_a_mismatched_config(tiny_teacher):
    with pytest.raises(ValueError, match="width: config 64 vs teacher 32"):
        WaveCLIP.from_open_clip(tiny_teacher(), dataclasses.replace(TINY, width=64))
    with pytest.raises(ValueError, match="teacher_patch_size: config 16 vs teacher 8"):
        WaveCLIP.from_open_clip(tiny_teacher(), dataclasses.replace(TINY, teacher_patch_size=16))
    with pytest.raises(ValueError, match="cannot tell which open_clip model this teacher is"):
        WaveCLIP.from_open_clip(tiny_teacher())  # not from load_teacher, and no config that names it
    with pytest.raises(ValueError, match="quick_gelu"):
        WaveCLIP.from_open_clip(tiny_teacher(quick_gelu=False), TINY)
    with pytest.raises(TypeError, match="open_clip"):
        WaveCLIP.from_open_clip(torch.nn.Linear(2, 2), TINY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip(tmp_path, dtype, tiny_teacher):
    student = WaveCLIP.from_open_clip(tiny_teacher(dtype), TINY)
    with torch.no_grad():
        student.level_embedding.normal_()
    student.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = WaveCLIP.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == student.config and loaded.dtype == dtype and not loaded.training
    for (name, a), b in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), loaded(x))


def test_load_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        WaveCLIP.from_pretrained(tmp_path)


def test_broken_checkpoints_raise_value_errors_naming_the_file(tmp_path):
    WaveCLIP(TINY).save_pretrained(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # cut short, as by a full disk
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        WaveCLIP.from_pretrained(tmp_path)
    weights.write_bytes(good)
    fields = json.loads(config.read_text())
    config.write_text(json.dumps(fields | {"colour": "rgb"}))
    with pytest.raises(ValueError, match=f"{config}: not a valid WaveCLIP config: unknown .*'colour'"):
        WaveCLIP.from_pretrained(tmp_path)
    config.write_text(json.dumps(fields | {"heads": 0}))
    with pytest.raises(ValueError, match=f"{config}: .*heads must be a positive int"):
        WaveCLIP.from_pretrained(tmp_path)
    config.write_text("{not json")
    with pytest.raises(ValueError, match=f"{config}: not a valid WaveCLIP config"):
        WaveCLIP.from_pretrained(tmp_path)
    config.write_text(json.dumps(fields | {"width": 64}))
    with pytest.raises(ValueError, match=f"{weights} does not fit its config.json"):
        WaveCLIP.from_pretrained(tmp_path)


def test_from_open_clip_records_the_real_teacher():
    """A ViT-B-32 teacher is recorded as ViT-B-32 (it was once recorded as the preset's ViT-B-16)."""
    teacher = load_teacher("ViT-B-32")
    student = WaveCLIP.from_open_clip(teacher)
    cfg = student.config
    assert (cfg.teacher, cfg.teacher_config, cfg.teacher_weights) == ("ViT-B-32", None, None)
    assert cfg.teacher_patch_size == 32
    assert len(cfg.teacher_text_sha256) == 64


def test_a_custom_teacher_is_rebuilt_from_its_record(tmp_path):
    """A teacher given as an open_clip config (dict or .json) is recorded with its config, and rebuilt
    with the same text tower in a later load (random weights are drawn under a fixed seed)."""
    path = tmp_path / "teacher-tiny.json"
    path.write_text(json.dumps(TINY_TEACHER))
    for spec, name in ((TINY_TEACHER, "custom"), (path, "teacher-tiny")):
        student = WaveCLIP.from_open_clip(load_teacher(spec), TINY)
        assert (student.config.teacher, student.config.teacher_config) == (name, TINY_TEACHER)
        student.save_pretrained(tmp_path / name)
        config = WaveCLIP.from_pretrained(tmp_path / name).config
        again = load_paired_teacher(config)
        assert text_tower_sha256(again) == config.teacher_text_sha256 is not None
    with pytest.raises(ValueError, match="names no teacher"):
        load_paired_teacher(TINY)
    with pytest.raises(ValueError, match="is not the one this student was paired with"):
        load_paired_teacher(dataclasses.replace(config, teacher_text_sha256="0" * 64))


def test_load_teacher_fails_clearly_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a pretrained tag"):
        load_teacher("ViT-B-16", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_teacher("ViT-Q-99")
    if _cached_hf_checkpoint("ViT-B-16", "openai") is None:
        with pytest.raises(RuntimeError, match="not on this machine"):
            load_teacher("ViT-B-16", "openai")


@pytest.mark.slow
def test_load_teacher_from_a_local_checkpoint(tmp_path):
    """A checkpoint file loads offline, and the student built from it is the ViT-B/16 preset."""
    teacher = load_teacher("ViT-B-16")
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    loaded = load_teacher("ViT-B-16", path)
    for (name, a), b in zip(teacher.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    student = WaveCLIP.from_open_clip(loaded)
    record = dict(teacher_weights=str(path), teacher_text_sha256=text_tower_sha256(teacher))
    assert student.config == WaveCLIPConfig.from_preset("waveclip-vit-b-16", **record)
