"""The `waveclip` command line.

    waveclip classify IMAGES... --labels cat,dog [--checkpoint DIR | --teacher-weights PATH]
    waveclip tokenize IMAGE --out FILE.png
    waveclip flops [--preset NAME] [--fvcore]
    waveclip bench [--op tokenizer|attention|model|gate|all] [--device cpu|cuda] [--out DIR]
    waveclip distill ...      (waveclip distill --help)
    waveclip calibrate ...    (waveclip calibrate --help)

User errors (missing files, unreadable images, unknown presets, bad options) print one line on
stderr and exit with status 1; argparse usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
from collections.abc import Sequence

PROG = "waveclip"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
BENCH_OPS = ("tokenizer", "attention", "model", "gate")
DELEGATED = ("distill", "calibrate")  # commands whose options belong to their own modules


class UserError(Exception):
    """A mistake in the command's inputs: reported as one line, without a traceback."""


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _config(preset: str):
    from waveclip.config import WaveCLIPConfig

    return WaveCLIPConfig.from_preset(preset)  # ValueError naming the known presets


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise UserError(f"--device {device!r} is not a device: use cpu or cuda") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here")


def _progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)


# -------------------------------------------------------------------------------------- classify


def _load_images(paths: Sequence[str]):
    from waveclip.images import load_image

    images = []
    for path in paths:
        if not pathlib.Path(path).is_file():
            raise UserError(f"no such image file: {path}")
        images.append(load_image(path))  # ValueError "cannot read image ..." when it is not an image
    return images


def _classifier(args):
    """The WaveCLIP tower, its class embeddings and the lines that say where they came from."""
    import torch

    from waveclip.interop import load_teacher
    from waveclip.model import WaveCLIP
    from waveclip.zeroshot import ZeroShotClassifier

    notes = []
    if args.checkpoint:
        if not pathlib.Path(args.checkpoint).is_dir():
            raise UserError(f"no such checkpoint folder: {args.checkpoint}")
        model = WaveCLIP.from_pretrained(args.checkpoint, impl=args.impl, device=args.device)
        notes.append(f"WaveCLIP tower: checkpoint {args.checkpoint}")
    else:
        model = None
    config = model.config if model is not None else _config(args.preset)
    thresholds = args.thresholds
    if thresholds is not None and len(thresholds) != config.levels:
        raise UserError(f"--thresholds needs {config.levels} values (one per non-final stage), got {len(thresholds)}")
    teacher = None
    if config.teacher:
        teacher = load_teacher(config.teacher, weights=args.teacher_weights, quick_gelu=config.quick_gelu)
        teacher = teacher.to(args.device)
        which = f"weights {args.teacher_weights}" if args.teacher_weights else "RANDOM weights (no --teacher-weights)"
        notes.append(f"teacher {config.teacher}: {which}")
    if model is None:
        if teacher is None:
            raise UserError(f"preset {args.preset} names no teacher: pass --checkpoint")
        model = WaveCLIP.from_open_clip(teacher, config, impl=args.impl)
        notes.append(f"WaveCLIP tower: initialised from the teacher (preset {args.preset}, not distilled)")
    if teacher is not None:
        import open_clip

        classifier = ZeroShotClassifier.from_teacher(
            model, teacher, open_clip.get_tokenizer(config.teacher), args.labels, thresholds=thresholds
        )
        if not args.teacher_weights:
            notes.append("class text embeddings from a RANDOM-weight text tower: the answers are not meaningful")
    else:
        generator = torch.Generator().manual_seed(0)
        embeddings = torch.randn(len(args.labels), config.embed_dim, generator=generator)
        classifier = ZeroShotClassifier(model, embeddings, args.labels, thresholds=thresholds)
        notes.append("the model has no teacher text tower: class embeddings are RANDOM (seed 0)")
    return classifier, notes


