"""Image data for distillation and calibration: folders, file lists, and the photographs packages ship.

A *source* is one of:

- a folder: every image file under it, recursively, in sorted order. With `labels_from_folders`, the
  first sub-folder under the source names the class (the ImageFolder layout);
- a text file listing images, one per line: `path` or `path<TAB>label` (blank lines and lines starting
  with `#` are skipped; relative paths are relative to the list file's folder);
- a built-in name: `builtin:textiles` (conformal-clip-data's 2000 labelled 250x250 textile images,
  classes `global`, `local`, `nominal`) or `builtin:skimage` (scikit-image's sample photographs).

Bad data policy: an empty source, a listed file that does not exist, or an image that cannot be decoded
**stops** the run with one `DataError` that names every bad file, before any training step. With
`skip_unreadable=True` (`--skip-unreadable`) unreadable images are dropped instead, with one warning
that names them all; a source left with no image still stops the run. Every image is decoded once up
front so that a broken file is never found half-way through an epoch.

A deterministic train/holdout split (`split_of`) hashes each image's name relative to its source, so it
does not depend on the order of the files or on where the package is installed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from waveclip.images import clip_transform, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# scikit-image's sample files that are photographs (the rest are drawings, scans of text, masks, ...).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
SPLITS = ("all", "train", "holdout")


class DataError(ValueError):
    """A data source that cannot be used as asked: empty, missing files or unreadable images."""


@dataclass(frozen=True)
class ImageRecord:
    path: pathlib.Path  # absolute path of the image file
    name: str  # the path relative to its source root (what the train/holdout split hashes)
    label: str | None  # class name, when the source gives one


def _builtin(name: str) -> tuple[list[ImageRecord], bool]:
    """Records of a built-in source; the bool says whether they carry labels."""
    if name == "textiles":
        import conformal_clip_data

        return _scan_folder(conformal_clip_data.textile_simulated_root(), labels_from_folders=True), True
    if name == "skimage":
        import skimage.data

        root = pathlib.Path(skimage.data.__file__).parent
        return [ImageRecord((root / f).resolve(), f, None) for f in SKIMAGE_PHOTOS], False
    raise DataError(f"unknown built-in data source 'builtin:{name}'; known: builtin:textiles, builtin:skimage")


def _scan_folder(root: pathlib.Path, labels_from_folders: bool) -> list[ImageRecord]:
    records = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                path = pathlib.Path(dirpath, f).resolve()
                rel = pathlib.Path(dirpath, f).relative_to(root)
                label = rel.parts[0] if labels_from_folders and len(rel.parts) > 1 else None
                if labels_from_folders and label is None:
                    raise DataError(
                        f"{root}: image {rel} lies directly in the source folder, but labels are taken from "
                        f"sub-folder names (class_name/image.jpg); move it into a class folder"
                    )
                records.append(ImageRecord(path, rel.as_posix(), label))
    return records


def _read_list(list_file: pathlib.Path) -> list[ImageRecord]:
    records, missing = [], []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry, _, label = line.partition("\t")
        path = (list_file.parent / entry.strip()).resolve()
        if not path.is_file():
            missing.append(f"line {lineno}: {entry.strip()}")
        records.append(ImageRecord(path, entry.strip(), label.strip() or None))
    if missing:
        raise DataError(f"{list_file}: {len(missing)} listed file(s) do not exist: " + "; ".join(missing[:10]))
    return records


def list_images(source: str | os.PathLike, labels_from_folders: bool = False) -> list[ImageRecord]:
    """The images of one source (see the module docstring), in a fixed order.

    Raises:
        DataError: the source does not exist, lists missing files, or holds no image.
    """
    text = str(source)
    if text.startswith("builtin:"):
        records, _ = _builtin(text.removeprefix("builtin:"))
    else:
        path = pathlib.Path(source)
        if path.is_dir():
            records = _scan_folder(path, labels_from_folders)
        elif path.is_file():
            records = _read_list(path)
        else:
            raise DataError(f"data source {text} does not exist (expected a folder, a list file or builtin:NAME)")
    if not records:
        raise DataError(f"data source {text} holds no image (looked for files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return records


def split_of(name: str, holdout_fraction: float) -> str:
    """'holdout' or 'train' for an image name, from a hash of the name: stable across machines and orders."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return "holdout" if (h % 1_000_000) < holdout_fraction * 1_000_000 else "train"


