"""WaveCLIP configuration and named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from waveclip_kernels.common import stage_dims


@dataclass
class WaveCLIPConfig:
    image_size: tuple[int, int] = (224, 224)  # (H, W) the tower accepts; must tile by 2**levels * grid
    levels: int = 3  # Haar levels L; the model has L+1 stages and L+1 exits
    grid: tuple[int, int] = (7, 7)  # token grid shared by every stage: Gh*Gw tokens per stage
    color: str = "ycbcr"  # colour transform before the DWT: "ycbcr" (BT.601) or "rgb"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # size of the joint image-text embedding each exit produces
    quick_gelu: bool = True  # OpenAI CLIP weights use QuickGELU in the MLP
    teacher: str = "ViT-B-16"  # open_clip model name the trunk comes from
    teacher_patch_size: int = 16  # the teacher's patch size, for the analytic stage-projection init
    # Margin gate: a sample exits at the first stage s < L whose top-1 minus top-2 softmax
    # probability is >= thresholds[s]; the last stage always answers. len == levels.
    thresholds: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        if isinstance(self.grid, int):
            self.grid = (self.grid, self.grid)
        self.image_size, self.grid = tuple(self.image_size), tuple(self.grid)
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if len(self.thresholds) != self.levels:
            raise ValueError(f"thresholds needs one value per non-final stage ({self.levels}), got {self.thresholds}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> WaveCLIPConfig:
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> WaveCLIPConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, WaveCLIPConfig] = {
    # OpenAI-style ViT-B/16 teacher, 224 px, 4 stages of 49 tokens (patches 4, 4, 8, 16 px).
    "waveclip-vit-b-16": WaveCLIPConfig(),
    # Same trunk at 448 px on a 14x14 grid: 4 stages of 196 tokens, where attention dominates.
    "waveclip-vit-b-16-448": WaveCLIPConfig(image_size=(448, 448), grid=(14, 14)),
    # A tiny tower for tests: 32 px, L=2, 2x2 grid, width 32, 2 layers.
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
