"""Calibrate the margin gate: the cheapest per-stage thresholds that keep accuracy (or agreement) on target.

    run_calibration(CalibrateOptions(checkpoint="runs/student", data=["held_out/"], labels_from_folders=True,
                                     prototypes_from=["labelled/"], max_drop=1.0))

Inputs: every exit's embedding on a held-out set (computed with the checkpoint, or loaded from a .pt/.npz
file), class embeddings (text embeddings from the teacher's text tower, a file, or class-mean
prototypes), and the cumulative GFLOPs of each exit. Targets:

- with labels: accuracy at most `max_drop` points below the last exit's accuracy;
- without labels (or when asked): agreement with the last exit's prediction of at least `min_agreement` percent.

`CalibrateOptions` takes one of the two; `target_of` says which applies to the data at hand.

The search. A sample exits at the first stage s < L whose margin (top-1 minus top-2 softmax probability)
is >= tau_s. On a given set the gate's behaviour at stage s depends only on which observed stage-s margins
are >= tau_s, so the thresholds worth trying at stage s are the observed margins themselves plus "never"
(any value above 1). `search_thresholds` enumerates every combination of those candidates, stage by stage
(each partial combination keeps the set of samples still running, so the cost is one vectorised pass per
stage), and returns the combination of lowest mean GFLOPs that meets the target; ties go to the higher
metric, then to the higher thresholds. With all observed margins as candidates this is the exact optimum
on the calibration set. When a stage has more distinct margins than `max_candidates`, its candidates are
that many evenly spaced order statistics of its margins (always including the smallest, so "everyone
exits" stays possible), and the answer is the optimum over that grid. A chosen threshold is written as the
midpoint between the chosen margin and the next smaller observed margin, so that rounding differences in
recomputed margins cannot flip a sample sitting exactly on it.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from waveclip.config import WaveCLIPConfig
from waveclip.flops import exit_gflops

from .data import ImageDataset, build_dataset
from .options import CalibrateOptions
from .teacher import class_embeddings, load_teacher_model

NEVER = 1.01  # a threshold above any margin: nobody exits at that stage
MAX_COMBINATIONS = 1 << 20  # candidate combinations the search may enumerate
CHUNK_ELEMENTS = 1 << 24  # elements per vectorised block of the last gate's sums
DEFAULT_MAX_DROP = 1.0  # accuracy points, with labels
DEFAULT_MIN_AGREEMENT = 99.0  # percent, without labels


# ------------------------------------------------------------------------------------------ scoring


def exit_scores(embeddings: Tensor, class_embeddings: Tensor, logit_scale: float) -> tuple[Tensor, Tensor]:
    """Zero-shot prediction and gate margin of every sample at every exit.

    Args:
        embeddings: (N, S, D) exit embeddings (normalised here).
        class_embeddings: (K, D) class embeddings, K >= 2 (normalised here).
        logit_scale: multiplies the cosine similarities before the softmax, as the gate does.

    Returns:
        predictions (N, S) int64 and margins (N, S) float32 (top-1 minus top-2 probability).
    """
    from waveclip.zeroshot import ZeroShotClassifier

    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (N, stages, D), got {tuple(embeddings.shape)}")
    if class_embeddings.dim() != 2 or class_embeddings.shape[0] < 2:
        raise ValueError(f"calibration needs at least 2 class embeddings (K, D), got {tuple(class_embeddings.shape)}")
    if class_embeddings.shape[1] != embeddings.shape[2]:
        raise ValueError(
            f"class embeddings have {class_embeddings.shape[1]} features, exit embeddings {embeddings.shape[2]}"
        )
    z = F.normalize(embeddings.float(), dim=-1)
    t = F.normalize(class_embeddings.float().to(z.device), dim=-1)
    probs = torch.softmax(logit_scale * z @ t.T, dim=-1)
    return probs.argmax(dim=-1), ZeroShotClassifier.margin(probs)


def gate_exits(margins: Tensor, thresholds: Sequence[float]) -> Tensor:
    """(N, S) margins -> (N,) the stage each sample answers at: first s < L with margin >= tau_s, else L."""
    L = margins.shape[1] - 1
    passes = margins[:, :L] >= torch.tensor(thresholds, dtype=margins.dtype, device=margins.device)
    passes = torch.cat([passes, torch.ones_like(passes[:, :1])], dim=1)
    return passes.to(torch.int8).argmax(dim=1)


# ------------------------------------------------------------------------------------------- search


@dataclass
class Point:
    """One way to run the gate and what it gives on the calibration set."""

    thresholds: tuple[float, ...]
    mean_gflops: float
    metric: float  # accuracy or agreement, percent
    exit_shares: tuple[float, ...]  # share of samples answering at each stage


@dataclass
class Calibration:
    metric_name: str  # "accuracy" or "agreement"
    target: float  # the metric (percent) the operating point must reach
    operating_point: Point
    frontier: list[Point]  # cheapest-for-its-metric combinations, by increasing cost
    single_exits: list[Point]  # every sample answering at exit s, for each s
    exit_gflops: list[float]
    num_samples: int
    exhaustive: bool  # True when every observed margin was a candidate (exact optimum)


def _candidates(margins: Tensor, max_candidates: int) -> tuple[Tensor, bool]:
    """Sorted distinct margins of one stage (or evenly spaced order statistics of them), then NEVER."""
    values = torch.unique(margins.double())
    exhaustive = values.numel() <= max_candidates
    if not exhaustive:
        values = values[torch.linspace(0, values.numel() - 1, max_candidates).round().long().unique()]
    return torch.cat([values, values.new_tensor([NEVER])]), exhaustive


def _midpoint(value: float, observed: Tensor) -> float:
    """The threshold written for a chosen candidate: halfway down to the next smaller observed margin."""
    if value >= NEVER:
        return NEVER
    below = observed[observed < value]
    lower = float(below.max()) if below.numel() else 0.0
    return (lower + value) / 2


def search_thresholds(
    margins: Tensor, correct: Tensor, exit_cost: Sequence[float], max_candidates: int = 64
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], bool]:
    """Every combination of candidate thresholds with its total cost and hit count.

    Args:
        margins: (N, S) gate margins per sample and exit.
        correct: (N, S) bool: the answer at exit s counts as a hit (right label, or agrees with the last exit).
        exit_cost: S cumulative costs of answering at each exit.
        max_candidates: most candidate thresholds per stage (see the module docstring).

    Returns:
        choice (P, L) candidate indices per combination, cost (P,) total cost, hits (P,) hit counts, the
        candidate values of each stage, and whether every observed margin was a candidate.
    """
    N, S = correct.shape
    L = S - 1
    per_stage = max(2, min(max_candidates, int(MAX_COMBINATIONS ** (1 / L))))
    cands, exhaustive = [], True
    for s in range(L):
        c, full = _candidates(margins[:, s], per_stage)
        cands.append(c)
        exhaustive &= full
    cost_of = torch.tensor(exit_cost, dtype=torch.float64)
    active = torch.ones(1, N, dtype=torch.bool)  # (P, N): samples still running under each partial combination
    cost = torch.zeros(1, dtype=torch.float64)
    hits = torch.zeros(1, dtype=torch.int64)
    for s in range(L - 1):  # stages before the last gate: expand every partial combination by every candidate
        leaves = margins[:, s].double()[None, :] >= cands[s][:, None]  # (C, N)
        gone, active = active[:, None, :] & leaves[None], (active[:, None, :] & ~leaves[None]).reshape(-1, N)
        cost = (cost[:, None] + gone.sum(-1) * cost_of[s]).reshape(-1)
        hits = (hits[:, None] + (gone & correct[:, s]).sum(-1)).reshape(-1)
    # The last gate: for each partial combination, the samples that leave under a candidate are the active
    # ones whose margin is >= it, a suffix of the samples sorted by margin: suffix sums give all candidates.
    order = margins[:, L - 1].double().argsort(stable=True)
    first = torch.searchsorted(margins[:, L - 1].double()[order], cands[L - 1])  # (C,) first leaving position

    def leaving(x: Tensor) -> Tensor:  # (p, N) -> (p, C): sum of x over the samples leaving under each candidate
        suffix = torch.cat([x.flip(1).cumsum(1).flip(1), x.new_zeros(x.shape[0], 1)], dim=1)
        return suffix[:, first]

    out_cost, out_hits = [], []
    chunk = max(1, CHUNK_ELEMENTS // (N + 1))
    for lo in range(0, active.shape[0], chunk):
        a = active[lo : lo + chunk][:, order].to(torch.int32)  # (p, N) sorted by the last gate's margin
        n_gone = leaving(a)
        n_stay = a.sum(1, keepdim=True) - n_gone
        h_gone = leaving(a * correct[order, L - 1])
        h_stay = (a * correct[order, L]).sum(1, keepdim=True) - leaving(a * correct[order, L])
        out_cost.append((cost[lo : lo + chunk, None] + n_gone * cost_of[L - 1] + n_stay * cost_of[L]).reshape(-1))
        out_hits.append((hits[lo : lo + chunk, None] + h_gone + h_stay).reshape(-1))
    cost, hits = torch.cat(out_cost), torch.cat(out_hits)
    sizes = [c.numel() for c in cands]
    choice = torch.cartesian_prod(*[torch.arange(n) for n in sizes]).reshape(-1, L)
    return choice, cost, hits, cands, exhaustive


def calibrate(
    predictions: Tensor,
    margins: Tensor,
    exit_cost: Sequence[float],
    labels: Tensor | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_candidates: int = 64,
) -> Calibration:
    """The cheapest thresholds that meet the target, the cost-metric frontier and every single exit.

    Args:
        predictions: (N, S) int64 zero-shot predictions per exit.
        margins: (N, S) gate margins per exit.
        exit_cost: S cumulative GFLOPs of answering at each exit.
        labels: (N,) true classes, or None for label-free calibration.
        max_drop: with labels, the most accuracy (percentage points) the gate may lose against the last exit.
        min_agreement: without labels, the least agreement (percent) with the last exit's prediction.
        max_candidates: most candidate thresholds per stage.
    """
    N, S = predictions.shape
    if N == 0:
        raise ValueError("calibration needs at least one sample")
    if S < 2:
        raise ValueError("calibration needs at least two exits")
    if len(exit_cost) != S:
        raise ValueError(f"{len(exit_cost)} exit costs for {S} exits")
    if labels is not None:
        correct = predictions == labels.view(-1, 1)
        name = "accuracy"
        target = 100.0 * correct[:, -1].double().mean().item() - max_drop
    else:
        correct = predictions == predictions[:, -1:]
        name = "agreement"
        target = min_agreement
    need = math.ceil(target * N / 100 - 1e-9)
    choice, cost, hits, cands, exhaustive = search_thresholds(margins, correct, exit_cost, max_candidates)
    values = torch.stack([cands[s][choice[:, s]] for s in range(S - 1)], dim=1)
    # Order the combinations that meet the target by cost, then more hits, then higher thresholds.
    feasible = (hits >= need).nonzero().flatten()
    if feasible.numel() == 0:
        raise ValueError(
            f"no thresholds reach {name} {target:.2f}% on these {N} samples (the last exit alone gives "
            f"{100 * correct[:, -1].double().mean():.2f}%); lower the target"
        )
    keys = [values[feasible, s].numpy() for s in reversed(range(S - 1))]
    order = np.lexsort([*(-k for k in keys), -hits[feasible].numpy(), cost[feasible].numpy()])
    best = int(feasible[order[0]])

    def point(row: int) -> Point:
        taus = tuple(_midpoint(float(values[row, s]), margins[:, s].double()) for s in range(S - 1))
        stages = gate_exits(margins.double(), taus)
        shares = torch.bincount(stages, minlength=S).double() / N
        return Point(taus, float(cost[row]) / N, 100.0 * float(hits[row]) / N, tuple(shares.tolist()))

    by_cost = np.lexsort([-hits.numpy(), cost.numpy()])  # cheapest first, then most hits
    h = hits.numpy()[by_cost]
    better = h > np.concatenate([[-1], np.maximum.accumulate(h)[:-1]])  # more hits than every cheaper one
    frontier = [point(int(row)) for row in by_cost[better]]
    singles = [
        Point(
            tuple(0.0 if t == s else NEVER for t in range(S - 1)),
            float(exit_cost[s]),
            100.0 * float(correct[:, s].double().mean()),
            tuple(float(t == s) for t in range(S)),
        )
        for s in range(S)
    ]
    return Calibration(name, target, point(best), frontier, singles, list(exit_cost), N, exhaustive)


# ------------------------------------------------------------------------------------------ outputs


def write_csv(result: Calibration, path: str | pathlib.Path) -> None:
    """One row per frontier point, single exit and the operating point."""
    S = len(result.exit_gflops)
    rows = [("frontier", p) for p in result.frontier]
    rows += [(f"exit_{s}", p) for s, p in enumerate(result.single_exits)]
    rows += [("operating_point", result.operating_point)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["kind", "mean_gflops", result.metric_name]
            + [f"tau_{s}" for s in range(S - 1)]
            + [f"share_exit_{s}" for s in range(S)]
        )
        for kind, p in rows:
            w.writerow(
                [kind, f"{p.mean_gflops:.6g}", f"{p.metric:.4f}"]
                + [f"{t:.6g}" for t in p.thresholds]
                + [f"{x:.4f}" for x in p.exit_shares]
            )


def plot(result: Calibration, path: str | pathlib.Path, title: str = "") -> None:
    """Metric against mean GFLOPs per image: the frontier, every single exit, the target and the operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [p.mean_gflops for p in result.frontier]
    ys = [p.metric for p in result.frontier]
    ax.step(xs, ys, where="post", color="tab:blue", lw=1.5, label="gate: cheapest thresholds per level")
    for s, p in enumerate(result.single_exits):
        ax.scatter(p.mean_gflops, p.metric, color="tab:gray", marker="s", zorder=3)
        ax.annotate(f"exit {s}", (p.mean_gflops, p.metric), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.axhline(result.target, color="tab:red", ls="--", lw=1, label=f"target {result.target:.1f}%")
    op = result.operating_point
    ax.scatter(op.mean_gflops, op.metric, color="tab:red", marker="*", s=180, zorder=4, label="operating point")
    ax.annotate(
        "tau = " + ", ".join(f"{t:.3g}" for t in op.thresholds),
        (op.mean_gflops, op.metric),
        textcoords="offset points",
        xytext=(8, 6),
        fontsize=8,
        color="tab:red",
    )
    ax.set_xlabel("mean GFLOPs per image")
    ax.set_ylabel(f"{result.metric_name} (%)")
    ax.set_title(title or f"{result.metric_name} vs compute ({result.num_samples} images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_thresholds(checkpoint: str | pathlib.Path, thresholds: Sequence[float]) -> None:
    """Set `thresholds` in a checkpoint's config.json, leaving every other field as it is."""
    path = pathlib.Path(checkpoint) / "config.json"
    config = json.loads(path.read_text())
    if len(thresholds) != config["levels"]:
        raise ValueError(f"{len(thresholds)} thresholds for a model with {config['levels']} levels")
    config["thresholds"] = [float(t) for t in thresholds]
    WaveCLIPConfig.from_dict(config)
    path.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------- embeddings


@torch.inference_mode()
def compute_embeddings(model, dataset, batch_size: int = 64, num_workers: int = 0, device="cpu") -> Tensor:
    """(N, L+1, embed_dim) exit embeddings of every image of `dataset`, in dataset order."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    for images, _ in tqdm(loader, desc="exit embeddings", leave=False):
        out.append(model(images.to(device=device, dtype=model.dtype)).float().cpu())
    return torch.cat(out)


def load_tensors(path: str | pathlib.Path) -> dict:
    """A saved .pt (a dict, or one bare tensor stored as `embeddings`) or .npz file as a dict of tensors;
    `class_names`, when present, as a list of str."""
    path = pathlib.Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: [str(x) for x in f[k]] if k == "class_names" else torch.from_numpy(f[k]) for k in f.files}
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {"embeddings": raw} if isinstance(raw, Tensor) else dict(raw)


def class_prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, D) unit class means of (N, D) embeddings: a nearest-class-mean head when no text tower fits."""
    z = F.normalize(embeddings.float(), dim=-1)
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
    missing = (torch.bincount(labels, minlength=num_classes) == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"no prototype images for classes {missing}")
    return F.normalize(sums, dim=-1)


# ---------------------------------------------------------------------------------------------- run


@dataclass
class Inputs:
    """What the search needs besides the costs: exit embeddings, classes and (maybe) labels."""

    embeddings: Tensor  # (N, S, D) exit embeddings
    class_embeddings: Tensor | None  # (K, D)
    class_names: list[str] | None
    labels: Tensor | None  # (N,) int64, or None
    logit_scale: float | None  # None: the default


def target_of(options: CalibrateOptions, labels: Tensor | None) -> tuple[Tensor | None, float, float]:
    """The labels the search uses (None: agreement with the last exit) and (max_drop, min_agreement).

    `min_agreement` (or `no_labels`) asks for agreement even when labels are known; `max_drop` needs labels.
    """
    if options.max_drop is not None and labels is None:
        raise ValueError(
            "max_drop (--max-drop) is an accuracy target, but these images have no labels: "
            "use min_agreement (--min-agreement), or give labelled data"
        )
    if options.no_labels or options.min_agreement is not None:
        labels = None
    max_drop = DEFAULT_MAX_DROP if options.max_drop is None else options.max_drop
    min_agreement = DEFAULT_MIN_AGREEMENT if options.min_agreement is None else options.min_agreement
    return labels, max_drop, min_agreement


def prepare_save_path(path: str) -> pathlib.Path:
    """The file --save-embeddings writes, its folder created now so that a bad path fails before the compute."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise ValueError(f"save_embeddings {path} is a folder: name a file, e.g. {target / 'embeddings.pt'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder of save_embeddings {path}: {err}") from err
    return target


def _load_inputs(path: str) -> Inputs:
    saved = load_tensors(path)
    if not isinstance(saved.get("embeddings"), Tensor) or saved["embeddings"].dim() != 3:
        raise ValueError(f"{path}: expected an (N, stages, D) tensor under 'embeddings'")
    return Inputs(
        saved["embeddings"].float(), saved.get("class_embeddings"), saved.get("class_names"), saved.get("labels"), None
    )


def _held_out(options: CalibrateOptions, config: WaveCLIPConfig) -> ImageDataset:
    return build_dataset(
        options.data,
        config.image_size,
        options.split,
        options.holdout_fraction,
        options.labels_from_folders,
        options.skip_unreadable,
    )


def _prototypes(options: CalibrateOptions, config: WaveCLIPConfig, student, inputs: Inputs) -> None:
    """Class embeddings from labelled images: the mean last-exit embedding per class."""
    # With the holdout split calibrating, the prototypes come from the train split: no held-out image is used.
    split = "train" if options.split == "holdout" else "all"
    proto = build_dataset(
        options.prototypes_from, config.image_size, split, options.holdout_fraction, labels_from_folders=True
    )
    if proto.labels is None:
        raise ValueError("prototypes_from (--prototypes-from) needs labelled images (class = first sub-folder)")
    if inputs.class_names is not None and inputs.class_names != proto.class_names:
        raise ValueError(f"held-out classes {inputs.class_names} differ from prototype classes {proto.class_names}")
    emb = compute_embeddings(student(), proto, options.batch_size, options.num_workers, options.device)
    inputs.class_embeddings = class_prototypes(emb[:, -1], proto.labels, len(proto.class_names))
    inputs.class_names = proto.class_names
    print(f"class prototypes: mean last-exit embedding per class over {len(proto)} labelled images")


def _text_classes(options: CalibrateOptions, config: WaveCLIPConfig, inputs: Inputs) -> None:
    """Class embeddings from the class names through the teacher's text tower."""
    names = list(options.class_names)
    if inputs.class_names is not None and names != inputs.class_names:
        raise ValueError(f"class_names {names} differ from the data's classes {inputs.class_names}")
    teacher, teacher_name = load_teacher_model(options.teacher or config.teacher, options.teacher_weights)
    if options.teacher_weights is None:
        print("note: the teacher's text tower has RANDOM weights (no teacher weights given)")
    inputs.class_embeddings, inputs.class_names = class_embeddings(teacher, teacher_name, names), names
    inputs.logit_scale = inputs.logit_scale or teacher.logit_scale.exp().item()


def gather_inputs(options: CalibrateOptions, config: WaveCLIPConfig) -> tuple[Inputs, Tensor | None, float, float]:
    """Exit embeddings (computed or loaded), classes and the target: everything is checked, and the
    --save-embeddings folder made, before the checkpoint runs on any image.

    Returns:
        The inputs, and `target_of`'s labels, max_drop and min_agreement.
    """
    from waveclip.model import WaveCLIP

    model, save_path = None, None

    def student():
        nonlocal model
        if model is None:
            model = WaveCLIP.from_pretrained(options.checkpoint, impl=options.impl, device=options.device)
        return model

    if options.embeddings:
        inputs = _load_inputs(options.embeddings)
        labels, max_drop, min_agreement = target_of(options, inputs.labels)
    else:
        dataset = _held_out(options, config)
        labels, max_drop, min_agreement = target_of(options, dataset.labels)
        save_path = prepare_save_path(options.save_embeddings) if options.save_embeddings else None
        embeddings = compute_embeddings(student(), dataset, options.batch_size, options.num_workers, options.device)
        print(f"computed exit embeddings of {len(dataset)} held-out images: {tuple(embeddings.shape)}")
        inputs = Inputs(embeddings, None, dataset.class_names, dataset.labels, None)
    inputs.logit_scale = options.logit_scale
    if options.class_embeddings:
        saved = load_tensors(options.class_embeddings)
        if "class_embeddings" not in saved:
            raise ValueError(f"{options.class_embeddings}: no (K, D) tensor under 'class_embeddings'")
        inputs.class_embeddings = saved["class_embeddings"].float()
        inputs.class_names = saved.get("class_names") or inputs.class_names
    elif options.prototypes_from:
        _prototypes(options, config, student, inputs)
    elif options.class_names:
        _text_classes(options, config, inputs)
    if inputs.class_embeddings is None:
        raise ValueError("no classes: give class_names, class_embeddings or prototypes_from")
    if save_path is not None:
        saved = {
            "embeddings": inputs.embeddings,
            "class_embeddings": inputs.class_embeddings,
            "labels": inputs.labels,
            "class_names": inputs.class_names,
        }
        torch.save({k: v for k, v in saved.items() if v is not None}, save_path)
    return inputs, labels, max_drop, min_agreement


def run_calibration(options: CalibrateOptions) -> Calibration:
    """Calibrate a checkpoint's gate: the CSV and PNG of the cost-metric curve into `options.out`, and
    (unless `dry_run`) the operating point's thresholds into the checkpoint's config.json.

    Raises:
        DataError: bad held-out or prototype images.
        ValueError: inputs that do not fit together, or a target no thresholds reach.
        FileNotFoundError: a missing checkpoint or file.
    """
    config_path = pathlib.Path(options.checkpoint) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{options.checkpoint} is not a WaveCLIP checkpoint: config.json is missing")
    config = WaveCLIPConfig.from_dict(json.loads(config_path.read_text()))
    inputs, labels, max_drop, min_agreement = gather_inputs(options, config)
    preds, margins = exit_scores(inputs.embeddings, inputs.class_embeddings, inputs.logit_scale or 100.0)
    result = calibrate(preds, margins, exit_gflops(config), labels, max_drop, min_agreement, options.max_candidates)
    out = pathlib.Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{options.name}.csv", out / f"{options.name}.png"
    write_csv(result, csv_path)
    plot(result, png_path)
    report(result)
    if not options.dry_run:
        write_thresholds(options.checkpoint, result.operating_point.thresholds)
        print(f"wrote thresholds into {config_path}")
    print(f"wrote {csv_path} and {png_path}")
    return result


def report(result: Calibration) -> None:
    """Print the single exits and the operating point."""
    name = result.metric_name
    print(f"{result.num_samples} samples, target {name} >= {result.target:.2f}%")
    for s, p in enumerate(result.single_exits):
        print(f"  exit {s} alone: {name} {p.metric:6.2f}%  {p.mean_gflops:.4g} GFLOPs")
    op = result.operating_point
    shares = ", ".join(f"{100 * x:.1f}%" for x in op.exit_shares)
    print(
        f"  gate: thresholds {', '.join(f'{t:.4g}' for t in op.thresholds)} -> {name} {op.metric:.2f}%, "
        f"{op.mean_gflops:.4g} GFLOPs per image ({100 * op.mean_gflops / result.exit_gflops[-1]:.1f}% of the "
        f"last exit); answered per stage: {shares}"
    )
    if not result.exhaustive:
        print("  (optimum over a grid of candidate thresholds; raise --max-candidates for the exact one)")
