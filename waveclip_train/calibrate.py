"""Calibrate the margin gate: the cheapest per-stage thresholds that keep accuracy (or agreement) on target.

    waveclip calibrate --checkpoint runs/student --data held_out/ --labels-from-folders --max-drop 1.0
    waveclip calibrate --checkpoint runs/student --data held_out/ --prototypes-from labelled/ --min-agreement 99

Inputs: every exit's embedding on a held-out set (computed with the checkpoint, or loaded from a .pt/.npz
file), class embeddings (text embeddings from the teacher's text tower, a file, or class-mean
prototypes), and the cumulative GFLOPs of each exit. Targets:

- with labels: accuracy at most `max_drop` points below the last exit's accuracy;
- without labels: agreement with the last exit's prediction of at least `min_agreement` percent.

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

import argparse
import csv
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from waveclip.config import WaveCLIPConfig
from waveclip.flops import exit_gflops

NEVER = 1.01  # a threshold above any margin: nobody exits at that stage
MAX_COMBINATIONS = 1 << 20  # candidate combinations the search may enumerate
CHUNK_ELEMENTS = 1 << 24  # elements per vectorised block of the last gate's sums


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
    max_drop: float = 1.0,
    min_agreement: float = 99.0,
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


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `waveclip calibrate`."""
    from .data import add_data_arguments

    parser.add_argument("--checkpoint", required=True, help="WaveCLIP checkpoint folder; its config.json is updated")
    add_data_arguments(parser, required=False)
    parser.add_argument("--embeddings", help="saved exit embeddings (.pt or .npz) instead of --data")
    parser.add_argument("--save-embeddings", help="also save the computed embeddings (.pt) for later runs")
    cls = parser.add_argument_group("classes (one of)")
    cls.add_argument("--class-names", help="comma-separated class names, embedded with the teacher's text tower")
    cls.add_argument("--class-embeddings", help=".pt/.npz with (K, D) 'class_embeddings' (and 'class_names')")
    cls.add_argument(
        "--prototypes-from",
        action="append",
        metavar="SOURCE",
        help="labelled images (class = sub-folder; their train split when --split holdout): classes are the "
        "mean last-exit embedding per class",
    )
    parser.add_argument("--teacher", help="open_clip model name or config .json for --class-names (text tower)")
    parser.add_argument("--teacher-weights", help="its local weights (default: random, said so)")
    parser.add_argument("--logit-scale", type=float, help="softmax scale of the gate (default: teacher's, else 100)")
    tgt = parser.add_argument_group("target")
    tgt.add_argument(
        "--max-drop", type=float, default=1.0, help="with labels: accuracy points allowed below the last exit"
    )
    tgt.add_argument(
        "--min-agreement", type=float, default=99.0, help="without labels: percent agreement with the last exit"
    )
    tgt.add_argument("--no-labels", action="store_true", help="calibrate on agreement even when labels are known")
    parser.add_argument("--max-candidates", type=int, default=64, help="candidate thresholds per stage (default 64)")
    parser.add_argument("--out", default=".", help="folder for the CSV and PNG (default: .)")
    parser.add_argument("--name", default="calibration", help="file name of the CSV and PNG (default: calibration)")
    parser.add_argument("--dry-run", action="store_true", help="do not write the thresholds into the checkpoint")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--impl", default="auto", help="kernel implementation of the model (default: auto)")


