"""Distil a WaveCLIP student from a frozen open_clip teacher.

    waveclip distill --teacher ViT-B-16 --teacher-weights vit_b_16.safetensors --data photos/ --out runs/student
    torchrun --nproc_per_node 2 -m waveclip_cli.distill --teacher ViT-B-16 ... (the same options, DDP)

The student starts as `WaveCLIP.from_open_clip(teacher)`. For every image the loss is, summed over exits s,
`w_s * (1 - cos(student_s, teacher))`, plus, when class names are given, `kl_weight * T^2 * w_s *
KL(teacher || student_s)` on the zero-shot logits over the classes' text embeddings at temperature T.
AdamW with two learning rates: `--lr-new` for the embeddings the teacher does not have (stage projections,
level and position embeddings, class tokens), `--lr` for the copied trunk; linear warm-up, then cosine
decay. Autocast (bf16/fp16) on the GPU, gradient accumulation, periodic checkpoints (safetensors: model,
optimizer, schedule, RNG, step) from which `--resume` continues exactly where the run stopped.

Under torchrun each process takes its shard of every global batch (a seeded DistributedSampler) and
DistributedDataParallel averages the gradients (gloo on the CPU, NCCL on the GPU): N processes with batch
B follow the same trajectory as one process with batch N*B, up to floating-point summation order.

With `--teacher-cache DIR`, the teacher's embeddings are computed once and kept on disk, keyed by each
file's path, size and modification time and by the teacher's identity (a hash of its weights and input
size), so later epochs and later runs do not run the teacher again.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from waveclip.config import WaveCLIPConfig

from .data import DataError, ImageDataset, add_data_arguments, build_dataset

# Parameters the teacher does not have (or has in another form): they get --lr-new.
NEW_EMBEDDINGS = ("stage_proj.", "class_embedding", "positional_embedding", "level_embedding")
NO_DECAY = ("class_embedding", "positional_embedding", "level_embedding")
CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer.safetensors"


@dataclasses.dataclass
class DistillOptions:
    """Everything a distillation run depends on; the CLI fills it from its flags."""

    data: Sequence[str]
    out: str
    teacher: str = "ViT-B-16"  # open_clip model name, or a path to an open_clip model config (.json)
    teacher_weights: str | None = None  # local checkpoint file or cached pretrained tag; None = random weights
    preset: str = "waveclip-vit-b-16"  # student preset; the trunk sizes always come from the teacher
    image_size: int | None = None  # student input size (default: the preset's)
    levels: int | None = None
    grid: int | None = None
    split: str = "all"
    holdout_fraction: float = 0.2
    labels_from_folders: bool = False
    skip_unreadable: bool = False
    epochs: int = 1
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 32  # per process, per micro-batch
    accum_steps: int = 1
    lr: float = 1e-5  # trunk
    lr_new: float = 1e-4  # new embeddings
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to this fraction of each learning rate
    max_grad_norm: float = 1.0  # 0 disables clipping
    exit_weights: Sequence[float] | None = None  # w_s per exit (default: 1 each)
    class_names: Sequence[str] | None = None  # enables the KL term
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    device: str = "auto"
    impl: str = "auto"
    seed: int = 0
    num_workers: int = 2
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint folder, or "auto" for the latest in out/checkpoints
    teacher_cache: str | None = None
    eval_images: int = 512  # most images in the before/after cosine evaluation
    progress: bool = True


# ------------------------------------------------------------------------------------ distributed


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, x: Tensor) -> Tensor:
        """Average a tensor over the processes."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x


