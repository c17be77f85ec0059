"""Stage tokens of one image in a safetensors file: what `waveclip tokenize --save` writes and `classify` reads.

Tensors `stage_0`, `stage_1`, ... (the leading stages, coarse to fine; a file may hold fewer than all
L+1), each `(Gh*Gw, dim_s)` float32, exactly `wavelet_tokenize`'s output for the image without its batch
axis. String metadata: `format` = "waveclip-tokens", `version`, `levels` (L), `grid` ("Gh,Gw"), `color`,
`image_size` ("H,W": the preprocessed image the tokens come from) and `source` (the image file).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch

from waveclip_kernels.common import stage_dims

FORMAT = "waveclip-tokens"
VERSION = "1"
SUFFIX = ".safetensors"


@dataclass
class StageTokens:
    tokens: list[torch.Tensor]  # leading stages, coarse to fine: (Gh*Gw, dim_s) each
    levels: int  # L of the tokenization (the file may hold fewer than L+1 stages)
    grid: tuple[int, int]
    color: str
    image_size: tuple[int, int]  # (H, W) of the preprocessed image
    source: str = ""  # the image file the tokens come from


def _pair(values) -> str:
    return ",".join(str(int(v)) for v in values)


def save_tokens(path, stages: StageTokens) -> pathlib.Path:
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    tensors = {f"stage_{s}": t.detach().to("cpu", torch.float32).contiguous() for s, t in enumerate(stages.tokens)}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "levels": str(stages.levels),
        "grid": _pair(stages.grid),
        "color": stages.color,
        "image_size": _pair(stages.image_size),
        "source": stages.source,
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_tokens(path) -> StageTokens:
    """Read a token file; a ValueError naming the file says what is wrong with it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises its own error type for unreadable files
        raise ValueError(f"cannot read token file {path}: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a waveclip token file (no format={FORMAT!r} in its metadata)")
    try:
        levels = int(metadata["levels"])
        grid = tuple(int(v) for v in metadata["grid"].split(","))
        image_size = tuple(int(v) for v in metadata["image_size"].split(","))
        color = metadata["color"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"token file {path} has incomplete metadata ({err})") from err
    count = len(tensors)
    names = [f"stage_{s}" for s in range(count)]
    if not count or sorted(tensors) != sorted(names) or count > levels + 1:
        raise ValueError(f"token file {path} must hold stage_0 .. stage_s (s <= {levels}), got {sorted(tensors)}")
    dims = stage_dims(levels, grid, image_size)
    tokens = [tensors[name] for name in names]
    for s, t in enumerate(tokens):
        if tuple(t.shape) != (grid[0] * grid[1], dims[s]):
            raise ValueError(
                f"token file {path}: stage_{s} has shape {tuple(t.shape)}, expected {(grid[0] * grid[1], dims[s])}"
            )
    return StageTokens(tokens, levels, grid, color, image_size, metadata.get("source", ""))
