"""The frozen open_clip teacher: loading it, its identity, its image embeddings and their on-disk cache.

The cache (`cached_teacher_embeddings`) keeps the teacher's embedding of every image, keyed by the file's
path, size and modification time and by the teacher's identity (a hash of its image tower's weights and
input size), so later epochs and later runs do not run the teacher again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import ImageDataset
from .distributed import Dist
from .files import save_safetensors


def load_teacher_model(spec: str, weights: str | None) -> tuple[nn.Module, str]:
    """An open_clip model by name, or from a model config file (.json, registered under its file stem).

    Returns:
        The model (eval mode, as `waveclip.interop.load_teacher` gives it) and its open_clip name.

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: the weights are not on this machine.
    """
    import open_clip

    from waveclip.interop import load_teacher

    name = spec
    if spec.endswith(".json"):
        path = pathlib.Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"teacher config {spec} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    try:
        return load_teacher(name, weights), name
    except RuntimeError as err:  # weights that are not on this machine
        raise ValueError(str(err)) from err


def class_embeddings(teacher: nn.Module, name: str, class_names: Sequence[str]) -> Tensor:
    """(K, D) unit text embeddings of the class names through the teacher's text tower and tokenizer."""
    import open_clip

    from waveclip.zeroshot import class_text_embeddings

    return class_text_embeddings(teacher, open_clip.get_tokenizer(name), list(class_names)).float()


def teacher_identity(teacher: nn.Module, name: str, image_size: tuple[int, int]) -> str:
    """A hash of what the teacher's image embeddings depend on: its image tower's weights and the input size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{image_size}".encode())
    for key, value in sorted(teacher.visual.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_embed(teacher: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) student-size images -> (B, D) unit teacher embeddings (resized to the teacher's input)."""
    size = tuple(teacher.visual.image_size)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.normalize(teacher.encode_image(images).float(), dim=-1)


@torch.no_grad()
def embed_all(teacher: nn.Module, dataset, indices: list[int], batch_size: int, num_workers: int, device, autocast):
    """Teacher embeddings of `dataset[indices]`, (len(indices), D) float32 on the CPU."""
    from tqdm.auto import tqdm

    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    out = []
    for images, _ in tqdm(loader, desc="teacher embeddings", leave=False):
        with autocast():
            out.append(teacher_embed(teacher, images.to(device)).cpu())
    return torch.cat(out)


def cached_teacher_embeddings(
    cache_dir: str, identity: str, dataset: ImageDataset, compute: Callable[[list[int]], Tensor], rank: Dist
) -> tuple[Tensor, int]:
    """(N, D) teacher embeddings of the dataset, reading what the cache has and adding what it lacks.

    The cache is one safetensors file per teacher identity: the embeddings and, in its metadata, the key
    (path|size|mtime) of every row. The main process computes the missing rows (`compute(indices)`) and
    rewrites the file; the others wait and read it.

    Returns:
        The embeddings and the number of rows computed now.
    """
    from safetensors import safe_open

    path = pathlib.Path(cache_dir) / f"teacher-{identity}.safetensors"
    keys = dataset.file_keys()

    def read() -> tuple[dict[str, int], Tensor | None]:
        if not path.is_file():
            return {}, None
        with safe_open(str(path), "pt") as f:
            rows = {k: i for i, k in enumerate(json.loads(f.metadata()["keys"]))}
            return rows, f.get_tensor("embeddings")

    rows, table = read()
    missing = [i for i, k in enumerate(keys) if k not in rows]
    if missing and rank.main:
        fresh = compute(missing)
        all_keys = list(rows) + [keys[i] for i in missing]
        table = fresh if table is None else torch.cat([table, fresh])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_safetensors({"embeddings": table.contiguous()}, tmp, metadata={"keys": json.dumps(all_keys)})
        os.replace(tmp, path)
    if missing:
        rank.barrier()
        rows, table = read()
    return table[[rows[k] for k in keys]], len(missing)
