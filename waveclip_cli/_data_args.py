"""The data options `waveclip distill` and `waveclip calibrate` share (fields of their option dataclasses)."""

from __future__ import annotations

import argparse

from waveclip_train.data import SPLITS


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data (repeatable), --split, --holdout-fraction, --labels-from-folders, --skip-unreadable."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        action="append",
        required=required,
        metavar="SOURCE",
        help="image folder, list file (path[TAB label] per line), builtin:textiles or builtin:skimage; repeatable",
    )
    g.add_argument("--split", choices=SPLITS, default="all", help="which part of the sources to use (default: all)")
    g.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="share of each source in the holdout split, chosen by a hash of the file name (default: 0.2)",
    )
    g.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="take each image's class from its first sub-folder under the source",
    )
    g.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out images that cannot be decoded, with one warning (default: stop with an error)",
    )


def fields_of(args: argparse.Namespace, cls) -> dict:
    """The parsed arguments that are fields of the dataclass `cls`."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}
