"""Files the training writes: safetensors with the same permissions as every other file (the umask's)."""

from __future__ import annotations

import os
import pathlib

from torch import Tensor


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain `open(path, "w")` would: 0666 minus the umask.

    safetensors creates its files 0600 whatever the umask, unlike the CSV and JSON files next to them.
    """
    os.chmod(path, 0o666 & ~current_umask())


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """`safetensors.torch.save_file`, then the permissions of an ordinary file."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)


def save_model(model, folder: str | os.PathLike) -> None:
    """`model.save_pretrained(folder)`, its weights file given the permissions of its config.json."""
    model.save_pretrained(folder)
    for weights in pathlib.Path(folder).glob("*.safetensors"):
        honour_umask(weights)
