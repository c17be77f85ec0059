"""The `waveclip` command line: one parser built from a table of command modules.

    waveclip classify INPUTS... --labels cat,dog [--checkpoint DIR | --teacher-weights PATH] [--out FILE.csv]
    waveclip tokenize IMAGE [--out FILE.png] [--save FILE.safetensors]
    waveclip flops [--preset NAME] [--fvcore]
    waveclip bench [--op tokenizer|attention|model|gate|all] [--device cpu|cuda] [--out DIR]
    waveclip demo [--out DIR]
    waveclip distill ...      (waveclip distill --help)
    waveclip calibrate ...    (waveclip calibrate --help)

Every command module exposes `add_arguments(parser)` and `run(args) -> int`. User errors (missing files,
unreadable images, unknown presets, bad options) print one line on stderr and exit with status 1; argparse
usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .common import UserError, one_line

PROG = "waveclip"

# (command, module with add_arguments/run, one-line help)
COMMANDS = (
    ("classify", "waveclip_cli.classify", "zero-shot classify images, folders or token files, with early exit"),
    ("tokenize", "waveclip_cli.tokenize", "an image rebuilt coarse to fine from its wavelet tokens; save the tokens"),
    ("flops", "waveclip_cli.flops", "GFLOPs per image at each exit and input size, against the teacher"),
    ("bench", "waveclip_cli.bench", "run the benchmarks: CSV, PNG and markdown tables"),
    ("demo", "waveclip_cli.demo", "tokenize, rebuild and classify scikit-image's sample photographs"),
    ("distill", "waveclip_cli.distill", "distil a WaveCLIP student from its open_clip teacher"),
    ("calibrate", "waveclip_cli.calibrate", "fit the gate's thresholds on held-out images"),
)  # fmt: skip
USER_ERRORS = (UserError, ValueError, OSError, RuntimeError)


def _import(command: str, module_name: str):
    """The command's module, or a sentence saying why it is not available."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return f"`{PROG} {command}` is not available: {module_name} is missing"
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        return f"`{PROG} {command}` is not available: {module_name} has no add_arguments/run"
    return module


def _unavailable(reason: str):
    def run(args) -> int:
        raise UserError(reason)

    return run


def build_parser() -> argparse.ArgumentParser:
    from waveclip.config import PRESETS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="WaveCLIP: wavelet-tokenized CLIP vision tower with coarse-to-fine early exit.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's options. Presets: {', '.join(PRESETS)}.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, module_name, text in COMMANDS:
        module = _import(command, module_name)
        if isinstance(module, str):
            p = sub.add_parser(command, help=text, description=text, add_help=False)  # takes any options
            p.set_defaults(func=_unavailable(module), any_options=True)
            continue
        description = (module.__doc__ or text).split("\n\n")[0]
        p = sub.add_parser(command, help=text, description=description)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `waveclip` console script; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "any_options", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
