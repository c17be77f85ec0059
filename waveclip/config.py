"""WaveCLIP configuration and named presets.

Every field is checked when a config is built (`__post_init__`): a config that exists describes a tower
that can be built and run. The image geometry rules are those of `waveclip_kernels.common`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field

from waveclip_kernels.common import COLORS, image_size_error, normalize_grid, stage_dims


def _positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _size_pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or an (H, W) pair, got {value!r}")
    return _positive_int(f"{name} height", pair[0]), _positive_int(f"{name} width", pair[1])


def check_thresholds(thresholds, levels: int) -> tuple[float, ...]:
    """The margin thresholds as floats: one per non-final stage, none of them NaN."""
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError) as err:
        raise ValueError(f"thresholds must be numbers, got {thresholds!r}") from err
    if len(values) != levels:
        raise ValueError(f"thresholds needs one value per non-final stage ({levels}), got {values}")
    if any(math.isnan(t) for t in values):
        raise ValueError(f"thresholds must not be NaN (a NaN margin test never passes), got {values}")
    return values


@dataclass
class WaveCLIPConfig:
    image_size: tuple[int, int] = (224, 224)  # (H, W) the tower is built for; must tile by 2**levels * grid
    # Haar levels L: the model has L+1 stages and L+1 exits. levels=0 is one stage (the colour-mixed
    # image cut on the grid) with no gate, a plain ViT on the grid's patches.
    levels: int = 3
    grid: tuple[int, int] = (7, 7)  # token grid shared by every stage: Gh*Gw tokens per stage
    color: str = "ycbcr"  # colour transform before the DWT: "ycbcr" (BT.601) or "rgb"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # size of the joint image-text embedding each exit produces
    quick_gelu: bool = True  # OpenAI CLIP weights use QuickGELU in the MLP
    # The teacher, whose text tower encodes the class prompts: an open_clip model name ("" = none).
    teacher: str = "ViT-B-16"
    teacher_patch_size: int = 16  # the teacher's patch size, for the analytic stage-projection init
    # The teacher's open_clip model config (embed_dim, vision_cfg, text_cfg, ...) when `teacher` is not
    # one of open_clip's built-in models; the teacher is rebuilt from it.
    teacher_config: dict | None = None
    # Which teacher weights: a pretrained tag or a checkpoint file; None = random weights drawn under
    # `interop.TEACHER_SEED`, which rebuild identically.
    teacher_weights: str | None = None
    # sha256 of the teacher's text tower (every non-visual weight, as float32) the student pairs with;
    # a rebuilt text tower must match it. None when the teacher had no text tower.
    teacher_text_sha256: str | None = None
    # Margin gate: a sample exits at the first stage s < L whose top-1 minus top-2 softmax
    # probability is >= thresholds[s]; the last stage always answers. len == levels.
    thresholds: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def __post_init__(self):
        if not isinstance(self.levels, numbers.Integral) or isinstance(self.levels, bool) or self.levels < 0:
            raise ValueError(f"levels must be an int >= 0, got {self.levels!r}")
        self.levels = int(self.levels)
        self.image_size = _size_pair("image_size", self.image_size)
        self.grid = normalize_grid(self.grid)
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        message = image_size_error(self.image_size, self.levels, self.grid)
        if message is not None:
            raise ValueError(f"image_size {self.image_size}: {message}")
        for name in ("width", "layers", "heads", "embed_dim", "teacher_patch_size"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        ratio = self.mlp_ratio
        if not isinstance(ratio, numbers.Real) or not ratio > 0 or int(self.width * ratio) < 1:
            raise ValueError(f"mlp_ratio must be a positive number (width * mlp_ratio >= 1), got {self.mlp_ratio!r}")
        if not isinstance(self.teacher, str):
            raise ValueError(f"teacher must be an open_clip model name (a str), got {self.teacher!r}")
        if self.teacher_config is not None and not isinstance(self.teacher_config, dict):
            raise ValueError(f"teacher_config must be an open_clip model config dict, got {self.teacher_config!r}")
        self.thresholds = check_thresholds(self.thresholds, self.levels)

    @property
    def num_stages(self) -> int:
        return self.levels + 1

    @property
    def tokens_per_stage(self) -> int:
        """Grid tokens of one stage, without its class token."""
        return self.grid[0] * self.grid[1]

    @property
    def block_sizes(self) -> list[int]:
        """Sequence length of each stage block: one class token plus the grid tokens."""
        return [1 + self.tokens_per_stage] * self.num_stages

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def stage_dims(self) -> list[int]:
        """Token feature size of every stage, coarse to fine (48, 144, 576, 2304 for the default)."""
        return stage_dims(self.levels, self.grid, self.image_size)

    def num_stages_for(self, image_size) -> int:
        """Stages an image of `image_size` (H, W) runs: L+1-k for `self.image_size / 2**k` (k = 0..L).

        An image larger than `self.image_size` by a power of two runs every stage, on its box average
        (see `WaveCLIP.tokenize`). Any other size is a ValueError naming the sizes that run.
        """
        size = _size_pair("image size", image_size)
        (H, W) = self.image_size
        for k in range(self.levels + 1):
            if size == (H >> k, W >> k):
                return self.num_stages - k
        ratio = size[0] // H
        if ratio >= 2 and ratio & (ratio - 1) == 0 and size == (H * ratio, W * ratio):
            return self.num_stages
        sizes = ", ".join(f"{H >> k}x{W >> k}" for k in range(self.levels + 1))
        raise ValueError(
            f"an image of {size[0]}x{size[1]} pixels does not fit this tower: it takes {sizes} "
            f"(image_size / 2**k, k = 0..{self.levels}) or image_size times a power of two; resize it first"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> WaveCLIPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WaveCLIPConfig field(s) {', '.join(map(repr, unknown))}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> WaveCLIPConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


# An open_clip model config for a tiny CLIP whose image tower fits the tiny preset (32 px, 8 px patches,
# width 32, 2 layers, embed 16) with a one-layer text tower on open_clip's BPE vocabulary.
TINY_TEACHER: dict = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

PRESETS: dict[str, WaveCLIPConfig] = {
    # OpenAI-style ViT-B/16 teacher, 224 px, 4 stages of 49 tokens (patches 4, 4, 8, 16 px).
    "waveclip-vit-b-16": WaveCLIPConfig(),
    # Same trunk at 448 px on a 14x14 grid: 4 stages of 196 tokens, where attention dominates.
    "waveclip-vit-b-16-448": WaveCLIPConfig(image_size=(448, 448), grid=(14, 14)),
    # A tiny tower for tests: 32 px, L=2, 2x2 grid, width 32, 2 layers. It names no teacher of its own;
    # `waveclip.create_model_and_transforms` pairs it with TINY_TEACHER (see PRESET_TEACHERS).
    "waveclip-tiny": WaveCLIPConfig(
        image_size=(32, 32),
        levels=2,
        grid=(2, 2),
        width=32,
        layers=2,
        heads=2,
        embed_dim=16,
        teacher="",
        teacher_patch_size=8,
        thresholds=(0.5, 0.5),
    ),
}

# The teacher `create_model_and_transforms` builds for a preset when none is given: an open_clip model
# name or an open_clip model config dict.
PRESET_TEACHERS: dict[str, str | dict] = {
    "waveclip-vit-b-16": "ViT-B-16",
    "waveclip-vit-b-16-448": "ViT-B-16",
    "waveclip-tiny": TINY_TEACHER,
}
