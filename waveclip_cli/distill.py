"""Distil a WaveCLIP student from a frozen open_clip teacher (every exit toward the teacher's embedding).

    waveclip distill --teacher ViT-B-16 --teacher-weights vit_b_16.safetensors --data photos/ --out runs/student
    torchrun --nproc_per_node 2 -m waveclip_cli.distill --teacher ViT-B-16 ... (the same options, DDP)

The options become a `waveclip_train.DistillOptions`; `waveclip_train.distill.distill` runs them. A bad
option, bad data or a checkpoint that does not fit prints one line on stderr and exits with status 1,
before any training step.
"""

from __future__ import annotations

import argparse
import sys

from waveclip_train.data import DataError
from waveclip_train.options import DistillOptions

from ._data_args import add_data_arguments, fields_of
from .common import csv_list, floats

PROG = "waveclip distill"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `waveclip distill` (and `python -m waveclip_cli.distill`); defaults from DistillOptions."""
    d = DistillOptions(data=["."], out=".")
    t = parser.add_argument_group("teacher and student")
    t.add_argument("--teacher", default=d.teacher, help="open_clip model name or model config .json (default ViT-B-16)")
    t.add_argument("--teacher-weights", help="local checkpoint file or cached pretrained tag (default: random weights)")
    t.add_argument("--preset", default=d.preset, help=f"student preset; trunk sizes come from the teacher ({d.preset})")
    t.add_argument("--image-size", type=int, help="student input size in pixels (default: the preset's)")
    t.add_argument("--levels", type=int, help="wavelet levels L (default: the preset's)")
    t.add_argument("--grid", type=int, help="token grid per stage (default: the preset's)")
    t.add_argument("--impl", default=d.impl, help="kernel implementation of the student (default: auto)")
    add_data_arguments(parser)
    o = parser.add_argument_group("optimisation")
    o.add_argument("--out", required=True, help="output folder: the student, checkpoints/, train_log.csv")
    o.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    o.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help=f"per process and micro-batch ({d.batch_size})")
    o.add_argument("--accum-steps", type=int, default=d.accum_steps, help="micro-batches per optimizer step (1)")
    o.add_argument("--lr", type=float, default=d.lr, help=f"trunk learning rate ({d.lr})")
    o.add_argument("--lr-new", type=float, default=d.lr_new, help=f"learning rate of the new embeddings ({d.lr_new})")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay ({d.weight_decay})")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (0)")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor / peak lr (0)")
    o.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping, 0: off (1.0)")
    o.add_argument("--exit-weights", type=floats, help="comma-separated w_s per exit (default: 1 each)")
    o.add_argument("--class-names", type=csv_list, help="comma-separated class names: adds the KL term")
    o.add_argument("--kl-weight", type=float, default=d.kl_weight, help=f"weight of the KL term ({d.kl_weight})")
    o.add_argument("--kl-temperature", type=float, default=d.kl_temperature, help="softmax temperature of the KL term")
    r = parser.add_argument_group("run")
    r.add_argument(
        "--precision",
        default=d.precision,
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast: auto = bf16 on GPU, fp32 on CPU",
    )
    r.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and RNGs (0)")
    r.add_argument("--num-workers", type=int, default=d.num_workers, help=f"data loader workers ({d.num_workers})")
    r.add_argument(
        "--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: only at the end)"
    )
    r.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (2; 0: all)")
    r.add_argument("--resume", help="checkpoint folder to continue from, or 'auto' for the latest under --out")
    r.add_argument("--teacher-cache", help="folder caching the teacher's embeddings across epochs and runs")
    r.add_argument("--eval-images", type=int, default=d.eval_images, help="images in the before/after cosine check")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> DistillOptions:
    """The parsed arguments as DistillOptions (ValueError naming the bad field)."""
    return DistillOptions(**fields_of(args, DistillOptions), progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """`waveclip distill`: returns the exit status."""
    from waveclip_train.distill import distill
    from waveclip_train.distributed import shutdown

    try:
        distill(options_from_args(args))
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