def find_unreadable(records: Sequence[ImageRecord]) -> list[tuple[ImageRecord, str]]:
    """Every record whose file cannot be fully decoded, with the reason."""
    bad = []
    for r in records:
        try:
            with Image.open(r.path) as im:
                im.load()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            bad.append((r, f"{type(err).__name__}: {err}"))
    return bad


def drop_unreadable(records: list[ImageRecord], skip_unreadable: bool, what: str) -> list[ImageRecord]:
    """Decode every image once; stop (default) or skip with one warning when some cannot be read."""
    bad = find_unreadable(records)
    if not bad:
        return records
    listing = "; ".join(f"{r.path} ({why})" for r, why in bad[:20]) + (" ..." if len(bad) > 20 else "")
    if not skip_unreadable:
        raise DataError(
            f"{len(bad)} of {len(records)} images in {what} cannot be read: {listing}. "
            f"Remove or fix them, or pass --skip-unreadable to leave them out."
        )
    kept = [r for r in records if r not in {b for b, _ in bad}]
    if not kept:
        raise DataError(f"none of the {len(records)} images in {what} can be read: {listing}")
    warnings.warn(f"skipping {len(bad)} unreadable image(s) of {len(records)} in {what}: {listing}", stacklevel=2)
    return kept


class ImageDataset(torch.utils.data.Dataset):
    """CLIP-preprocessed images of a list of records.

    Items are `(image, index)`: a (3, H, W) float32 tensor normalised as CLIP expects, and the item's
    position, which keys the teacher-embedding cache and the labels.
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int | tuple[int, int], class_names=None):
        self.records = list(records)
        self.image_size = image_size
        self.transform = clip_transform(image_size)
        labels = [r.label for r in self.records]
        if class_names is None and all(lb is not None for lb in labels):
            class_names = sorted(set(labels))
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and any(lb is not None for lb in labels):
            unknown = sorted({lb for lb in labels if lb not in self.class_names})
            if unknown:
                raise DataError(f"labels {unknown} are not among the class names {self.class_names}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.records[index].path)), index

    @property
    def labels(self) -> torch.Tensor | None:
        """(N,) int64 class indices into `class_names`, or None when some image has no label."""
        if self.class_names is None or any(r.label is None for r in self.records):
            return None
        return torch.tensor([self.class_names.index(r.label) for r in self.records], dtype=torch.int64)

    def file_keys(self) -> list[str]:
        """One key per image that changes when the file does: absolute path, size and mtime (ns)."""
        keys = []
        for r in self.records:
            st = r.path.stat()
            keys.append(f"{r.path}|{st.st_size}|{st.st_mtime_ns}")
        return keys


def build_dataset(
    sources: Sequence[str | os.PathLike],
    image_size: int | tuple[int, int],
    split: str = "all",
    holdout_fraction: float = 0.2,
    labels_from_folders: bool = False,
    skip_unreadable: bool = False,
    class_names: Sequence[str] | None = None,
) -> ImageDataset:
    """All images of `sources` (the chosen split), checked readable, as an `ImageDataset`.

    Raises:
        DataError: see the module docstring; also when the split leaves no image.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= holdout_fraction <= 1.0:
        raise ValueError(f"holdout_fraction must lie in [0, 1], got {holdout_fraction}")
    records = []
    for source in sources:
        found = list_images(source, labels_from_folders)
        if split != "all":
            found = [r for r in found if split_of(r.name, holdout_fraction) == split]
            if not found:
                raise DataError(f"the {split} split (holdout fraction {holdout_fraction}) of {source} is empty")
        records += drop_unreadable(found, skip_unreadable, str(source))
    return ImageDataset(records, image_size, class_names)
