"""Microbenchmarks (tokenizer, attention), the end-to-end model against open_clip, and images/s under the
gate. Each writes a CSV stamped with device, versions, date and commit, and PNG plots; README_tables.md
collects them as markdown tables."""

from __future__ import annotations

import argparse
import importlib
import pathlib

from .common import UserError, check_device, config_from_preset, progress
from .flops import write_flops_csv

OPS = ("tokenizer", "attention", "model", "gate")
TEACHER_OPS = ("model", "gate")  # benchmarks that compare against the preset's open_clip teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", default="all", choices=(*OPS, "all"), help="what to run (default all)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    parser.add_argument("--out", help="output folder (default bench/results/cpu or bench/results/gpu)")
    parser.add_argument("--preset", default="waveclip-vit-b-16", help="model preset for model/gate and the FLOP table")
    parser.add_argument("--batch", type=int, help="batch of the model benchmark (default 8)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement")


def _module(name: str):
    """A module of the installed `bench` package (the benchmarks ship with waveclip)."""
    return importlib.import_module(f"bench.{name}")


def _check_options(args, ops) -> None:
    config = config_from_preset(args.preset)
    needs_teacher = [op for op in ops if op in TEACHER_OPS]
    if needs_teacher and not config.teacher:
        raise UserError(
            f"preset {args.preset} has no open_clip teacher, which `--op {needs_teacher[0]}` compares against: "
            "use --op tokenizer or attention, or a preset with a teacher (e.g. waveclip-vit-b-16)"
        )
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_device(args.device)


def _run_op(op: str, args, out: pathlib.Path) -> None:
    if op in ("tokenizer", "attention"):
        _module(f"bench_{op}").run(out, args.device, quick=args.quick)
    elif op == "model":
        batch = args.batch or (1 if args.quick else 8)
        repeats = 1 if args.quick else 5
        _module("bench_model").run(out, batch=batch, repeats=repeats, device=args.device, preset=args.preset)
    else:
        _module("bench_gate").run(out, args.device, quick=args.quick, preset=args.preset)


def run(args) -> int:
    import torch

    from waveclip.flops import exit_table

    ops = OPS if args.op == "all" else (args.op,)
    _check_options(args, ops)
    if args.threads:
        torch.set_num_threads(args.threads)
    common, tables = _module("common"), _module("tables")
    out = pathlib.Path(args.out or common.DEFAULT_OUT / ("gpu" if args.device == "cuda" else "cpu"))
    for op in progress(ops, desc="bench", unit="op", disable=len(ops) < 2):
        print(f"== {op} ({args.device}) -> {out}", flush=True)
        _run_op(op, args, out)
        print(tables.render(f"{op}.csv", common.read_csv(out / f"{op}.csv")))
    write_flops_csv(out, args.preset, exit_table(config_from_preset(args.preset)))
    print(f"tables: {tables.write_tables(out)}")
    return 0
