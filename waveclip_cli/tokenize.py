"""Tokenize one image (CLIP preprocessing, colour transform, L-level Haar DWT, one token grid), print the
stages and how well each prefix of them rebuilds the image; `--out` saves a PNG of the original next to its
reconstructions from stage 0, stages 0-1, ... all stages, and `--save` writes the stage tokens to a
safetensors file that `waveclip classify` reads (progressive input)."""

from __future__ import annotations

import argparse
import pathlib

from .common import UserError
from .tokenfile import SUFFIX, StageTokens, save_tokens

FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--out", help="save the reconstructions figure (.png, .jpg, .pdf or .svg)")
    parser.add_argument("--save", metavar="FILE.safetensors", help="save the stage tokens for `waveclip classify`")
    parser.add_argument("--size", type=int, default=224, help="image side after CLIP preprocessing (default 224)")
    parser.add_argument("--levels", type=int, default=3, help="wavelet levels L (default 3)")
    parser.add_argument("--grid", type=int, help="token grid per side (default: size / 2**L / 4, at least 1; 7 at 224)")
    parser.add_argument("--color", default="ycbcr", choices=("ycbcr", "rgb"), help="colour transform (default ycbcr)")
    parser.add_argument("--impl", default="auto", help="kernel implementation (default auto)")


def _check_options(args) -> int:
    """Validate the options before any work; returns the grid side."""
    import waveclip_kernels as wk

    if args.out is None and args.save is None:
        raise UserError("nothing to do: give --out FIGURE.png and/or --save FILE.safetensors")
    if args.out is not None and pathlib.Path(args.out).suffix.lower() not in FIGURE_SUFFIXES:
        raise UserError(f"--out must end in one of {', '.join(FIGURE_SUFFIXES)}, got {args.out}")
    if args.save is not None and pathlib.Path(args.save).suffix.lower() != SUFFIX:
        raise UserError(f"--save must end in {SUFFIX}, got {args.save}")
    if args.size < 1:
        raise UserError(f"--size must be a positive number of pixels, got {args.size}")
    if args.levels < 0:
        raise UserError(f"--levels must be >= 0, got {args.levels}")
    if args.grid is not None and args.grid < 1:
        raise UserError(f"--grid must be >= 1, got {args.grid}")
    grid = args.grid or max(1, args.size // 2**args.levels // 4)
    wk.api.check_image_size((args.size, args.size), args.levels, (grid, grid))  # ValueError naming valid sizes
    return grid


def run(args) -> int:
    import waveclip_kernels as wk
    from waveclip.images import load_image, preprocess

    from .visualize import progressive_reconstructions, save_reconstruction_grid

    grid = _check_options(args)
    if not pathlib.Path(args.image).is_file():
        raise UserError(f"no such image file: {args.image}")
    x = preprocess([load_image(args.image)], args.size)
    tokens = wk.wavelet_tokenize(x, args.levels, grid, args.color, impl=args.impl)
    impl = wk.resolve_impl(args.impl, "wavelet_tokenize", x.device)
    print(f"{args.image}: {tuple(x.shape)}, L={args.levels}, grid {grid}x{grid}, {args.color}, impl={impl}")
    for s, t in enumerate(tokens):
        print(f"  stage {s}: tokens {tuple(t.shape)}")
    size = (args.size, args.size)
    recon = progressive_reconstructions(tokens, args.levels, (grid, grid), size, args.color)
    for k, r in enumerate(recon):
        label = "stage 0" if k == 0 else f"stages 0-{k}"
        print(f"  rebuilt from {label:<11} max |error| {float((r - x).abs().max()):.2e}")
    if args.save is not None:
        pathlib.Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        stages = StageTokens([t[0] for t in tokens], args.levels, (grid, grid), args.color, size, str(args.image))
        print(f"saved tokens {save_tokens(args.save, stages)}")
    if args.out is not None:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_reconstruction_grid(out, [pathlib.Path(args.image).name], x, recon)
        print(f"saved {out}")
    return 0