def init_distributed(device_type: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded shuffle, no padding) that can start part-way through an epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` indices of this process's share of the epoch."""
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


# ---------------------------------------------------------------------------------------- teacher


def load_teacher_model(spec: str, weights: str | None) -> tuple[nn.Module, str]:
    """An open_clip model by name, or from a model config file (.json, registered under its file stem)."""
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
    cache_dir: str, identity: str, dataset: ImageDataset, compute, rank: Dist
) -> tuple[Tensor, int]:
    """(N, D) teacher embeddings of the dataset, reading what the cache has and adding what it lacks.

    The cache is one safetensors file per teacher identity: the embeddings and, in its metadata, the key
    (path|size|mtime) of every row. The main process computes the missing rows and rewrites the file;
    the others wait and read it.

    Returns:
        The embeddings and the number of rows computed now.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

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
        save_file({"embeddings": table.contiguous()}, str(tmp), metadata={"keys": json.dumps(all_keys)})
        os.replace(tmp, path)
    if missing:
        rank.barrier()
        rows, table = read()
    return table[[rows[k] for k in keys]], len(missing)


# ------------------------------------------------------------------------------------------- loss


def distill_loss(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor,
    class_embeddings: Tensor | None = None,
    logit_scale: float = 100.0,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The distillation loss of a batch.

    Args:
        student: (B, S, D) unit exit embeddings.
        teacher: (B, D) unit teacher embeddings.
        weights: (S,) per-exit weights w_s.
        class_embeddings: (K, D) unit class text embeddings; enables the KL term.
        logit_scale: multiplies cosine similarities into logits (the teacher's).
        kl_weight, temperature: the KL term's weight and softmax temperature.

    Returns:
        The scalar loss, the (S,) mean of 1 - cos per exit, and the (S,) mean KL per exit (or None).
    """
    student, teacher = student.float(), teacher.float()
    cos_loss = (1 - (student * teacher[:, None]).sum(-1)).mean(0)
    loss = (weights * cos_loss).sum()
    kl = None
    if class_embeddings is not None:
        t_logits = logit_scale * teacher @ class_embeddings.T / temperature
        s_logits = logit_scale * student @ class_embeddings.T / temperature
        t_logp = F.log_softmax(t_logits, dim=-1)[:, None]
        kl = (t_logp.exp() * (t_logp - F.log_softmax(s_logits, dim=-1))).sum(-1).mean(0)
        loss = loss + kl_weight * temperature**2 * (weights * kl).sum()
    return loss, cos_loss.detach(), None if kl is None else kl.detach()


# -------------------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, lr: float, lr_new: float, weight_decay: float) -> list[dict]:
    """AdamW groups: new embeddings vs trunk, each with and without weight decay (biases, norms, embeddings)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = name.startswith(NEW_EMBEDDINGS)
        decay = p.dim() >= 2 and not name.startswith(NO_DECAY)
        groups.setdefault((new, decay), []).append(p)
    if not any(new for new, _ in groups):
        raise ValueError(f"the student has none of the new embeddings {NEW_EMBEDDINGS}")
    return [
        {
            "params": params,
            "lr": lr_new if new else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": ("new" if new else "trunk") + ("" if decay else "_no_decay"),
        }
        for (new, decay), params in sorted(groups.items(), reverse=True)
    ]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------ checkpoints


def _rng_state() -> tuple[dict[str, Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"python": random.getstate(), "numpy": [np_state[0], *np_state[2:]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(path: pathlib.Path, model, optimizer, scheduler, scaler, step: int, run_key: dict, rank: Dist):
    """A checkpoint folder: the model (save_pretrained), `trainer.safetensors` with the optimizer state,
    and one `rng-<rank>.safetensors` per process. Written under a temporary name, then renamed."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    if rank.main:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        opt = optimizer.state_dict()
        tensors, state_meta = {}, {}
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous().cpu()
                else:
                    state_meta[f"{idx}.{key}"] = value
        meta = {
            "step": step,
            "run": run_key,
            "param_groups": opt["param_groups"],
            "optimizer_scalars": state_meta,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        save_file(tensors, str(tmp / TRAINER_STATE), metadata={"trainer": json.dumps(meta)})
    rank.barrier()
    rng, rng_meta = _rng_state()
    save_file(rng, str(tmp / f"rng-{rank.rank}.safetensors"), metadata={"rng": json.dumps(rng_meta)})
    rank.barrier()
    if rank.main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    rank.barrier()


def load_checkpoint(path: pathlib.Path, model, optimizer, scheduler, scaler, run_key: dict, rank: Dist) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
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
    state = load_file(str(path / "model.safetensors"), device=str(device))
    model.load_state_dict(state)
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
    rng_file = path / f"rng-{rank.rank}.safetensors"
    with safe_open(str(rng_file), "pt") as f:
        _set_rng_state({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["rng"]))  # noqa: SIM118
    return int(meta["step"])


def latest_checkpoint(out: pathlib.Path) -> pathlib.Path | None:
    found = sorted(p for p in (out / CHECKPOINT_DIR).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return found[-1] if found else None


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def exit_cosines(model, dataset, teacher_emb: Tensor, batch_size: int, device, autocast) -> dict[str, list[float]]:
    """Per exit, the mean student-teacher cosine, raw and centred (both minus the teacher's mean embedding,
    which shows how much of the image-to-image variation the student reproduces)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    student = []
    was_training = model.training
    model.eval()
    for images, _ in loader:
        with autocast():
            student.append(model(images.to(device)).float().cpu())
    model.train(was_training)
    z, t = torch.cat(student), teacher_emb
    mean = t.mean(0)
    raw = (z * t[:, None]).sum(-1).mean(0)
    centred = F.cosine_similarity(z - mean, (t - mean)[:, None], dim=-1).mean(0)
    return {"cosine": raw.tolist(), "centred_cosine": centred.tolist()}


# ---------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class DistillResult:
    out: pathlib.Path
    steps: int
    final_loss: float
    before: dict | None  # exit_cosines before training (None when resumed)
    after: dict | None  # exit_cosines after training (main process only)
    teacher_random: bool
    seconds: float
    model: nn.Module  # the trained student (this process's copy)


def _device(options: DistillOptions) -> torch.device:
    if options.device != "auto":
        return torch.device(options.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _precision(options: DistillOptions, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    choice = options.precision
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    if choice not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {options.precision!r}")
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def student_config(options: DistillOptions, teacher: nn.Module, teacher_name: str) -> WaveCLIPConfig:
    """The preset, with the teacher's trunk sizes and the size overrides."""
    from waveclip.interop import trunk_config

    overrides = dict(trunk_config(teacher), teacher=teacher_name)
    if options.image_size is not None:
        overrides["image_size"] = options.image_size
    if options.grid is not None:
        overrides["grid"] = options.grid
    if options.levels is not None:
        overrides["levels"] = options.levels
        overrides["thresholds"] = (0.5,) * options.levels
    return WaveCLIPConfig.from_preset(options.preset, **overrides)


def distill(options: DistillOptions) -> DistillResult:
    """Run (or resume) a distillation; writes the student into `options.out`.

    Raises:
        DataError: bad data (see waveclip_train.data), before any step.
        ValueError: inconsistent options, or a checkpoint that does not match the run.
    """
    from tqdm.auto import tqdm

    from waveclip.model import WaveCLIP

    t0 = time.perf_counter()
    device = _device(options)
    rank = init_distributed(device.type)
    if device.type == "cuda" and rank.world > 1:
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    amp_dtype = _precision(options, device)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def say(*msg):
        if rank.main:
            print(*msg, flush=True)

    if options.batch_size < 1 or options.accum_steps < 1:
        raise ValueError("batch_size and accum_steps must be >= 1")
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    np.random.seed(options.seed)

    # Data first: a bad folder stops the run before a large teacher is loaded.
    image_size = options.image_size or WaveCLIPConfig.from_preset(options.preset).image_size
    dataset = build_dataset(
        options.data,
        image_size,
        options.split,
        options.holdout_fraction,
        options.labels_from_folders,
        options.skip_unreadable,
    )

    # Teacher and student.
    teacher, teacher_name = load_teacher_model(options.teacher, options.teacher_weights)
    teacher = teacher.eval().requires_grad_(False)
    teacher_random = options.teacher_weights is None
    say(
        f"teacher: open_clip {teacher_name} with "
        + ("RANDOM weights (no --teacher-weights given)" if teacher_random else f"weights {options.teacher_weights}")
    )
    class_emb, logit_scale = None, float(teacher.logit_scale.exp())
    if options.class_names:
        import open_clip

        from waveclip.zeroshot import class_text_embeddings

        tokenizer = open_clip.get_tokenizer(teacher_name)
        class_emb = class_text_embeddings(teacher, tokenizer, list(options.class_names)).float().to(device)
        say(f"KL term on zero-shot logits over {len(options.class_names)} classes, logit scale {logit_scale:.2f}")
    teacher = teacher.to(device)
    config = student_config(options, teacher, teacher_name)
    student = WaveCLIP.from_open_clip(teacher, config, impl=options.impl).to(device).float().train()
    say(
        f"student: {config.levels + 1} exits, {config.image_size[0]}x{config.image_size[1]} px, grid {config.grid}, "
        f"width {config.width}, {config.layers} layers, impl={options.impl}"
    )

    micro_per_epoch = (len(dataset) // rank.world) // options.batch_size
    steps_per_epoch = micro_per_epoch // options.accum_steps
    if steps_per_epoch == 0:
        raise DataError(
            f"{len(dataset)} images do not fill one optimizer step of {rank.world} process(es) x batch "
            f"{options.batch_size} x {options.accum_steps} accumulation steps"
        )
    total_steps = options.steps if options.steps is not None else options.epochs * steps_per_epoch
    say(
        f"data: {len(dataset)} images, global batch {rank.world * options.batch_size * options.accum_steps} "
        f"({rank.world} process(es) x {options.batch_size} x {options.accum_steps} accumulation), "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps"
    )
    if options.split == "train":
        eval_set = build_dataset(
            options.data,
            config.image_size,
            "holdout",
            options.holdout_fraction,
            options.labels_from_folders,
            options.skip_unreadable,
        )
        eval_what = "held-out images"
    else:
        eval_set, eval_what = dataset, "training images"
    eval_set = ImageDataset(eval_set.records[: options.eval_images], config.image_size)

    # Teacher embeddings: computed on the fly during training, or once and cached on disk.
    identity = teacher_identity(teacher, teacher_name, config.image_size)

    def teacher_targets(ds: ImageDataset, what: str) -> Tensor:
        def compute(idx: list[int]) -> Tensor:
            return embed_all(teacher, ds, idx, options.batch_size, options.num_workers, device, autocast)

        if not options.teacher_cache:
            return compute(list(range(len(ds))))
        emb, fresh = cached_teacher_embeddings(options.teacher_cache, identity, ds, compute, rank)
        say(f"teacher cache ({what}): {len(ds) - fresh} of {len(ds)} embeddings read, {fresh} computed")
        return emb

    targets = teacher_targets(dataset, "training images") if options.teacher_cache else None
    eval_targets = teacher_targets(eval_set, eval_what)

    # Loss pieces.
    S = config.num_stages
    weights = (
        torch.ones(S) if options.exit_weights is None else torch.tensor(list(options.exit_weights), dtype=torch.float32)
    )
    if weights.shape != (S,):
        raise ValueError(f"exit_weights needs {S} values (one per exit), got {list(options.exit_weights)}")
    weights = weights.to(device)

    # Optimizer, schedule, DDP.
    groups = param_groups(student, options.lr, options.lr_new, options.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, options.warmup_steps, options.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    run_key = {
        "world": rank.world,
        "batch_size": options.batch_size,
        "accum_steps": options.accum_steps,
        "seed": options.seed,
        "total_steps": total_steps,
        "data": hashlib.blake2b("\n".join(str(r.path) for r in dataset.records).encode(), digest_size=16).hexdigest(),
        "teacher": identity,
    }
    out = pathlib.Path(options.out)
    start_step = 0
    resume = latest_checkpoint(out) if options.resume == "auto" else options.resume
    before = None
    if resume:
        start_step = load_checkpoint(pathlib.Path(resume), student, optimizer, scheduler, scaler, run_key, rank)
        say(f"resumed from {resume} at step {start_step}")
    elif rank.main:
        before = exit_cosines(student, eval_set, eval_targets, options.batch_size, device, autocast)
        say(f"before: cosine to the teacher per exit on {len(eval_set)} {eval_what}: {_fmt(before['cosine'])}")
    model = student
    if rank.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student, device_ids=ids)

    sampler = ResumableSampler(dataset, rank.world, rank.rank, options.seed)
    log_path = out / "train_log.csv"
    if rank.main:
        out.mkdir(parents=True, exist_ok=True)
        _start_log(log_path, S, class_emb is not None, start_step)
    step, loss_value = start_step, float("nan")
    bar = tqdm(total=total_steps, initial=start_step, disable=not (rank.main and options.progress), desc="distill")
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(within * options.accum_steps * options.batch_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=options.batch_size,
            sampler=sampler,
            num_workers=options.num_workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        batches = iter(loader)
        for _ in range(within, steps_per_epoch):
            if step >= total_steps:
                break
            sums = torch.zeros(1 + 2 * S, device=device)
            for micro in range(options.accum_steps):
                images, index = next(batches)
                images = images.to(device, non_blocking=True)
                if targets is not None:
                    target = targets[index].to(device)
                else:
                    with torch.no_grad(), autocast():
                        target = teacher_embed(teacher, images)
                sync = micro == options.accum_steps - 1 or rank.world == 1  # DDP averages on the last one
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast():
                        exits = model(images)
                    loss, cos_loss, kl = distill_loss(
                        exits, target, weights, class_emb, logit_scale, options.kl_weight, options.kl_temperature
                    )
                    scaled = loss / options.accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                parts = [loss.detach()[None], cos_loss, kl if kl is not None else torch.zeros_like(cos_loss)]
                sums += torch.cat(parts) / options.accum_steps
            if scaler is not None:
                scaler.unscale_(optimizer)
            if options.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(student.parameters(), options.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            sums = rank.mean(sums).cpu()
            loss_value = float(sums[0])
            if rank.main:
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                _append_log(log_path, step, epoch, lrs, sums, S, class_emb is not None)
                bar.set_postfix(
                    {"loss": f"{loss_value:.4f}"} | {f"e{s}": f"{float(sums[1 + s]):.4f}" for s in range(S)}
                )
                bar.update(1)
            if options.save_every and step % options.save_every == 0 and step < total_steps:
                _checkpoint(out, student, optimizer, scheduler, scaler, step, run_key, rank, options.keep_checkpoints)
        del batches, loader
    bar.close()
    _checkpoint(out, student, optimizer, scheduler, scaler, step, run_key, rank, options.keep_checkpoints)
    after = None
    if rank.main:
        student.save_pretrained(out)
        after = exit_cosines(student, eval_set, eval_targets, options.batch_size, device, autocast)
        say(f"after:  cosine to the teacher per exit on {len(eval_set)} {eval_what}: {_fmt(after['cosine'])}")
        summary = {
            "teacher": teacher_name,
            "teacher_weights": options.teacher_weights or "random",
            "student_config": config.to_dict(),
            "steps": step,
            "final_loss": loss_value,
            "eval_set": f"{len(eval_set)} {eval_what}",
            "before": before,
            "after": after,
            "seconds": time.perf_counter() - t0,
            "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        }
        (out / "distill_summary.json").write_text(json.dumps(summary, indent=2))
        plot_log(log_path, out / "train_log.png")
        say(f"wrote the student to {out} ({step} steps, {time.perf_counter() - t0:.0f} s)")
    rank.barrier()
    return DistillResult(out, step, loss_value, before, after, teacher_random, time.perf_counter() - t0, student)


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"exit {s} {v:.4f}" for s, v in enumerate(values))


def _checkpoint(out, student, optimizer, scheduler, scaler, step, run_key, rank, keep: int) -> None:
    ckpt_dir = out / CHECKPOINT_DIR
    if rank.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank.barrier()
    save_checkpoint(ckpt_dir / f"step-{step:08d}", student, optimizer, scheduler, scaler, step, run_key, rank)
    if rank.main and keep > 0:
        for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old)


def _log_header(S: int, with_kl: bool) -> list[str]:
    return (
        ["step", "epoch", "lr_new", "lr_trunk", "loss"]
        + [f"cos_loss_{s}" for s in range(S)]
        + ([f"kl_{s}" for s in range(S)] if with_kl else [])
    )


def _start_log(path: pathlib.Path, S: int, with_kl: bool, start_step: int) -> None:
    """A fresh log, or on resume the old one cut back to the resumed step."""
    rows = []
    if start_step and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if int(r[0]) <= start_step]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_log_header(S, with_kl))
        w.writerows(rows)


def _append_log(path, step, epoch, lrs, sums, S, with_kl) -> None:
    values = sums.tolist()
    row = [step, epoch, f"{lrs.get('new', float('nan')):.6g}", f"{lrs.get('trunk', float('nan')):.6g}"]
    row += [f"{v:.9g}" for v in values[: 1 + S]] + ([f"{v:.9g}" for v in values[1 + S :]] if with_kl else [])
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(row)


def plot_log(log_csv: pathlib.Path, png: pathlib.Path) -> None:
    """1 - cos per exit (and the total loss) against the step, from train_log.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    exits = [k for k in rows[0] if k.startswith("cos_loss_")]
    for k in exits:
        ax.plot(steps, [float(r[k]) for r in rows], lw=1.2, label=f"exit {k.removeprefix('cos_loss_')}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("1 - cos(student, teacher), batch mean")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `waveclip distill` (and `python -m waveclip_cli.distill`)."""
    d = DistillOptions(data=[], out="")
    t = parser.add_argument_group("teacher and student")
    t.add_argument("--teacher", default=d.teacher, help="open_clip model name or model config .json (default ViT-B-16)")
    t.add_argument("--teacher-weights", help="local checkpoint file or cached pretrained tag (default: random weights)")
    t.add_argument("--preset", default=d.preset, help=f"student preset; trunk sizes come from the teacher ({d.preset})")
    t.add_argument("--image-size", type=int, help="student input size in pixels (default: the preset's)")
    t.add_argument("--levels", type=int, help="wavelet levels L (default: the preset's)")
    t.add_argument("--grid", type=int, help="token grid per stage (default: the preset's)")
    t.add_argument("--impl", default=d.impl, help="kernel implementation of the student (default: auto)")
    add_data_arguments(parser)
    o = parser.add_argument_group("optimisation")
    o.add_argument("--out", required=True, help="output folder: the student, checkpoints/, train_log.csv")
    o.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    o.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help=f"per process and micro-batch ({d.batch_size})")
    o.add_argument("--accum-steps", type=int, default=d.accum_steps, help="micro-batches per optimizer step (1)")
    o.add_argument("--lr", type=float, default=d.lr, help=f"trunk learning rate ({d.lr})")
    o.add_argument("--lr-new", type=float, default=d.lr_new, help=f"learning rate of the new embeddings ({d.lr_new})")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay ({d.weight_decay})")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (0)")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor / peak lr (0)")
    o.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping, 0: off (1.0)")
    o.add_argument("--exit-weights", type=_floats, help="comma-separated w_s per exit (default: 1 each)")
    o.add_argument(
        "--class-names",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="comma-separated class names: adds the KL term on zero-shot logits",
    )
    o.add_argument("--kl-weight", type=float, default=d.kl_weight, help=f"weight of the KL term ({d.kl_weight})")
    o.add_argument("--kl-temperature", type=float, default=d.kl_temperature, help="softmax temperature of the KL term")
    r = parser.add_argument_group("run")
    r.add_argument(
        "--precision",
        default=d.precision,
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast: auto = bf16 on GPU, fp32 on CPU",
    )
    r.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and RNGs (0)")
    r.add_argument("--num-workers", type=int, default=d.num_workers, help=f"data loader workers ({d.num_workers})")
    r.add_argument(
        "--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: only at the end)"
    )
    r.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (2; 0: all)")
    r.add_argument("--resume", help="checkpoint folder to continue from, or 'auto' for the latest under --out")
    r.add_argument("--teacher-cache", help="folder caching the teacher's embeddings across epochs and runs")
    r.add_argument("--eval-images", type=int, default=d.eval_images, help="images in the before/after cosine check")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> DistillOptions:
    fields = {f.name for f in dataclasses.fields(DistillOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return DistillOptions(**values, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """`waveclip distill`: returns the exit code."""
    try:
        distill(options_from_args(args))
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="waveclip distill", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
