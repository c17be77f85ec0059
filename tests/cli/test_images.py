"""Image loading (bit depths, the decompression-bomb guard) and the CLIP transform."""

import numpy as np
import pytest
import torch
from PIL import Image

from waveclip.images import clip_transform, load_image


def _gradient(bits: int, shape=(24, 40)) -> np.ndarray:
    return np.linspace(0, 2**bits - 1, shape[0] * shape[1]).reshape(shape).round()


def test_16_bit_png_keeps_its_tones(tmp_path):
    values = _gradient(16).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (*values.shape, 3) and loaded.dtype == np.uint8
    expected = np.rint(values / 257.0)  # 65535 -> 255
    assert np.array_equal(loaded[..., 0], expected) and np.array_equal(loaded[..., 2], expected)


def test_12_bit_pgm_is_scaled_by_its_depth(tmp_path):
    # Pillow reads a PGM with maxval 4095 as mode "I" rescaled to 16 bits.
    values = _gradient(12).astype(">u2")
    path = tmp_path / "gray12.pgm"
    path.write_bytes(f"P5 {values.shape[1]} {values.shape[0]} 4095\n".encode() + values.tobytes())
    image = Image.open(path)
    assert image.mode == "I"
    expected = np.rint(np.asarray(image, dtype=np.float64) * 255 / 65535)
    loaded = np.asarray(load_image(path))[..., 1]
    assert np.array_equal(loaded, expected)
    assert abs(loaded.astype(float).mean() - 127.5) < 1.0  # a full-range gradient, not white


def test_float_image_is_read_as_zero_to_one(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert np.array_equal(np.asarray(load_image(path))[..., 0], np.rint(values * 255))


def test_8_bit_images_are_unchanged(tmp_path):
    import skimage.data

    path = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(path)
    assert np.array_equal(np.asarray(load_image(path)), skimage.data.coffee())


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x the limit: Pillow refuses
    with pytest.raises(ValueError, match=r"cannot read image .*big\.png: .*exceeds limit"):
        load_image(path)


@pytest.mark.parametrize("size", [32, 224, (32, 48), (48, 32)])
def test_clip_transform_equals_open_clips(size):
    import open_clip
    import skimage.data

    from waveclip.images import CLIP_MEAN, CLIP_STD

    picture = Image.fromarray(skimage.data.chelsea())
    theirs = open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(picture)
    ours = clip_transform(size)(picture)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