def cmd_classify(args) -> int:
    from waveclip.flops import teacher_gflops_analytic
    from waveclip.images import preprocess

    if not args.labels:
        raise UserError("--labels needs at least one class name, e.g. --labels cat,dog")
    if len(set(args.labels)) != len(args.labels):
        raise UserError(f"--labels has duplicate class names: {args.labels}")
    _check_device(args.device)
    pictures = _load_images(args.images)
    classifier, notes = _classifier(args)
    config = classifier.model.config
    for note in notes:
        print(f"note: {note}")
    x = preprocess(pictures, config.image_size).to(args.device, classifier.model.dtype)
    predictions = []
    batches = range(0, len(pictures), args.batch_size)
    for start in _progress(batches, desc="classify", unit="batch", disable=len(batches) < 2):
        predictions += classifier.predict(x[start : start + args.batch_size])
    width = max(len(p) for p in args.images)
    print(f"{'image':<{width}}  {'label':<16} {'prob':>6}  exit  GFLOPs")
    for path, p in zip(args.images, predictions):
        prob = float(p.probs[p.label])
        print(f"{path:<{width}}  {p.name:<16} {prob:6.3f}  {p.exit_stage:>4}  {p.gflops:.4g}")
    mean = sum(p.gflops for p in predictions) / len(predictions)
    teacher = teacher_gflops_analytic(config)
    print(
        f"thresholds {', '.join(f'{t:g}' for t in classifier.thresholds)}; mean {mean:.4g} GFLOPs per image "
        f"({100 * mean / teacher:.0f}% of the teacher's {teacher:.4g})"
    )
    return 0


# -------------------------------------------------------------------------------------- tokenize


