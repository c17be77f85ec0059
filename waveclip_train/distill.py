"""Distil a WaveCLIP student from a frozen open_clip teacher.

`distill(options)` reads top to bottom: `setup` (data, teacher, student, teacher targets, optimizer,
resume) -> `train_step` for every optimizer step -> `after_step` (log row, periodic checkpoint) ->
`finish` (last checkpoint, the student, evaluation, summary).

The student starts as `WaveCLIP.from_open_clip(teacher)`. The loss is `waveclip_train.loss.distill_loss`:
every exit toward the teacher's embedding, plus a KL term on zero-shot logits when class names are
given. AdamW with two learning rates (`waveclip_train.optim`). Autocast: bf16 on the GPU by default, so
that the student's attention runs the fused kernels (impl "auto" is Triton on CUDA) in bf16 forward and
backward; fp32 on the CPU. Gradient accumulation; periodic checkpoints (`waveclip_train.checkpoint`)
from which `resume` continues exactly where a run stopped. Under torchrun, N processes with batch B
follow the trajectory of one process with batch N*B, up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import pathlib
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from waveclip.config import WaveCLIPConfig

from .checkpoint import checkpoint_path, load_checkpoint, prune_checkpoints, resume_path, save_checkpoint
from .data import DataError, ImageDataset, build_dataset
from .distributed import Dist, ResumableSampler, init_distributed, wrap_model
from .evaluate import exit_cosines, format_cosines
from .files import save_model
from .loss import distill_loss, exit_weights
from .optim import build_optimizer, current_lrs
from .options import DistillOptions
from .teacher import (
    cached_teacher_embeddings,
    class_embeddings,
    embed_all,
    load_teacher_model,
    teacher_embed,
    teacher_identity,
)
from .train_log import StepRecord, append_log, losses_of, plot_log, start_log

LOG_NAME = "train_log.csv"
SUMMARY_NAME = "distill_summary.json"


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


# ------------------------------------------------------------------------------------------ step


@dataclasses.dataclass
class StepParts:
    """What one optimizer step uses."""

    model: nn.Module  # called on the images: the student, or DistributedDataParallel over it
    student: nn.Module  # the student itself (its gradients are clipped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
    targets: Callable[[Tensor, Tensor], Tensor]  # (images on the device, dataset indices) -> (B, D) teacher
    loss: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]  # (exits, targets) -> distill_loss
    autocast: Callable[[], contextlib.AbstractContextManager]
    max_grad_norm: float  # 0: no clipping
    rank: Dist


def train_step(parts: StepParts, micro_batches: list[tuple[Tensor, Tensor]], step: int, epoch: int) -> StepRecord:
    """One optimizer step over the micro-batches (gradient accumulation), with the learning rates the
    schedule gives step `step` (0-based); DistributedDataParallel averages the gradients on the last one.

    Returns:
        The record of optimizer step `step + 1`: the learning rates it applied, and its losses averaged
        over micro-batches and processes.
    """
    device = next(parts.student.parameters()).device
    n = len(micro_batches)
    sums = None
    for micro, (images, index) in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        with torch.no_grad(), parts.autocast():
            target = parts.targets(images, index)
        last = micro == n - 1 or parts.rank.world == 1
        with contextlib.nullcontext() if last else parts.model.no_sync():
            with parts.autocast():
                exits = parts.model(images)
            loss, cos_loss, kl = parts.loss(exits, target)
            scaled = loss / n
            (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
        values = torch.cat([loss.detach()[None], cos_loss, kl if kl is not None else torch.zeros_like(cos_loss)]) / n
        sums = values if sums is None else sums + values
    lrs = current_lrs(parts.optimizer)
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    if parts.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(parts.student.parameters(), parts.max_grad_norm)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    loss, cos, kl = losses_of(parts.rank.mean(sums).cpu(), len(cos_loss), kl is not None)
    return StepRecord(step + 1, epoch, lrs, loss, cos, kl)


# ----------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Trainer:
    """Everything `setup` builds; the loop advances `step`."""

    options: DistillOptions
    rank: Dist
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    teacher_name: str
    config: WaveCLIPConfig
    student: nn.Module
    parts: StepParts
    dataset: ImageDataset
    sampler: ResumableSampler
    eval_set: ImageDataset
    eval_what: str  # "held-out images" or "training images"
    eval_targets: Tensor  # teacher embeddings of eval_set
    run_key: dict  # what a resumed run must share with the checkpoint
    steps_per_epoch: int
    total_steps: int
    step: int  # optimizer steps done
    resumed_from: pathlib.Path | None
    out: pathlib.Path
    started: float  # time.perf_counter() at the start
    progress: object  # tqdm bar
    last_loss: float = float("nan")

    @property
    def log_path(self) -> pathlib.Path:
        return self.out / LOG_NAME


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: "auto" is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts (no-ops for fp32)."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def training_data(options: DistillOptions) -> ImageDataset:
    """The training images, decoded once up front (a bad source stops here, before a teacher is loaded)."""
    image_size = options.image_size or WaveCLIPConfig.from_preset(options.preset).image_size
    return build_dataset(
        options.data,
        image_size,
        options.split,
        options.holdout_fraction,
        options.labels_from_folders,
        options.skip_unreadable,
    )


def evaluation_data(options: DistillOptions, dataset: ImageDataset, image_size) -> tuple[ImageDataset, str]:
    """The images of the before/after check: the holdout split when training on the train split."""
    if options.split == "train":
        held_out = build_dataset(
            options.data,
            image_size,
            "holdout",
            options.holdout_fraction,
            options.labels_from_folders,
            options.skip_unreadable,
        )
        return ImageDataset(held_out.records[: options.eval_images], image_size), "held-out images"
    return ImageDataset(dataset.records[: options.eval_images], image_size), "training images"


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


def plan_steps(num_images: int, world: int, batch_size: int, accum_steps: int, epochs: int, steps: int | None):
    """(optimizer steps per epoch, total optimizer steps); every process drops its incomplete last batch."""
    per_epoch = (num_images // world) // batch_size // accum_steps
    if per_epoch == 0:
        raise DataError(
            f"{num_images} images do not fill one optimizer step of {world} process(es) x batch "
            f"{batch_size} x {accum_steps} accumulation steps"
        )
    return per_epoch, steps if steps is not None else epochs * per_epoch


def load_teacher_for(options: DistillOptions, rank: Dist, device: torch.device):
    """The frozen teacher on the device, its name, the class embeddings of the KL term (or None) and its
    logit scale."""
    teacher, name = load_teacher_model(options.teacher, options.teacher_weights)
    teacher = teacher.eval().requires_grad_(False)
    weights = f"weights {options.teacher_weights}" if options.teacher_weights else "RANDOM weights (no weights given)"
    rank.say(f"teacher: open_clip {name} with {weights}")
    classes, logit_scale = None, float(teacher.logit_scale.exp())
    if options.class_names:
        classes = class_embeddings(teacher, name, options.class_names).to(device)
        rank.say(f"KL term on zero-shot logits over {len(classes)} classes, logit scale {logit_scale:.2f}")
    return teacher.to(device), name, classes, logit_scale


def build_student(options: DistillOptions, teacher: nn.Module, teacher_name: str, device, rank: Dist):
    """The student config and the student, initialised from the teacher, fp32, in training mode."""
    from waveclip.model import WaveCLIP

    config = student_config(options, teacher, teacher_name)
    student = WaveCLIP.from_open_clip(teacher, config, impl=options.impl).to(device).float().train()
    rank.say(
        f"student: {config.levels + 1} exits, {config.image_size[0]}x{config.image_size[1]} px, grid {config.grid}, "
        f"width {config.width}, {config.layers} layers, impl={options.impl}"
    )
    return config, student


def teacher_targets(teacher, identity: str, ds: ImageDataset, what: str, options, device, autocast, rank: Dist):
    """(N, D) teacher embeddings of a dataset: computed now, or read from (and added to) the cache."""

    def compute(idx: list[int]) -> Tensor:
        return embed_all(teacher, ds, idx, options.batch_size, options.num_workers, device, autocast)

    if not options.teacher_cache:
        return compute(list(range(len(ds))))
    emb, fresh = cached_teacher_embeddings(options.teacher_cache, identity, ds, compute, rank)
    rank.say(f"teacher cache ({what}): {len(ds) - fresh} of {len(ds)} embeddings read, {fresh} computed")
    return emb


def run_key(options: DistillOptions, rank: Dist, dataset: ImageDataset, total_steps: int, identity: str) -> dict:
    """What a run must share with a checkpoint to continue it exactly."""
    paths = "\n".join(str(r.path) for r in dataset.records)
    return {
        "world": rank.world,
        "batch_size": options.batch_size,
        "accum_steps": options.accum_steps,
        "seed": options.seed,
        "total_steps": total_steps,
        "data": hashlib.blake2b(paths.encode(), digest_size=16).hexdigest(),
        "teacher": identity,
    }


def setup(options: DistillOptions) -> Trainer:
    """Data, teacher, student, teacher targets, loss, optimizer and schedule, and the resumed state if any."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    rank, device = init_distributed(resolve_device(options.device))
    amp_dtype = resolve_precision(options.precision, device)
    autocast = autocast_for(device, amp_dtype)
    seed_everything(options.seed)
    dataset = training_data(options)  # before the teacher: a bad source stops the run at once
    teacher, teacher_name, classes, logit_scale = load_teacher_for(options, rank, device)
    config, student = build_student(options, teacher, teacher_name, device, rank)
    per_epoch, total = plan_steps(
        len(dataset), rank.world, options.batch_size, options.accum_steps, options.epochs, options.steps
    )
    rank.say(
        f"data: {len(dataset)} images, global batch {rank.world * options.batch_size * options.accum_steps} "
        f"({rank.world} process(es) x {options.batch_size} x {options.accum_steps} accumulation), "
        f"{per_epoch} steps per epoch, {total} steps"
    )
    eval_set, eval_what = evaluation_data(options, dataset, config.image_size)
    identity = teacher_identity(teacher, teacher_name, config.image_size)
    embed = functools.partial(
        teacher_targets, teacher, identity, options=options, device=device, autocast=autocast, rank=rank
    )
    cached = embed(dataset, "training images") if options.teacher_cache else None
    eval_targets = embed(eval_set, eval_what)

    def targets(images: Tensor, index: Tensor) -> Tensor:
        return cached[index].to(device) if cached is not None else teacher_embed(teacher, images)

    loss = functools.partial(
        distill_loss,
        weights=exit_weights(options.exit_weights, config.num_stages, device),
        class_embeddings=classes,
        logit_scale=logit_scale,
        kl_weight=options.kl_weight,
        temperature=options.kl_temperature,
    )
    optimizer, scheduler = build_optimizer(
        student, options.lr, options.lr_new, options.weight_decay, total, options.warmup_steps, options.min_lr_ratio
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    key = run_key(options, rank, dataset, total, identity)
    out = pathlib.Path(options.out)
    resumed_from, step = resume_path(options.resume, out), 0
    if resumed_from is not None:
        step = load_checkpoint(resumed_from, student, optimizer, scheduler, scaler, key, rank)
        rank.say(f"resumed from {resumed_from} at step {step}")
    model = wrap_model(student, rank, device)
    parts = StepParts(
        model, student, optimizer, scheduler, scaler, targets, loss, autocast, options.max_grad_norm, rank
    )
    if rank.main:
        out.mkdir(parents=True, exist_ok=True)
        start_log(out / LOG_NAME, config.num_stages, classes is not None, step)
    progress = tqdm(total=total, initial=step, disable=not (rank.main and options.progress), desc="distill")
    sampler = ResumableSampler(dataset, rank.world, rank.rank, options.seed)
    return Trainer(
        options=options, rank=rank, device=device, autocast=autocast, teacher_name=teacher_name, config=config,
        student=student, parts=parts, dataset=dataset, sampler=sampler, eval_set=eval_set, eval_what=eval_what,
        eval_targets=eval_targets, run_key=key, steps_per_epoch=per_epoch, total_steps=total, step=step,
        resumed_from=resumed_from, out=out, started=started, progress=progress,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ loop


def epoch_batches(trainer: Trainer, epoch: int, within: int, count: int) -> Iterator[list]:
    """The micro-batches of `count` optimizer steps of `epoch`, from its step `within` on."""
    options = trainer.options
    trainer.sampler.set_epoch(epoch)
    trainer.sampler.set_start(within * options.accum_steps * options.batch_size)
    loader = torch.utils.data.DataLoader(
        trainer.dataset,
        batch_size=options.batch_size,
        sampler=trainer.sampler,
        num_workers=options.num_workers,
        drop_last=True,
        pin_memory=trainer.device.type == "cuda",
    )
    batches = iter(loader)
    for _ in range(count):
        yield [next(batches) for _ in range(options.accum_steps)]


def evaluate(trainer: Trainer) -> dict[str, list[float]]:
    """exit_cosines of the student on the evaluation images."""
    t = trainer
    return exit_cosines(t.student, t.eval_set, t.eval_targets, t.options.batch_size, t.device, t.autocast)


def save_training_checkpoint(trainer: Trainer) -> None:
    """A checkpoint of the current step (every process takes part), then the oldest pruned."""
    t = trainer
    path = checkpoint_path(t.out, t.step)
    if t.rank.main:
        path.parent.mkdir(parents=True, exist_ok=True)
    t.rank.barrier()
    p = t.parts
    save_checkpoint(path, t.student, p.optimizer, p.scheduler, p.scaler, t.step, t.run_key, t.rank)
    if t.rank.main:
        prune_checkpoints(t.out, t.options.keep_checkpoints)


def after_step(trainer: Trainer, record: StepRecord) -> None:
    """Log the step; write a checkpoint every `save_every` steps (the last one is written by `finish`)."""
    t = trainer
    t.step, t.last_loss = record.step, record.loss
    if t.rank.main:
        append_log(t.log_path, record)
        t.progress.set_postfix(
            {"loss": f"{record.loss:.4f}"} | {f"e{s}": f"{v:.4f}" for s, v in enumerate(record.cos_loss)}
        )
        t.progress.update(1)
    every = t.options.save_every
    if every and t.step % every == 0 and t.step < t.total_steps:
        save_training_checkpoint(t)


def finish(trainer: Trainer, before: dict | None) -> DistillResult:
    """The last checkpoint; on the main process the student, the after-check, the summary and the plot."""
    t = trainer
    t.progress.close()
    save_training_checkpoint(t)
    after = None
    if t.rank.main:
        save_model(t.student, t.out)
        after = evaluate(t)
        t.rank.say(
            f"after:  cosine to the teacher per exit on {len(t.eval_set)} {t.eval_what}: "
            f"{format_cosines(after['cosine'])}"
        )
        summary = {
            "teacher": t.teacher_name,
            "teacher_weights": t.options.teacher_weights or "random",
            "student_config": t.config.to_dict(),
            "steps": t.step,
            "final_loss": t.last_loss,
            "eval_set": f"{len(t.eval_set)} {t.eval_what}",
            "before": before,
            "after": after,
            "seconds": time.perf_counter() - t.started,
            "options": {k: v for k, v in dataclasses.asdict(t.options).items() if k != "progress"},
        }
        (t.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        plot_log(t.log_path, t.out / "train_log.png")
        t.rank.say(f"wrote the student to {t.out} ({t.step} steps, {time.perf_counter() - t.started:.0f} s)")
    t.rank.barrier()
    seconds = time.perf_counter() - t.started
    random_teacher = t.options.teacher_weights is None
    return DistillResult(t.out, t.step, t.last_loss, before, after, random_teacher, seconds, t.student)


def distill(options: DistillOptions) -> DistillResult:
    """Run (or resume) a distillation; writes the student into `options.out`.

    Raises:
        DataError: bad data (see waveclip_train.data), before any step.
        ValueError: a checkpoint that does not match the run, or fp16 without CUDA.
    """
    trainer = setup(options)
    before = None
    if trainer.resumed_from is None and trainer.rank.main:
        before = evaluate(trainer)
        trainer.rank.say(
            f"before: cosine to the teacher per exit on {len(trainer.eval_set)} {trainer.eval_what}: "
            f"{format_cosines(before['cosine'])}"
        )
    while trainer.step < trainer.total_steps:
        epoch, within = divmod(trainer.step, trainer.steps_per_epoch)
        count = min(trainer.steps_per_epoch - within, trainer.total_steps - trainer.step)
        for micro_batches in epoch_batches(trainer, epoch, within, count):
            after_step(trainer, train_step(trainer.parts, micro_batches, trainer.step, epoch))
    return finish(trainer, before)