def run(args: argparse.Namespace) -> int:
    """`waveclip calibrate`: returns the exit code."""
    from waveclip.model import WaveCLIP

    from .data import DataError, build_dataset

    if bool(args.data) == bool(args.embeddings):
        print("error: give exactly one of --data and --embeddings", file=sys.stderr)
        return 2
    chosen = [args.class_names is not None, args.class_embeddings is not None, args.prototypes_from is not None]
    if sum(chosen) > 1:
        print("error: give at most one of --class-names, --class-embeddings, --prototypes-from", file=sys.stderr)
        return 2
    config = WaveCLIPConfig.from_dict(json.loads((pathlib.Path(args.checkpoint) / "config.json").read_text()))
    model = None

    def student():
        nonlocal model
        if model is None:
            model = WaveCLIP.from_pretrained(args.checkpoint, impl=args.impl, device=args.device)
        return model

    try:
        labels, class_names, class_emb = None, None, None
        if args.embeddings:
            saved = load_tensors(args.embeddings)
            if not isinstance(saved.get("embeddings"), Tensor) or saved["embeddings"].dim() != 3:
                raise ValueError(f"{args.embeddings}: expected an (N, stages, D) tensor under 'embeddings'")
            embeddings = saved["embeddings"].float()
            labels, class_names = saved.get("labels"), saved.get("class_names")
            class_emb = saved.get("class_embeddings")
        else:
            dataset = build_dataset(
                args.data,
                config.image_size,
                args.split,
                args.holdout_fraction,
                args.labels_from_folders,
                args.skip_unreadable,
            )
            embeddings = compute_embeddings(student(), dataset, args.batch_size, args.num_workers, args.device)
            labels, class_names = dataset.labels, dataset.class_names
            print(f"computed exit embeddings of {len(dataset)} held-out images: {tuple(embeddings.shape)}")
        scale = args.logit_scale
        if args.class_embeddings:
            saved = load_tensors(args.class_embeddings)
            if "class_embeddings" not in saved:
                raise ValueError(f"{args.class_embeddings}: no (K, D) tensor under 'class_embeddings'")
            class_emb, class_names = saved["class_embeddings"].float(), saved.get("class_names") or class_names
        elif args.prototypes_from:
            # With --split holdout the prototypes come from the train split, so no held-out image is used.
            proto_split = "train" if args.split == "holdout" else "all"
            proto = build_dataset(
                args.prototypes_from, config.image_size, proto_split, args.holdout_fraction, labels_from_folders=True
            )
            if proto.labels is None:
                raise ValueError("--prototypes-from needs labelled images (class = first sub-folder)")
            proto_emb = compute_embeddings(student(), proto, args.batch_size, args.num_workers, args.device)
            class_emb = class_prototypes(proto_emb[:, -1], proto.labels, len(proto.class_names))
            if class_names is not None and class_names != proto.class_names:
                raise ValueError(f"held-out classes {class_names} differ from prototype classes {proto.class_names}")
            class_names = proto.class_names
            print(f"class prototypes: mean last-exit embedding per class over {len(proto)} labelled images")
        elif args.class_names:
            import open_clip

            from waveclip.zeroshot import class_text_embeddings

            from .distill import load_teacher_model

            names = [n.strip() for n in args.class_names.split(",") if n.strip()]
            if class_names is not None and names != class_names:
                raise ValueError(f"--class-names {names} differ from the data's classes {class_names}")
            teacher, teacher_name = load_teacher_model(args.teacher or config.teacher, args.teacher_weights)
            if args.teacher_weights is None:
                print("note: the teacher's text tower has RANDOM weights (no --teacher-weights given)")
            tokenizer = open_clip.get_tokenizer(teacher_name)
            class_emb, class_names = class_text_embeddings(teacher, tokenizer, names), names
            scale = scale or teacher.logit_scale.exp().item()
        if class_emb is None:
            raise ValueError("no classes: give --class-names, --class-embeddings or --prototypes-from")
        if args.no_labels:
            labels = None
        preds, margins = exit_scores(embeddings, class_emb, scale or 100.0)
        result = calibrate(
            preds,
            margins,
            exit_gflops(config),
            labels,
            args.max_drop,
            args.min_agreement,
            args.max_candidates,
        )
        if args.save_embeddings and args.data:
            saved = {
                "embeddings": embeddings,
                "class_embeddings": class_emb,
                "labels": labels,
                "class_names": class_names,
            }
            torch.save({k: v for k, v in saved.items() if v is not None}, args.save_embeddings)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{args.name}.csv", out / f"{args.name}.png"
    write_csv(result, csv_path)
    plot(result, png_path)
    report(result)
    if not args.dry_run:
        write_thresholds(args.checkpoint, result.operating_point.thresholds)
        print(f"wrote thresholds into {pathlib.Path(args.checkpoint) / 'config.json'}")
    print(f"wrote {csv_path} and {png_path}")
    return 0


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="waveclip calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