def cmd_tokenize(args) -> int:
    import waveclip_kernels as wk
    from waveclip.images import preprocess

    from .demo import progressive_reconstructions, save_reconstruction_grid

    out = pathlib.Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out must end in one of {', '.join(IMAGE_SUFFIXES)}, got {args.out}")
    grid = args.grid or args.size // 2**args.levels // 4
    wk.api.check_image_size((args.size, args.size), args.levels, (grid, grid))
    (picture,) = _load_images([args.image])
    x = preprocess([picture], args.size)
    tokens = wk.wavelet_tokenize(x, args.levels, grid, args.color, impl=args.impl)
    impl = wk.resolve_impl(args.impl, "wavelet_tokenize", x.device)
    print(f"{args.image}: {tuple(x.shape)}, L={args.levels}, grid {grid}x{grid}, {args.color}, impl={impl}")
    for s, t in enumerate(tokens):
        print(f"  stage {s}: tokens {tuple(t.shape)}")
    recon = progressive_reconstructions(tokens, args.levels, (grid, grid), (args.size, args.size), args.color)
    for k, r in enumerate(recon):
        label = "stage 0" if k == 0 else f"stages 0-{k}"
        print(f"  rebuilt from {label:<11} max |error| {float((r - x).abs().max()):.2e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_reconstruction_grid(out, [pathlib.Path(args.image).name], x, recon)
    print(f"saved {out}")
    return 0


# ----------------------------------------------------------------------------------------- flops


def cmd_flops(args) -> int:
    from waveclip import flops

    config = _config(args.preset)
    teacher, source = flops.teacher_gflops_analytic(config), "analytic"
    fvcore_exits = None
    if args.fvcore:
        from waveclip.model import WaveCLIP

        square = config.image_size[0] == config.image_size[1]
        with _progress(None, total=1 + bool(config.teacher and square), desc="fvcore", unit="model") as bar:
            fvcore_exits = flops.fvcore_exit_gflops(WaveCLIP(config, impl="reference").eval())
            bar.update()
            if config.teacher and square:
                teacher, source = flops.teacher_gflops(config.teacher, config.image_size[0]), "fvcore on open_clip"
                bar.update()
    rows = flops.exit_table(config, teacher)
    H, W = config.image_size
    print(
        f"{args.preset}: {H}x{W} px, L={config.levels}, grid {config.grid[0]}x{config.grid[1]}, "
        f"width {config.width}, {config.layers} layers; 1 multiply-add = 2 FLOPs"
    )
    print(f"{'exit':>4} {'tokens':>6} {'GFLOPs':>9} {'no LN':>9} {'% teacher':>9}" + (" fvcore" if args.fvcore else ""))
    for i, r in enumerate(rows):
        line = f"{r['exit']:>4} {r['tokens']:>6} {r['gflops']:>9.4g} {r['gflops_no_layernorm']:>9.4g}"
        line += f" {r['percent_of_teacher']:>8.1f}%"
        if fvcore_exits is not None:
            r["gflops_fvcore"] = fvcore_exits[i]
            line += f" {fvcore_exits[i]:.4g}"
        print(line)
    without = flops.teacher_gflops_analytic(config, layernorm=False)
    print(
        f"teacher ({config.teacher or 'a ViT of the same trunk'} at {H}x{W} px): {teacher:.4g} GFLOPs ({source}, "
        f"with LayerNorm; {without:.4g} without)"
    )
    if args.out:
        print(f"wrote {_write_flops_csv(args.out, args.preset, rows)}")
    return 0


def _write_flops_csv(out, preset: str, rows) -> pathlib.Path:
    common = _bench_module("common")
    path = pathlib.Path(out)
    path = path / "flops.csv" if path.suffix != ".csv" else path
    return common.write_csv(path, [{"preset": preset, **r} for r in rows], "cpu")


# ----------------------------------------------------------------------------------------- bench


def _bench_module(name: str):
    """A module of the installed `bench` package (the benchmarks ship with waveclip)."""
    return importlib.import_module(f"bench.{name}")


def cmd_bench(args) -> int:
    import torch

    from waveclip.flops import exit_table

    _check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = BENCH_OPS if args.op == "all" else (args.op,)
    out = pathlib.Path(args.out or _bench_module("common").DEFAULT_OUT / ("gpu" if args.device == "cuda" else "cpu"))
    common, tables = _bench_module("common"), _bench_module("tables")
    for op in _progress(ops, desc="bench", unit="op", disable=len(ops) < 2):
        print(f"== {op} ({args.device}) -> {out}", flush=True)
        if op == "tokenizer":
            _bench_module("bench_tokenizer").run(out, args.device, quick=args.quick)
        elif op == "attention":
            _bench_module("bench_attention").run(out, args.device, quick=args.quick)
        elif op == "model":
            batch = args.batch or (1 if args.quick else 8)
            repeats = 1 if args.quick else 5
            _bench_module("bench_model").run(out, batch=batch, repeats=repeats, device=args.device, preset=args.preset)
        else:
            _bench_module("bench_gate").run(out, args.device, quick=args.quick, preset=args.preset)
        print(tables.render(f"{op}.csv", common.read_csv(out / f"{op}.csv")))
    _write_flops_csv(out, args.preset, exit_table(_config(args.preset)))
    print(f"tables: {tables.write_tables(out)}")
    return 0


# ------------------------------------------------------------------------------- distill, calibrate


def _delegate(module_name: str, argv: list[str]) -> int:
    """Run waveclip_cli.<module_name>'s own parser (`add_arguments`) and `run` on the remaining arguments."""
    try:
        module = importlib.import_module(f"waveclip_cli.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"waveclip_cli.{module_name}":
            raise UserError(
                f"`{PROG} {module_name}` is not available: waveclip_cli/{module_name}.py is missing"
            ) from err
        raise
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        raise UserError(f"`{PROG} {module_name}` is not available: waveclip_cli.{module_name} has no add_arguments/run")
    parser = argparse.ArgumentParser(prog=f"{PROG} {module_name}", description=(module.__doc__ or "").split("\n\n")[0])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from waveclip.config import PRESETS

    presets = ", ".join(PRESETS)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="WaveCLIP: wavelet-tokenized CLIP vision tower with coarse-to-fine early exit.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's options. Presets: {presets}.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "classify",
        help="zero-shot classify image files, each answered at the first confident exit",
        description="Zero-shot classification with early exit: every image starts at the coarsest stage and "
        "refines (reusing cached keys/values) until the margin gate lets it answer. Prints the label, its "
        "probability, the exit stage and the GFLOPs spent per image. Without --teacher-weights the open_clip "
        "teacher has random weights, and the output says so.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    p.add_argument("--labels", type=_csv_list, required=True, help="comma-separated class names, e.g. cat,dog,car")
    p.add_argument("--checkpoint", help="a WaveCLIP checkpoint folder (save_pretrained / waveclip distill)")
    p.add_argument(
        "--teacher-weights", help="open_clip teacher checkpoint file or cached pretrained tag (default: random)"
    )
    p.add_argument("--thresholds", type=_floats, help="margin gate per non-final stage, e.g. 0.5,0.5,0.5")
    p.add_argument("--preset", default="waveclip-vit-b-16", help="model preset without --checkpoint")
    p.add_argument("--impl", default="auto", help="kernel implementation (auto, triton, cuda, cpu, reference)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser(
        "tokenize",
        help="show an image rebuilt coarse to fine from its wavelet tokens",
        description="Tokenize one image (CLIP preprocessing, colour transform, L-level Haar DWT, one token grid) "
        "and save a PNG of the original next to its reconstructions from stage 0, stages 0-1, ... all stages.",
    )
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--out", required=True, help="output figure (.png, .jpg, .pdf or .svg)")
    p.add_argument("--size", type=int, default=224, help="image side after CLIP preprocessing (default 224)")
    p.add_argument("--levels", type=int, default=3, help="wavelet levels L (default 3)")
    p.add_argument("--grid", type=int, help="token grid per side (default: size / 2**L / 4, 7 at 224 px)")
    p.add_argument("--color", default="ycbcr", choices=("ycbcr", "rgb"), help="colour transform (default ycbcr)")
    p.add_argument("--impl", default="auto", help="kernel implementation (default auto)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser(
        "flops",
        help="GFLOPs per image at each exit, against the teacher",
        description="Cumulative GFLOPs of one image answered at each exit (1 multiply-add = 2 FLOPs), counted "
        "analytically from the preset, with and without LayerNorm, and as a share of the teacher ViT counted "
        "the same way. --fvcore also traces the model (random weights) and the open_clip teacher with fvcore.",
    )
    p.add_argument("--preset", default="waveclip-vit-b-16", help=f"one of: {presets}")
    p.add_argument("--fvcore", action="store_true", help="cross-check with fvcore (builds and traces the models)")
    p.add_argument("--out", help="also write the table as CSV (a folder -> flops.csv, or a .csv path)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser(
        "bench",
        help="run the benchmarks: CSV, PNG and markdown tables",
        description="Microbenchmarks (tokenizer, attention), the end-to-end model against open_clip, and images/s "
        "under the gate. Each writes a CSV stamped with device, versions, date and commit, and PNG plots; "
        "README_tables.md collects them as markdown tables.",
    )
    p.add_argument("--op", default="all", choices=(*BENCH_OPS, "all"), help="what to run (default all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--out", help="output folder (default bench/results/cpu or bench/results/gpu)")
    p.add_argument("--preset", default="waveclip-vit-b-16", help="model preset for model/gate and the FLOP table")
    p.add_argument("--batch", type=int, help="batch of the model benchmark (default 8)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement")
    p.set_defaults(func=cmd_bench)

    texts = (
        ("distill", "distil a WaveCLIP student from its open_clip teacher (see `waveclip distill --help`)"),
        ("calibrate", "fit the gate's thresholds on held-out images (see `waveclip calibrate --help`)"),
    )
    for name, text in texts:
        p = sub.add_parser(name, help=text, add_help=False, description=text)  # its module parses the rest
        p.set_defaults(func=lambda args, name=name: _delegate(name, args.rest))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `waveclip` console script; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in DELEGATED and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.func(args)
    except (UserError, ValueError, OSError, RuntimeError) as err:
        if args.traceback:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
