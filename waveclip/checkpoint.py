"""The tower's checkpoint folder: `model.safetensors` (the state dict) and `config.json` (its config).

Needs only safetensors. Every problem with a folder is a ValueError (FileNotFoundError for a missing
file) whose message names the file, so a command line can print it as one line.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from torch import Tensor

from .config import WaveCLIPConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save(state: dict[str, Tensor], config: WaveCLIPConfig, directory: str | os.PathLike) -> None:
    """Write `state` and `config` into `directory` (created if missing)."""
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(config.to_json())


def read_config(directory: str | os.PathLike) -> WaveCLIPConfig:
    """The config a checkpoint folder holds."""
    path = pathlib.Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a WaveCLIP checkpoint: {CONFIG_NAME} is missing")
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object, got {type(fields).__name__}")
        return WaveCLIPConfig.from_dict(fields)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a valid WaveCLIP config: {err}") from err


def read_state(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The state dict a checkpoint folder holds, on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = pathlib.Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a WaveCLIP checkpoint: {WEIGHTS_NAME} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from err
