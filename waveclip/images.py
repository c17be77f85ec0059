"""Image loading and CLIP preprocessing shared by the demo, the CLI and the distillation data.

`clip_transform` is open_clip's evaluation transform written with torchvision alone, so that loading and
preprocessing work where open_clip is not installed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# open_clip's OpenAI normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLE_NAMES = ("astronaut", "coffee", "chelsea")
# Formats whose 32-bit integer mode "I" holds at most 16 significant bits (PNG, and PGM, which Pillow
# rescales to 16 bits whatever its maxval).
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")


def sample_images(names=SAMPLE_NAMES) -> dict[str, Image.Image]:
    """Real photographs shipped with scikit-image, as RGB PIL images."""
    import skimage.data

    return {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names}


class _ResizeShortSide:
    """Resize so the image covers (H, W) with its aspect ratio kept (open_clip's ResizeKeepRatio)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        ratio = min(h / self.size[0], w / self.size[1])
        return image.resize((round(w / ratio), round(h / ratio)), Image.Resampling.BICUBIC)


def _convert_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_transform(size: int | tuple[int, int]):
    """open_clip's evaluation transform: resize the short side (bicubic), centre crop, normalise."""
    from torchvision import transforms

    H, W = (size, size) if isinstance(size, int) else tuple(size)
    if H == W:
        resize = transforms.Resize(H, interpolation=transforms.InterpolationMode.BICUBIC)
    else:
        resize = _ResizeShortSide((H, W))
    return transforms.Compose(
        [
            resize,
            transforms.CenterCrop((H, W)),
            _convert_rgb,
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def preprocess(images: list[Image.Image], size: int | tuple[int, int]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 CLIP-normalised batch."""
    transform = clip_transform(size)
    return torch.stack([transform(im) for im in images])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) -> RGB in [0, 1] for display."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def _bit_depth(image: Image.Image) -> int | None:
    """Significant bits per sample of a high-bit-depth integer image; None for 8-bit modes."""
    if image.mode.startswith("I;16"):
        return 16
    if image.mode == "I":
        return 16 if image.format in SIXTEEN_BIT_FORMATS else 32
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy. 16- and 32-bit integer images are scaled by their bit depth and float images
    by [0, 1] (Pillow's own conversion clips them at 255, which turns them almost all white)."""
    depth = _bit_depth(image)
    if depth is None and image.mode != "F":
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 if image.mode == "F" else 255.0 / (2**depth - 1)
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def load_image(path) -> Image.Image:
    """Open an image file as 8-bit RGB; raises ValueError with the path when it cannot be read.

    Images above Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, twice of which is an
    error) are refused with that ValueError too.
    """
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
