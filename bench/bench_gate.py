"""Images/s of zero-shot classification under the margin gate, at several thresholds.

    python -m bench.bench_gate --device cpu --out bench/results/cpu

The tower is initialised from open_clip's teacher with RANDOM weights (nothing is downloaded) and the
class embeddings are random unit vectors (10 classes, seed 0, logit scale 100): the answers mean
nothing, but the gate's mechanics and costs are real. The images are scikit-image's sample
photographs, repeated to fill the batch. One threshold tau is used at every non-final stage: tau = 0
lets everyone answer at stage 0, tau > 1 sends everyone to the last stage; in between, the share of
samples leaving at each stage decides the speed. With random class embeddings and CLIP's logit scale
the margins bunch up near 1, so by default the in-between thresholds are the 25th, 50th and 75th
percentiles of this batch's stage-0 margins (each row records its tau). Each row gives images/s, the
exits histogram, the mean GFLOPs per image (`waveclip.flops.exit_gflops`) and the speed-up over the
teacher's `encode_image` on the same batch, device and dtype (same run).
"""

from __future__ import annotations

import argparse
import pathlib
from collections import Counter

import torch

import waveclip_kernels as wk
from waveclip import WaveCLIP, WaveCLIPConfig, ZeroShotClassifier
from waveclip.flops import teacher_gflops_analytic
from waveclip.images import preprocess, sample_images

from . import common

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
)
QUANTILES = (0.25, 0.5, 0.75)
NUM_CLASSES = 10
COLUMNS = ["case", "provider", "backend", "ms", "images_per_s", "exits", "mean_gflops", "speedup_vs_teacher"]


def _images(batch: int, size: tuple[int, int]) -> torch.Tensor:
    photos = list(sample_images(PHOTOS).values())
    return preprocess([photos[i % len(photos)] for i in range(batch)], size)


def run(
    out_dir=common.DEFAULT_OUT,
    device="cpu",
    quick: bool = False,
    preset: str = "waveclip-vit-b-16",
    batch: int = 8,
    thresholds=None,
    impl: str = "auto",
    budget_s: float = 3.0,
    precision: str | None = None,
) -> list[dict]:
    """Time the gated classifier at each threshold (and the teacher); write gate.csv row by row; return the rows.

    `thresholds` default: 0, the QUANTILES of the stage-0 margins on this batch, and 1.01.
    `precision`: "fp32" or "amp_bf16" (bf16 autocast); default `common.default_precision(device)`.
    """
    device = torch.device(device)
    if quick:
        preset, batch, budget_s = "waveclip-tiny", 2, 0.2
    config = WaveCLIPConfig.from_preset(preset)
    torch.manual_seed(0)
    teacher = None
    if config.teacher:
        import open_clip

        teacher = open_clip.create_model(config.teacher, pretrained=None, force_quick_gelu=config.quick_gelu)
        teacher = teacher.visual.to(device).eval()
        model = WaveCLIP.from_open_clip(teacher, config, impl=impl)
    else:
        model = WaveCLIP(config, impl=impl).to(device)
    model.eval()
    x = _images(batch, config.image_size).to(device)
    classes = torch.randn(NUM_CLASSES, config.embed_dim, generator=torch.Generator().manual_seed(0))
    case = f"{preset} B={batch} {common.dtype_name(x.dtype)}"
    impls = {op: wk.resolve_impl(impl, op, device) for op in wk.OPS if op != "wavelet_detokenize"}
    backend = ", ".join(f"{op.split('_')[0]}={name}" for op, name in impls.items())
    out_dir = pathlib.Path(out_dir)
    rows = common.CsvRows(out_dir / "gate.csv", device)
    precision = precision or common.default_precision(device)
    base = {"bench": "gate", "case": case, "preset": preset, "batch": batch, "dtype": common.dtype_name(x.dtype)}
    base["precision"] = precision
    with common.autocast(device, precision):
        _time_gate(rows, base, model, teacher, config, x, classes, thresholds, backend, device, budget_s)
    common.plot_cases(
        out_dir / "gate.png", rows, f"images/s under the gate, {common.device_name(device)}", "images_per_s"
    )
    return rows


def _time_gate(rows, base, model, teacher, config, x, classes, thresholds, backend, device, budget_s) -> None:
    """Append the teacher's row (if any) and one row per threshold to `rows`."""
    batch, teacher_ms = x.shape[0], None
    if teacher is not None:
        with torch.inference_mode():
            timing = common.time_fn(lambda: teacher(x), device, warmup=1, min_reps=5, budget_s=budget_s)
        teacher_ms = timing.ms
        gflops = teacher_gflops_analytic(config)
        rows.append(
            base
            | {"provider": f"teacher {config.teacher} encode_image", "backend": "open_clip", "status": "ok"}
            | {
                "ms": timing.ms,
                "ms_min": timing.ms_min,
                "cpu_ms": timing.cpu_ms,
                "reps": timing.reps,
                "images_per_s": batch * 1e3 / timing.ms,
            }
            | {"exits": "", "mean_exit": "", "mean_gflops": gflops, "speedup_vs_teacher": 1.0, "note": "random weights"}
        )
    if thresholds is None:
        probe = ZeroShotClassifier(model, classes)
        with torch.inference_mode():
            margins = probe.margin(probe.probabilities(model.start(x).latest())).float().cpu()
        thresholds = [0.0, *torch.quantile(margins, torch.tensor(QUANTILES)).tolist(), 1.01]
    for tau in thresholds:
        classifier = ZeroShotClassifier(model, classes, thresholds=[tau] * config.levels)
        predictions = classifier.predict(x)
        counts = Counter(p.exit_stage for p in predictions)
        timing = common.time_fn(lambda c=classifier: c.predict(x), device, warmup=1, min_reps=5, budget_s=budget_s)
        row = base | {"provider": f"gate tau={tau:.4g}", "backend": backend, "status": "ok", "threshold": tau}
        row |= {
            "ms": timing.ms,
            "ms_min": timing.ms_min,
            "cpu_ms": timing.cpu_ms,
            "reps": timing.reps,
            "images_per_s": batch * 1e3 / timing.ms,
        }
        row |= {
            "exits": "/".join(str(counts.get(s, 0)) for s in range(config.num_stages)),
            "mean_exit": sum(p.exit_stage for p in predictions) / batch,
            "mean_gflops": sum(p.gflops for p in predictions) / batch,
            "note": "random weights, random class embeddings",
        }
        if teacher_ms is not None:
            row["speedup_vs_teacher"] = teacher_ms / timing.ms
        rows.append(row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT), help="folder for gate.csv / gate.png")
    parser.add_argument("--preset", default="waveclip-vit-b-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, batch 2 (smoke run)")
    args = parser.parse_args(argv)
    rows = run(args.out, args.device, args.quick, args.preset, args.batch, impl=args.impl)
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
