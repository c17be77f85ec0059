"""Image loading and CLIP preprocessing shared by the demo, the CLI and the distillation data."""

from __future__ import annotations

import torch
from PIL import Image

# open_clip's OpenAI normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLE_NAMES = ("astronaut", "coffee", "chelsea")


def sample_images(names=SAMPLE_NAMES) -> dict[str, Image.Image]:
    """Real photographs shipped with scikit-image, as RGB PIL images."""
    import skimage.data

    return {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names}


def clip_transform(size: int | tuple[int, int]):
    """open_clip's evaluation transform: resize the short side, centre crop, normalise."""
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)


def preprocess(images: list[Image.Image], size: int | tuple[int, int]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 CLIP-normalised batch."""
    transform = clip_transform(size)
    return torch.stack([transform(im) for im in images])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) -> RGB in [0, 1] for display."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def load_image(path) -> Image.Image:
    """Open an image file as RGB; raises ValueError with the path when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
