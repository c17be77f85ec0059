"""The inputs of `waveclip classify`: files, folders walked recursively, list files, token files; and the
dataset that loads them in DataLoader workers."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .common import UserError
from .tokenfile import SUFFIX as TOKEN_SUFFIX

LIST_SUFFIX = ".txt"  # a text file naming one input per line (relative to the list's folder)


def image_suffixes() -> set[str]:
    """File name endings of the formats Pillow can open."""
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _walk(folder: pathlib.Path, suffixes: set[str]) -> list[str]:
    found = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
        raise UserError(f"folder {folder} holds no image files")
    return found


def _read_list(path: pathlib.Path) -> list[pathlib.Path]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [path.parent / line for line in lines if line and not line.startswith("#")]


def collect_inputs(arguments: Sequence[str]) -> list[str]:
    """Expand the command's inputs, in order: a folder gives its image files (recursively, sorted); a .txt
    file lists inputs one per line (relative to its folder; blank lines and # comments skipped); any other
    file (an image, or a .safetensors token file) is itself."""
    suffixes = image_suffixes()
    out: list[str] = []

    def add(path: pathlib.Path, listed_in: tuple[pathlib.Path, ...]) -> None:
        if path.is_dir():
            out.extend(_walk(path, suffixes))
        elif not path.is_file():
            raise UserError(
                f"no such image file or folder: {path}" + (f" (listed in {listed_in[-1]})" if listed_in else "")
            )
        elif path.suffix.lower() == LIST_SUFFIX:
            if path.resolve() in listed_in:
                raise UserError(f"list file {path} lists itself")
            for entry in _read_list(path):
                add(entry, (*listed_in, path.resolve()))
        else:
            out.append(str(path))

    for argument in arguments:
        add(pathlib.Path(argument), ())
    return out


def native_size(picture_size: tuple[int, int], image_size: tuple[int, int], levels: int) -> tuple[int, int]:
    """The input size for a picture of (width, height) pixels: the largest image_size / 2**k (k = 0..L)
    that resizing the picture reaches without upsampling it (the smallest, when even that needs it)."""
    w, h = picture_size
    H, W = image_size
    for k in range(levels + 1):
        if h >= H >> k and w >= W >> k:
            return (H >> k, W >> k)
    return (H >> levels, W >> levels)


@dataclass
class Item:
    index: int  # position in the command's input list
    path: str
    kind: str  # "image", "tokens" or "error"
    data: object  # (3, H, W) tensor, a StageTokens, or the error message


class InputDataset(torch.utils.data.Dataset):
    """Images preprocessed at the tower's size (or their native dyadic size), and token files, by index.

    An unreadable input becomes an "error" item rather than an exception, so that DataLoader workers and
    ranks report it as one line.
    """

    def __init__(self, paths: Sequence[str], indices: Sequence[int], config, native_resolution: bool):
        self.paths, self.indices = list(paths), list(indices)
        self.image_size, self.levels = config.image_size, config.levels
        self.native_resolution = native_resolution
        self._transforms: dict = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, path: str) -> torch.Tensor:
        from waveclip.images import clip_transform, load_image

        picture = load_image(path)
        size = native_size(picture.size, self.image_size, self.levels) if self.native_resolution else self.image_size
        if size not in self._transforms:
            self._transforms[size] = clip_transform(size)
        return self._transforms[size](picture)

    def __getitem__(self, i: int) -> Item:
        from .tokenfile import load_tokens

        path, index = self.paths[i], self.indices[i]
        try:
            if path.lower().endswith(TOKEN_SUFFIX):
                return Item(index, path, "tokens", load_tokens(path))
            return Item(index, path, "image", self._image(path))
        except ValueError as err:
            return Item(index, path, "error", str(err))


def as_list(batch: list[Item]) -> list[Item]:
    """DataLoader collate function: keep the items as they are (their sizes may differ)."""
    return batch
