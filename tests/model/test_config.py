"""WaveCLIPConfig: every field is checked when the config is built, with messages that say what fits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from waveclip import WaveCLIPConfig
from waveclip.config import PRESETS


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=225), r"image height 225 does not tile.*nearest valid heights: 224 or 280"),
        (dict(image_size=(224, 200)), r"image width 200 does not tile.*nearest valid widths: 168 or 224"),
        (dict(image_size=0), "image_size height must be a positive int"),
        (dict(image_size=(224, 224, 3)), r"image_size must be an int or an \(H, W\) pair"),
        (dict(color="hsv"), r"color must be one of \('ycbcr', 'rgb'\), got 'hsv'"),
        (dict(grid=0), "grid must be a positive int"),
        (dict(grid=(7, -7)), "grid must be a positive int"),
        (dict(heads=0), "heads must be a positive int, got 0"),
        (dict(heads=5), "width 768 is not divisible by heads 5"),
        (dict(width=0), "width must be a positive int"),
        (dict(layers=0), "layers must be a positive int"),
        (dict(embed_dim=-1), "embed_dim must be a positive int"),
        (dict(mlp_ratio=0), "mlp_ratio must be a positive number"),
        (dict(levels=-1, thresholds=()), "levels must be an int >= 0"),
        (dict(levels=1.5), "levels must be an int >= 0"),
        (dict(levels=0), r"thresholds needs one value per non-final stage \(0\)"),
        (dict(thresholds=(0.5, float("nan"), 0.5)), "thresholds must not be NaN"),
        (dict(thresholds=(0.5, "high", 0.5)), "thresholds must be numbers"),
        (dict(thresholds=(0.5,)), r"one value per non-final stage \(3\)"),
    ],
)
def test_bad_fields_raise_before_a_tower_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        WaveCLIPConfig(**overrides)


def test_levels_zero_is_one_stage_without_a_gate():
    cfg = WaveCLIPConfig(image_size=28, levels=0, grid=7, thresholds=())
    assert cfg.num_stages == 1 and cfg.thresholds == () and cfg.block_sizes == [50]
    assert cfg.stage_dims() == [3 * 4 * 4]  # the colour-mixed image cut in 4 x 4 pixel patches


def test_valid_fields_are_normalised():
    cfg = WaveCLIPConfig(image_size=112, grid=7, levels=1, thresholds=[1])
    assert cfg.image_size == (112, 112) and cfg.grid == (7, 7) and cfg.thresholds == (1.0,)
    assert WaveCLIPConfig(thresholds=(0.1, float("inf"), 2.0)).thresholds[1] == float("inf")  # inf: never exits


def test_every_preset_is_valid_and_round_trips_through_json():
    for name, cfg in PRESETS.items():
        again = WaveCLIPConfig.from_dict(json.loads(cfg.to_json()))
        assert again == cfg, name


def test_from_dict_names_unknown_fields():
    fields = dataclasses.asdict(PRESETS["waveclip-tiny"]) | {"colour": "rgb"}
    with pytest.raises(ValueError, match=r"unknown WaveCLIPConfig field.*'colour'"):
        WaveCLIPConfig.from_dict(fields)


def test_num_stages_for_each_input_size():
    cfg = WaveCLIPConfig()  # 224 px, L=3
    assert [cfg.num_stages_for(s) for s in (224, 112, 56, 28)] == [4, 3, 2, 1]
    assert cfg.num_stages_for((448, 448)) == cfg.num_stages_for(896) == 4  # box-averaged down to 224
    for bad in (14, 100, 336, (224, 112), (448, 224)):
        with pytest.raises(ValueError, match="takes 224x224, 112x112, 56x56, 28x28"):
            cfg.num_stages_for(bad)
