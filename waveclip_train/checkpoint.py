"""Training checkpoints: everything a run needs to continue exactly where it stopped.

`out/checkpoints/step-<8 digits>/` holds the student (`save_pretrained`: model.safetensors, config.json),
`trainer.safetensors` (optimizer state, schedule, gradient scaler, step and the run's key) and one
`rng-<rank>.safetensors` per process. A checkpoint is written under a temporary name and renamed, so a
folder without the `.tmp` suffix is always complete. Resuming checks that the run's key (world size,
batch, accumulation, seed, step count, data and teacher) is the one the checkpoint was written with.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil

import numpy as np
import torch
from torch import Tensor

from .distributed import Dist
from .files import save_model, save_safetensors

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer.safetensors"


def checkpoint_path(out: pathlib.Path, step: int) -> pathlib.Path:
    return out / CHECKPOINT_DIR / f"step-{step:08d}"


def list_checkpoints(out: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoint folders under `out`, oldest first."""
    found = (out / CHECKPOINT_DIR).glob("step-*")
    return sorted(p for p in found if p.is_dir() and not p.name.endswith(".tmp"))


def latest_checkpoint(out: pathlib.Path) -> pathlib.Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def resume_path(resume: str | None, out: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint folder a run continues from: `resume` itself, the latest under `out` for "auto"
    (None when there is none yet), or None for a fresh run."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(out)
    path = pathlib.Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"cannot resume from {resume}: it is not a checkpoint folder ({TRAINER_STATE} missing)")
    return path


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """The torch, CUDA, numpy and Python generator states, as tensors and JSON-able metadata."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"python": random.getstate(), "numpy": [np_state[0], *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _trainer_state(optimizer, scheduler, scaler, step: int, run_key: dict) -> tuple[dict[str, Tensor], dict]:
    """The optimizer's tensors, and everything else as JSON-able metadata."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {
        "step": step,
        "run": run_key,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    return tensors, meta


def save_checkpoint(path: pathlib.Path, model, optimizer, scheduler, scaler, step: int, run_key: dict, rank: Dist):
    """Write the checkpoint folder `path` (see the module docstring); every process calls it."""
    tmp = path.with_name(path.name + ".tmp")
    if rank.main:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp)
        tensors, meta = _trainer_state(optimizer, scheduler, scaler, step, run_key)
        save_safetensors(tensors, tmp / TRAINER_STATE, metadata={"trainer": json.dumps(meta)})
    rank.barrier()
    rng, rng_meta = rng_state()
    save_safetensors(rng, tmp / f"rng-{rank.rank}.safetensors", metadata={"rng": json.dumps(rng_meta)})
    rank.barrier()
    if rank.main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    rank.barrier()


def load_checkpoint(path: pathlib.Path, model, optimizer, scheduler, scaler, run_key: dict, rank: Dist) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from.

    Raises:
        ValueError: the checkpoint was written by a run with another key.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path / TRAINER_STATE), "pt") as f:
        meta = json.loads(f.metadata()["trainer"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    changed = {k: (meta["run"].get(k), v) for k, v in run_key.items() if meta["run"].get(k) != v}
    if changed:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"cannot resume exactly from {path}: the run differs ({detail})")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    opt_state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = value.to(device)
    for key, value in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"] is not None:
        scaler.load_state_dict(meta["scaler"])
    with safe_open(str(path / f"rng-{rank.rank}.safetensors"), "pt") as f:
        set_rng_state({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["rng"]))  # noqa: SIM118
    return int(meta["step"])


def prune_checkpoints(out: pathlib.Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0: delete none)."""
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
