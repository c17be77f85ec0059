"""The main job: WaveCLIP's tokenizer (and model) on real photographs.

    waveclip demo --out outputs      (or python -m waveclip_cli.demo --out outputs)

Tokenizes scikit-image's sample photographs, prints each stage's token shapes and the
reconstruction error, and saves a PNG of the images rebuilt coarse to fine. Then classifies the
photographs zero-shot with a WaveCLIP student initialised from an open_clip ViT-B/16 teacher, coarse to
fine with early exit, and prints each answer, the stage that gave it and the GFLOPs spent against the
teacher's. Nothing is downloaded: without `--teacher-weights PATH` the teacher has random weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import waveclip_kernels as wk
from waveclip.config import PRESETS
from waveclip.flops import teacher_gflops_analytic
from waveclip.images import preprocess, sample_images
from waveclip.interop import load_teacher
from waveclip.model import WaveCLIP
from waveclip.zeroshot import ZeroShotClassifier

from .visualize import progressive_reconstructions, save_reconstruction_grid

LABELS = (
    "astronaut", "cup of coffee", "cat", "rocket", "dog", "car",
    "horse", "airplane", "bird", "flower", "teapot", "clock",
)  # fmt: skip
TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


def tokenizer_demo(out_dir: pathlib.Path, levels: int = 3, grid: int = 7, size: int = 224) -> None:
    photos = sample_images()
    names = list(photos)
    x = preprocess(list(photos.values()), size)
    impl = wk.resolve_impl("auto", "wavelet_tokenize", x.device)
    print(f"Tokenizer: {len(names)} photographs {tuple(x.shape)}, L={levels}, grid {grid}x{grid}, impl={impl}")
    tokens = wk.wavelet_tokenize(x, levels, grid)
    for s, t in enumerate(tokens):
        what = f"A_{levels}" if s == 0 else f"(H, V, D) of level {levels - s + 1}"
        print(f"  stage {s}: tokens {tuple(t.shape)}  from {what}")
    recon = progressive_reconstructions(tokens, levels, (grid, grid), (size, size))
    for k, r in enumerate(recon):
        err = (r - x).abs().amax(dim=(1, 2, 3))
        label = "stage 0" if k == 0 else f"stages 0-{k}"
        print(f"  rebuilt from {label:<11} max |error| per image: " + ", ".join(f"{e:.2e}" for e in err.tolist()))
    path = out_dir / "reconstructions.png"
    save_reconstruction_grid(path, names, x, recon)
    print(f"  saved {path}")


def classification_demo(
    out_dir: pathlib.Path, teacher_weights: str | None, thresholds: tuple[float, ...] | None, impl: str = "auto"
) -> None:
    import open_clip

    preset = PRESETS["waveclip-vit-b-16"]
    torch.manual_seed(0)  # random teacher weights: the same on every run
    teacher = load_teacher(preset.teacher, teacher_weights)
    source = f"weights from {teacher_weights}" if teacher_weights else "RANDOM weights"
    print(f"\nZero-shot classification: student initialised from open_clip {preset.teacher} with {source}")
    if not teacher_weights:
        print(
            "  NOTE: no CLIP checkpoint was given and nothing is downloaded, so teacher and student have random\n"
            "  weights and their answers are meaningless; pass --teacher-weights PATH (an open_clip ViT-B-16\n"
            "  checkpoint file) for real ones. What does hold: the per-stage cost and the gate's mechanics."
        )
    student = WaveCLIP.from_open_clip(teacher, impl=impl).eval()
    tokenizer = open_clip.get_tokenizer(preset.teacher)
    clf = ZeroShotClassifier.from_teacher(student, teacher, tokenizer, LABELS, TEMPLATES, thresholds)
    photos = sample_images()
    x = preprocess(list(photos.values()), preset.image_size)
    preds = clf.predict(x)
    with torch.inference_mode():
        teacher_probs = clf.probabilities(torch.nn.functional.normalize(teacher.encode_image(x), dim=-1))
    teacher_cost = teacher_gflops_analytic(student.config)
    exits = ", ".join(f"{g:.2f}" for g in clf.exit_gflops)
    print(f"  labels: {', '.join(LABELS)}; prompts: {' | '.join(TEMPLATES)}")
    print(f"  margin thresholds {clf.thresholds}; GFLOPs at exits 0..{len(clf.exit_gflops) - 1}: {exits}")
    print(f"  {'image':<10} {'WaveCLIP answer':<22} {'exit':>4} {'GFLOPs':>7}   {'teacher answer':<22} {'GFLOPs':>7}")
    rows = []
    for name, p, tp in zip(photos, preds, teacher_probs):
        t_label = LABELS[int(tp.argmax())]
        answer = f"{p.name} ({p.probs[p.label]:.2f})"
        teacher_answer = f"{t_label} ({tp.max():.2f})"
        print(
            f"  {name:<10} {answer:<22} {p.exit_stage:>4} {p.gflops:>7.2f}   {teacher_answer:<22} {teacher_cost:>7.2f}"
        )
        rows.append(
            dict(image=name, answer=p.name, probability=float(p.probs[p.label]), exit_stage=p.exit_stage,
                 gflops=p.gflops, teacher_answer=t_label, teacher_gflops=teacher_cost)
        )  # fmt: skip
    spent, teacher_total = sum(p.gflops for p in preds), teacher_cost * len(preds)
    print(f"  total {spent:.2f} GFLOPs vs the teacher's {teacher_total:.2f} ({100 * spent / teacher_total:.0f}%)")
    path = out_dir / "zeroshot.json"
    path.write_text(json.dumps(dict(teacher_weights=teacher_weights, thresholds=clf.thresholds, rows=rows), indent=2))
    print(f"  saved {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="outputs", help="folder for reconstructions.png and zeroshot.json (default: outputs)"
    )
    parser.add_argument(
        "--teacher-weights", metavar="PATH", help="open_clip ViT-B-16 checkpoint file (default: random)"
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        metavar="TAU",
        help="margin threshold per non-final stage (default: preset)",
    )
    parser.add_argument("--impl", default="auto", help="kernel impl for the student (default: auto)")


def run(args) -> int:
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_demo(out_dir)
    thresholds = tuple(args.thresholds) if args.thresholds else None
    classification_demo(out_dir, args.teacher_weights, thresholds, args.impl)
    return 0


if __name__ == "__main__":
    from .main import main

    sys.exit(main(["demo", *sys.argv[1:]]))
