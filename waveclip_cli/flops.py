"""Cumulative GFLOPs of one image answered at each exit (1 multiply-add = 2 FLOPs), counted analytically
from the preset, with and without LayerNorm, and as a share of the teacher ViT counted the same way; then the
same for every input size the tower takes (image_size / 2**k runs the first L+1-k stages). --fvcore also
traces the model (random weights) and the open_clip teacher with fvcore."""

from __future__ import annotations

import argparse
import pathlib

from .common import config_from_preset, progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from waveclip.config import PRESETS

    parser.add_argument("--preset", default="waveclip-vit-b-16", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--fvcore", action="store_true", help="cross-check with fvcore (builds and traces the models)")
    parser.add_argument("--out", help="also write the table as CSV (a folder -> flops.csv, or a .csv path)")


def input_sizes(config) -> list[tuple[int, int]]:
    """(H, W) of every input the tower answers: image_size / 2**k for k = 0..L."""
    H, W = config.image_size
    return [(H >> k, W >> k) for k in range(config.levels + 1)]


def _fvcore_counts(config):
    """fvcore's exit GFLOPs of a random-weight tower, and the teacher's when it has one (else None)."""
    from waveclip import flops
    from waveclip.model import WaveCLIP

    square = config.image_size[0] == config.image_size[1]
    with_teacher = bool(config.teacher) and square
    teacher = None
    with progress(None, total=1 + with_teacher, desc="fvcore", unit="model") as bar:
        exits = flops.fvcore_exit_gflops(WaveCLIP(config, impl="reference").eval())
        bar.update()
        if with_teacher:
            teacher = flops.teacher_gflops(config.teacher, config.image_size[0])
            bar.update()
    return exits, teacher


def _print_exit_table(preset: str, config, rows, fvcore_exits) -> None:
    H, W = config.image_size
    print(
        f"{preset}: {H}x{W} px, L={config.levels}, grid {config.grid[0]}x{config.grid[1]}, "
        f"width {config.width}, {config.layers} layers; 1 multiply-add = 2 FLOPs"
    )
    header = f"{'exit':>4} {'tokens':>6} {'GFLOPs':>9} {'no LN':>9} {'% teacher':>9}"
    print(header + (" fvcore" if fvcore_exits is not None else ""))
    for i, r in enumerate(rows):
        line = f"{r['exit']:>4} {r['tokens']:>6} {r['gflops']:>9.4g} {r['gflops_no_layernorm']:>9.4g}"
        line += f" {r['percent_of_teacher']:>8.1f}%"
        if fvcore_exits is not None:
            r["gflops_fvcore"] = fvcore_exits[i]
            line += f" {fvcore_exits[i]:.4g}"
        print(line)


def _print_size_table(config) -> None:
    from waveclip.flops import exit_gflops

    exits = config.levels + 1
    print("GFLOPs per exit by input size (an image of image_size / 2**k answers with the first L+1-k exits):")
    print(f"{'input':>9} " + " ".join(f"{'exit ' + str(s):>9}" for s in range(exits)))
    for H, W in input_sizes(config):
        gflops = exit_gflops(config, image_size=(H, W))
        cells = [f"{g:>9.4g}" for g in gflops] + [f"{'-':>9}"] * (exits - len(gflops))
        print(f"{f'{H}x{W}':>9} " + " ".join(cells))


def run(args) -> int:
    from waveclip import flops

    config = config_from_preset(args.preset)
    teacher, source = flops.teacher_gflops_analytic(config), "analytic"
    fvcore_exits = None
    if args.fvcore:
        fvcore_exits, fvcore_teacher = _fvcore_counts(config)
        if fvcore_teacher is not None:
            teacher, source = fvcore_teacher, "fvcore on open_clip"
    rows = flops.exit_table(config, teacher)
    _print_exit_table(args.preset, config, rows, fvcore_exits)
    H, W = config.image_size
    without = flops.teacher_gflops_analytic(config, layernorm=False)
    print(
        f"teacher ({config.teacher or 'a ViT of the same trunk'} at {H}x{W} px): {teacher:.4g} GFLOPs ({source}, "
        f"with LayerNorm; {without:.4g} without)"
    )
    _print_size_table(config)
    if args.out:
        print(f"wrote {write_flops_csv(args.out, args.preset, rows)}")
    return 0


def write_flops_csv(out, preset: str, rows) -> pathlib.Path:
    """The per-exit table as `flops.csv` (in the folder `out`, or at `out` when it ends in .csv)."""
    from bench import common

    path = pathlib.Path(out)
    path = path / "flops.csv" if path.suffix != ".csv" else path
    return common.write_csv(path, [{"preset": preset, **r} for r in rows], "cpu")
