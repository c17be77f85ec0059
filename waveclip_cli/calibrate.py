"""Calibrate the margin gate: the cheapest per-stage thresholds that keep accuracy (or agreement) on target.

    waveclip calibrate --checkpoint runs/student --data held_out/ --labels-from-folders --max-drop 1.0
    waveclip calibrate --checkpoint runs/student --data held_out/ --prototypes-from labelled/ --min-agreement 99

The options become a `waveclip_train.CalibrateOptions`; `waveclip_train.calibrate.run_calibration` runs
them (the search is described there). The target is --max-drop (accuracy points below the last exit,
needs labels) or --min-agreement (percent agreement with the last exit's prediction), not both; with
neither, labelled data gets --max-drop 1 and unlabelled data --min-agreement 99. Bad options, bad data
or files that do not fit print one line on stderr before the checkpoint runs on any image.
"""

from __future__ import annotations

import argparse
import sys

from waveclip_train.data import DataError
from waveclip_train.options import CalibrateOptions

from ._data_args import add_data_arguments, fields_of
from .common import csv_list

PROG = "waveclip calibrate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `waveclip calibrate` (and `python -m waveclip_cli.calibrate`)."""
    d = CalibrateOptions(checkpoint=".", embeddings=".")
    parser.add_argument("--checkpoint", required=True, help="WaveCLIP checkpoint folder; its config.json is updated")
    add_data_arguments(parser, required=False)
    parser.add_argument("--embeddings", help="saved exit embeddings (.pt or .npz) instead of --data")
    parser.add_argument("--save-embeddings", help="with --data: also save the computed embeddings (.pt) here")
    cls = parser.add_argument_group("classes (one of)")
    cls.add_argument(
        "--class-names", type=csv_list, help="comma-separated class names, embedded with the teacher's text tower"
    )
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
    tgt = parser.add_argument_group("target (one of; default: --max-drop 1 with labels, else --min-agreement 99)")
    one = tgt.add_mutually_exclusive_group()
    one.add_argument("--max-drop", type=float, help="accuracy points allowed below the last exit (needs labels)")
    one.add_argument(
        "--min-agreement", type=float, help="percent agreement with the last exit's prediction (labels unused)"
    )
    tgt.add_argument("--no-labels", action="store_true", help="calibrate on agreement even when labels are known")
    parser.add_argument(
        "--max-candidates", type=int, default=d.max_candidates, help="candidate thresholds per stage (default 64)"
    )
    parser.add_argument("--out", default=d.out, help="folder for the CSV and PNG (default: .)")
    parser.add_argument("--name", default=d.name, help="file name of the CSV and PNG (default: calibration)")
    parser.add_argument("--dry-run", action="store_true", help="do not write the thresholds into the checkpoint")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per batch ({d.batch_size})")
    parser.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader workers (0)")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default: cpu)")
    parser.add_argument("--impl", default=d.impl, help="kernel implementation of the model (default: auto)")


def options_from_args(args: argparse.Namespace) -> CalibrateOptions:
    """The parsed arguments as CalibrateOptions (ValueError naming the bad field)."""
    return CalibrateOptions(**fields_of(args, CalibrateOptions))


def run(args: argparse.Namespace) -> int:
    """`waveclip calibrate`: returns the exit status."""
    from waveclip_train.calibrate import run_calibration

    try:
        run_calibration(options_from_args(args))
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
