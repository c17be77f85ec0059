"""What several commands share: the user-error type, option parsers, device and precision checks."""

from __future__ import annotations

import argparse
import contextlib
import sys

PRECISIONS = ("amp", "fp32", "bf16")  # amp: bf16 autocast over fp32 weights; bf16: weights and activations


class UserError(Exception):
    """A mistake in the command's inputs: reported as one line, without a traceback."""


def one_line(err: BaseException) -> str:
    """The whole message of an error on one line (its lines joined), or its type when it has none."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def config_from_preset(preset: str):
    from waveclip.config import WaveCLIPConfig

    return WaveCLIPConfig.from_preset(preset)  # ValueError naming the known presets


def check_device(device: str) -> None:
    """Accept cpu, cuda and cuda:N (N an existing GPU); anything else is a UserError."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from err
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu, cuda and cuda:N are supported")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_precision(precision: str | None, device: str) -> str:
    """The precision to run: the one asked for, else amp on CUDA and fp32 on the CPU."""
    import torch

    if precision is not None:
        return precision
    return "amp" if torch.device(device).type == "cuda" else "fp32"


def describe_precision(precision: str) -> str:
    return {
        "amp": "amp (bf16 autocast, fp32 weights)",
        "fp32": "fp32",
        "bf16": "bf16 (weights and activations)",
    }[precision]


def autocast(precision: str, device: str):
    """The context the model runs in: bf16 autocast for amp, nothing otherwise."""
    import torch

    if precision == "amp":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="amp: bf16 autocast over fp32 weights; fp32; bf16: weights and activations in bf16 "
        "(default: amp on CUDA, fp32 on the CPU)",
    )


def progress(iterable=None, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)
