"""What a distillation or a calibration run depends on, each checked in one place (`__post_init__`).

The command line (`waveclip distill`, `waveclip calibrate`) fills these from its flags; Python callers
build them directly. A bad value is a `ValueError` that names the field, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from waveclip.config import WaveCLIPConfig
from waveclip_kernels.api import IMPLS

from .data import SPLITS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _at_least(name: str, value, low, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(
        isinstance(value, int | float) and math.isfinite(value) and value >= low,
        f"{name} must be >= {low}, got {value!r}",
    )


def _names(name: str, values) -> list[str] | None:
    """A list of distinct non-empty names, or None."""
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    _require(
        bool(values) and all(isinstance(v, str) and v for v in values), f"{name} must be non-empty names, got {values}"
    )
    _require(len(set(values)) == len(values), f"{name} has duplicates: {values}")
    return values


def _sources(name: str, values, optional: bool = False) -> list[str] | None:
    if optional and not values:
        return None
    _require(
        bool(values) and not isinstance(values, str) and all(str(v) for v in values),
        f"{name} must be a list of one or more data sources, got {values!r}",
    )
    return [str(v) for v in values]


def _check_data(options) -> None:
    """The data fields both runs share."""
    _require(options.split in SPLITS, f"split must be one of {SPLITS}, got {options.split!r}")
    _require(
        0.0 <= options.holdout_fraction <= 1.0, f"holdout_fraction must lie in [0, 1], got {options.holdout_fraction}"
    )
    _at_least("batch_size", options.batch_size, 1)
    _at_least("num_workers", options.num_workers, 0)
    _require(options.impl in IMPLS, f"impl must be one of {IMPLS}, got {options.impl!r}")


@dataclasses.dataclass
class DistillOptions:
    """A distillation run (`waveclip_train.distill.distill`)."""

    data: Sequence[str]  # data sources: folders, list files, builtin:NAME (see waveclip_train.data)
    out: str  # output folder: the student, checkpoints/, train_log.csv
    teacher: str = "ViT-B-16"  # open_clip model name, or a path to an open_clip model config (.json)
    teacher_weights: str | None = None  # local checkpoint file or cached pretrained tag; None = random weights
    preset: str = "waveclip-vit-b-16"  # student preset; the trunk sizes always come from the teacher
    image_size: int | None = None  # student input size (default: the preset's)
    levels: int | None = None  # wavelet levels L (default: the preset's)
    grid: int | None = None  # token grid per side (default: the preset's)
    split: str = "all"  # which part of the sources trains; with "train" the holdout part is evaluated
    holdout_fraction: float = 0.2
    labels_from_folders: bool = False
    skip_unreadable: bool = False  # leave out undecodable images (with a warning) instead of stopping
    epochs: int = 1
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 32  # per process, per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # trunk
    lr_new: float = 1e-4  # new embeddings
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to this fraction of each learning rate
    max_grad_norm: float = 1.0  # 0 disables clipping
    exit_weights: Sequence[float] | None = None  # w_s per exit (default: 1 each)
    class_names: Sequence[str] | None = None  # enables the KL term on zero-shot logits
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    precision: str = "auto"  # autocast: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16 (GPU only)
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (cuda when there is one)
    impl: str = "auto"  # kernel implementation of the student
    seed: int = 0
    num_workers: int = 2
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # 0: keep all
    resume: str | None = None  # a checkpoint folder, or "auto" for the latest in out/checkpoints
    teacher_cache: str | None = None  # folder of the teacher-embedding cache
    eval_images: int = 512  # most images in the before/after cosine evaluation
    progress: bool = True  # a progress bar on the main process

    def __post_init__(self):
        self.data = _sources("data", self.data)
        _require(bool(self.out), "out must name the output folder")
        _check_data(self)
        levels = WaveCLIPConfig.from_preset(self.preset).levels  # ValueError naming the known presets
        for name in ("image_size", "levels", "grid"):
            _at_least(name, getattr(self, name), 0 if name == "levels" else 1, optional=True)
        if self.levels is not None:
            levels = self.levels
        _at_least("epochs", self.epochs, 1)
        _at_least("steps", self.steps, 0, optional=True)  # 0: write the initial student
        _at_least("accum_steps", self.accum_steps, 1)
        for name in ("lr", "lr_new", "weight_decay", "warmup_steps", "max_grad_norm", "kl_weight"):
            _at_least(name, getattr(self, name), 0)
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _require(self.kl_temperature > 0, f"kl_temperature must be > 0, got {self.kl_temperature}")
        if self.exit_weights is not None:
            self.exit_weights = [float(w) for w in self.exit_weights]
            _require(
                len(self.exit_weights) == levels + 1,
                f"exit_weights needs {levels + 1} values (one per exit), got {self.exit_weights}",
            )
            for w in self.exit_weights:
                _at_least("every exit weight", w, 0)
        self.class_names = _names("class_names", self.class_names)
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("save_every", "keep_checkpoints"):
            _at_least(name, getattr(self, name), 0)
        _at_least("eval_images", self.eval_images, 1)


@dataclasses.dataclass
class CalibrateOptions:
    """A gate calibration run (`waveclip_train.calibrate.run_calibration`).

    The exit embeddings come from exactly one of `data` (computed with the checkpoint) and `embeddings`
    (a file saved earlier); the classes from at most one of `class_names`, `class_embeddings` and
    `prototypes_from` (else from the embeddings file). The target is `max_drop` (accuracy against labels)
    or `min_agreement` (agreement with the last exit), never both; with neither, labelled data gets
    `max_drop` 1.0 and unlabelled data (or `no_labels`) `min_agreement` 99.0.
    """

    checkpoint: str  # WaveCLIP checkpoint folder; its config.json receives the thresholds
    data: Sequence[str] | None = None  # held-out data sources
    embeddings: str | None = None  # saved exit embeddings (.pt or .npz) instead of data
    save_embeddings: str | None = None  # also save the computed embeddings here (.pt); needs data
    split: str = "all"
    holdout_fraction: float = 0.2
    labels_from_folders: bool = False
    skip_unreadable: bool = False
    class_names: Sequence[str] | None = None  # embedded with the teacher's text tower
    class_embeddings: str | None = None  # .pt/.npz with (K, D) 'class_embeddings' (and 'class_names')
    prototypes_from: Sequence[str] | None = None  # labelled sources: classes are mean last-exit embeddings
    teacher: str | None = None  # open_clip name or config .json for class_names (default: the checkpoint's)
    teacher_weights: str | None = None  # its weights (default: random)
    logit_scale: float | None = None  # softmax scale of the gate (default: the teacher's, else 100)
    max_drop: float | None = None  # with labels: accuracy points allowed below the last exit
    min_agreement: float | None = None  # percent agreement with the last exit's prediction
    no_labels: bool = False  # calibrate on agreement even when labels are known
    max_candidates: int = 64  # candidate thresholds per stage
    out: str = "."  # folder of the CSV and PNG
    name: str = "calibration"  # file name (without suffix) of the CSV and PNG
    dry_run: bool = False  # do not write the thresholds into the checkpoint
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    impl: str = "auto"

    def __post_init__(self):
        _require(bool(self.checkpoint), "checkpoint must name a WaveCLIP checkpoint folder")
        self.data = _sources("data", self.data, optional=True)
        self.prototypes_from = _sources("prototypes_from", self.prototypes_from, optional=True)
        _require(
            (self.data is None) != (self.embeddings is None),
            "give exactly one of data (--data) and embeddings (--embeddings)",
        )
        _require(
            self.save_embeddings is None or self.data is not None,
            "save_embeddings (--save-embeddings) saves embeddings computed from data (--data): give --data",
        )
        sources = [self.class_names is not None, self.class_embeddings is not None, self.prototypes_from is not None]
        _require(
            sum(sources) <= 1, "give at most one of class_names, class_embeddings, prototypes_from (--class-names, ...)"
        )
        self.class_names = _names("class_names", self.class_names)
        _require(
            self.max_drop is None or self.min_agreement is None,
            "give max_drop (--max-drop, accuracy against labels) or min_agreement (--min-agreement, agreement "
            "with the last exit), not both",
        )
        _require(
            self.max_drop is None or not self.no_labels,
            "max_drop (--max-drop) is an accuracy target: it needs labels, but no_labels (--no-labels) is set",
        )
        if self.max_drop is not None:
            _require(0 <= self.max_drop <= 100, f"max_drop must lie in [0, 100] points, got {self.max_drop}")
        if self.min_agreement is not None:
            _require(0 <= self.min_agreement <= 100, f"min_agreement must lie in [0, 100] %, got {self.min_agreement}")
        _at_least("logit_scale", self.logit_scale, 1e-9, optional=True)
        _at_least("max_candidates", self.max_candidates, 1)
        _require(bool(self.name), "name must be a file name")
        _check_data(self)
