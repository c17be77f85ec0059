"""End-to-end benchmark: the WaveCLIP tower against open_clip's ViT-B/16 image tower.

    python -m bench.bench_model --out bench/results/cpu

Same batch, device, dtype, thread count and trunk (random weights, inference mode). Each repetition
runs, interleaved so that a busy machine slows every contender alike:
  teacher      open_clip `ViT-B-16` image tower (`model.visual`)
  full         `WaveCLIP.forward`: every exit in one block-causal pass
  incremental  `start` then three `refine` calls, timed after each (exit s = start + s refines)
Three ratios with their targets: full / teacher (<= 1.15), start / teacher (<= 0.35) and
(start + 3 refines) / full (<= 1.10), each the median over repetitions of the ratio within one
repetition (contenders timed seconds apart, so slow drifts in machine load cancel). Every figure is
given in wall time and, as a cross-check on a shared machine, in the process's CPU time (all threads),
which another process's load does not inflate. Also images/s at every exit. Rows go to `model.csv`.

On a machine that other processes keep busy, use fewer threads than cores (`--threads 1` on 2 cores):
when a core is taken, every parallel op waits at its barrier for a descheduled thread (milliseconds
per op), which charges each contender by its number of ops rather than by its work.
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
COLUMNS = ["measure", "ms", "ms_min", "cpu_ms", "images_per_s", "ratio", "cpu_ratio", "target", "met", "note"]


def _clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) milliseconds since `t0`."""
    wall, cpu = _clocks()
    return (wall - t0[0]) * 1e3, (cpu - t0[1]) * 1e3


def _timed(fn, sync) -> tuple[float, float]:
    t0 = _clocks()
    fn()
    sync()
    return _since(t0)


def _incremental(model: WaveCLIP, x: torch.Tensor, sync) -> list[tuple[float, float]]:
    """(wall, CPU) milliseconds from the start to each exit: start, start + 1 refine, ..."""
    t0 = _clocks()
    state = model.start(x)
    sync()
    marks = [_since(t0)]
    for _ in range(model.config.levels):
        model.refine(state)
        sync()
        marks.append(_since(t0))
    return marks


def run(
    out_dir=common.DEFAULT_OUT,
    batch: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    impl: str = "auto",
    preset: str = "waveclip-vit-b-16",
    threads: int | None = None,
    precision: str | None = None,
) -> list[dict]:
    """Time teacher, full pass and incremental pass; write `model.csv` into `out_dir`; return its rows.

    `threads` sets torch's intra-op threads for every contender (default: leave torch's setting).
    `precision`: "fp32" or "amp_bf16" (bf16 autocast), for every contender; default
    `common.default_precision(device)` (amp_bf16 on CUDA). Each row names it.
    """
    import open_clip

    if threads:
        torch.set_num_threads(threads)

    device = torch.device(device)
    config = WaveCLIPConfig.from_preset(preset)
    teacher = open_clip.create_model(config.teacher, pretrained=None, force_quick_gelu=config.quick_gelu)
    teacher = teacher.visual.to(device).eval()
    model = WaveCLIP.from_open_clip(teacher, config, impl=impl).eval()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *config.image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times = {"teacher": [], "full": [], **{s: [] for s in range(config.num_stages)}}  # (wall, CPU) ms per rep
    precision = precision or common.default_precision(device)
    with torch.inference_mode(), common.autocast(device, precision):
        for rep in range(warmup + repeats):
            teacher_t, full_t = _timed(lambda: teacher(x), sync), _timed(lambda: model(x), sync)
            exits = _incremental(model, x, sync)
            if rep >= warmup:
                times["teacher"].append(teacher_t), times["full"].append(full_t)
                for s, t in enumerate(exits):
                    times[s].append(t)

    ops = ("wavelet_tokenize", "block_causal_attention", "attention_with_kv_append")
    impls = {op: wk.resolve_impl(impl, op, device) for op in ops}
    note = f"batch {batch}, {precision}, {repeats} repeats; impls " + ", ".join(
        f"{op}={name}" for op, name in impls.items()
    )

    def row(measure, key, extra=""):
        wall = [w for w, _ in times[key]]
        ms = statistics.median(wall)
        return {
            "measure": measure,
            "ms": ms,
            "ms_min": min(wall),
            "cpu_ms": statistics.median(c for _, c in times[key]),
            "images_per_s": batch * 1e3 / ms,
            "precision": precision,
            "note": extra,
        }

    rows = [row("teacher (open_clip image tower)", "teacher", note), row("full pass (all exits)", "full")]
    for s in range(config.num_stages):
        rows.append(row("start (exit 0)" if s == 0 else f"start + {s} refine{'s' * (s > 1)} (exit {s})", s))
    last = config.num_stages - 1
    for name, num, den in (("full / teacher", "full", "teacher"), ("start / teacher", 0, "teacher"),
                           (f"start + {last} refines / full", last, "full")):  # fmt: skip
        ratios = [statistics.median(a[i] / b[i] for a, b in zip(times[num], times[den])) for i in (0, 1)]  # (wall, CPU)
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if ratios[0] <= target else "NO")
        rows.append({"measure": name, "ratio": ratios[0], "cpu_ratio": ratios[1], "target": target, "met": met})
        rows[-1]["precision"] = precision
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
    parser.add_argument("--threads", type=int, help="torch threads for every contender (default: torch's)")
    parser.add_argument("--precision", choices=common.PRECISIONS, help="default: amp_bf16 on CUDA, fp32 on the CPU")
    args = parser.parse_args(argv)
    rows = run(args.out, args.batch, args.repeats, 1, args.device, args.impl, args.preset, args.threads, args.precision)
    env = common.environment(args.device)
    print(f"{env['device']}, torch {env['torch']}, {env['threads']} threads, {env['date']}")
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
