"""End-to-end benchmark: the WaveCLIP tower against open_clip's ViT-B/16 image tower.

    python -m bench.bench_model --out bench/results/cpu

Same batch, device, dtype, thread count and trunk (random weights, inference mode). Each repetition
runs, interleaved so that a busy machine slows every contender alike:
  teacher      open_clip `ViT-B-16` `encode_image`
  full         `WaveCLIP.forward`: every exit in one block-causal pass
  incremental  `start` then three `refine` calls, timed after each (exit s = start + s refines)
The medians give three ratios with their targets: full / teacher (<= 1.15), start / teacher (<= 0.35)
and (start + 3 refines) / full (<= 1.10), and images/s at every exit. Rows go to `model.csv`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import torch

import waveclip_kernels as wk
from waveclip import WaveCLIP, WaveCLIPConfig

from . import common

TARGETS = {"full / teacher": 1.15, "start / teacher": 0.35, "start + 3 refines / full": 1.10}
COLUMNS = ["measure", "ms", "ms_min", "images_per_s", "ratio", "target", "met", "note"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _incremental(model: WaveCLIP, x: torch.Tensor) -> list[float]:
    """Milliseconds from the start to each exit: start, start + 1 refine, ..."""
    begin = time.perf_counter()
    state = model.start(x)
    marks = [time.perf_counter()]
    for _ in range(model.config.levels):
        model.refine(state)
        marks.append(time.perf_counter())
    return [(m - begin) * 1e3 for m in marks]


def run(
    out_dir=common.DEFAULT_OUT,
    batch: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    impl: str = "auto",
    preset: str = "waveclip-vit-b-16",
) -> list[dict]:
    """Time teacher, full pass and incremental pass; write `model.csv` into `out_dir`; return its rows."""
    import open_clip

    device = torch.device(device)
    config = WaveCLIPConfig.from_preset(preset)
    teacher = open_clip.create_model(config.teacher, pretrained=None, force_quick_gelu=config.quick_gelu)
    teacher = teacher.visual.to(device).eval()
    model = WaveCLIP.from_open_clip(teacher, config, impl=impl).eval()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *config.image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def synced(fn):
        def call():
            fn()
            sync()

        return call

    teacher_ms, full_ms, exits_ms = [], [], []
    with torch.inference_mode():
        for rep in range(warmup + repeats):
            t = _timed(synced(lambda: teacher(x)))
            f = _timed(synced(lambda: model(x)))
            sync()
            e = _incremental(model, x)
            if rep >= warmup:
                teacher_ms.append(t), full_ms.append(f), exits_ms.append(e)

    impls = {op: wk.resolve_impl(impl, op, device) for op in ("wavelet_tokenize", "attention_with_kv_append")}
    impls["block_causal_attention"] = wk.resolve_impl(impl, "block_causal_attention", device)
    note = f"batch {batch}, {common.dtype_name(x.dtype)}, {repeats} repeats; impls " + ", ".join(
        f"{op}={name}" for op, name in impls.items()
    )

    def row(measure, times, extra=""):
        ms = statistics.median(times)
        return {"measure": measure, "ms": ms, "ms_min": min(times), "images_per_s": batch * 1e3 / ms, "note": extra}

    rows = [row("teacher (open_clip encode_image)", teacher_ms, note), row("full pass (all exits)", full_ms)]
    for s in range(config.num_stages):
        what = "start (exit 0)" if s == 0 else f"start + {s} refine{'s' * (s > 1)} (exit {s})"
        rows.append(row(what, [e[s] for e in exits_ms]))
    teacher, full = rows[0]["ms"], rows[1]["ms"]
    start, last = rows[2]["ms"], rows[-1]["ms"]
    for name, ratio in (("full / teacher", full / teacher), ("start / teacher", start / teacher),
                        ("start + 3 refines / full", last / full)):  # fmt: skip
        target = TARGETS[name]
        rows.append({"measure": name, "ratio": ratio, "target": target, "met": "yes" if ratio <= target else "NO"})
    common.write_csv(pathlib.Path(out_dir) / "model.csv", rows, device)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT / "cpu"), help="folder for model.csv")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", default="auto", help="kernel impl of the WaveCLIP tower")
    parser.add_argument("--preset", default="waveclip-vit-b-16")
    args = parser.parse_args(argv)
    rows = run(args.out, args.batch, args.repeats, device=args.device, impl=args.impl, preset=args.preset)
    env = common.environment(args.device)
    print(f"{env['device']}, torch {env['torch']}, {env['threads']} threads, {env['date']}")
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
