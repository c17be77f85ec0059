"""Compile the Triton kernel variants a GPU run needs, in parallel, before the run (warm on-disk cache).

    python -m bench.gpu_warmup                 # on the GPU machine: every core, into Triton's cache
    python -m bench.gpu_warmup --dry-run       # here: a few tiny variants, for sm_90 without a GPU

A cold compile takes seconds (minutes for float32/float64 tiles) and an autotuned launch compiles
every config its pruning keeps, one after another, in the process that first launches it. This
module does that work up front: each variant (a launcher of `waveclip_kernels.triton` at the
shapes of a GPU test or benchmark) runs in one process of a pool, with every launch turned into a
compile (`warmup=True`, nothing runs on the device) and every autotuned launch compiling each kept
config. The compiled kernels land in Triton's on-disk cache (TRITON_CACHE_DIR), where the tests and
benchmarks that follow find them. Batch sizes do not enter a kernel's specialisation (strides do not
depend on them), so the variants use batch 1 or 2; the split count of the KV kernel does depend on
the batch, so it is computed from the real one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import os
import sys
import time

# (what, dtype, args): the shapes the GPU tests (tests/kernels/test_triton_gpu.py,
# test_attention_grad_gpu.py) and the CUDA benchmarks (bench_attention.GPU_CASES,
# bench_tokenizer.GPU_CASES, bench_training.GPU_CASES) launch. "block_causal_grad" is the forward
# (with its log-sum-exp) and the backward's three kernels; float32 at torch's default ("highest").
LOW = ("float16", "bfloat16")
ALL = ("float16", "bfloat16", "float32", "float64")


def variants(dry_run: bool) -> list[tuple[str, str, tuple]]:
    if dry_run:
        return [
            ("block_causal", "bfloat16", (12, (16, 16, 16), 64)),
            ("kv_append", "bfloat16", (1, 12, 16, 32, 64, 64, False)),
            ("block_causal_grad", "bfloat16", (12, (16, 16, 16), 64)),
            ("tokenize", "float32", ((64, 64), 2, (4, 4))),
        ]
    out = []
    for dtype in LOW:  # the 448 preset's full pass, and the benchmarks' two presets
        out += [("block_causal", dtype, (12, (197,) * 4, 64)), ("block_causal", dtype, (12, (50,) * 4, 64))]
    out += [("block_causal", dtype, (3, (1, 99, 57, 143), d)) for dtype in ALL for d in (32, 64, 80, 128)]
    for dtype in LOW:  # (B, H, n, lens, n_max, D, indexed): the tests' steps, then the benchmarks' steps
        for B, n, lens in ((64, 197, 591), (1, 197, 591), (2, 1, 700), (4, 50, 150)):
            out.append(("kv_append", dtype, (B, 12, n, lens, 800, 64, B > 1)))
    for B, n in ((128, 50), (32, 197)):
        out += [("kv_append", "float16", (B, 12, n, s * n, 4 * n, 64, False)) for s in (1, 2, 3)]
    for dtype in ("float32", "float16", "bfloat16"):
        out += [("tokenize", dtype, ((224, 224), 3, (7, 7))), ("tokenize", dtype, ((448, 448), 3, (14, 14)))]
    for dtype in LOW:  # the gradient tests: a 1-token first block, then stages of s tokens
        out += [("block_causal_grad", dtype, (12, (1, s - 1, s, s, s), d)) for s, d in ((197, 64), (50, 80), (97, 128))]
    out += [("block_causal_grad", dtype, (3, (1, 99, 57, 143), 64)) for dtype in ("float32", "float64")]
    # the training benchmark (its attention cases and both towers) and the peak-memory test, bf16
    out += [("block_causal_grad", "bfloat16", (12, (s,) * 4, 64)) for s in (50, 197, 394)]
    return out


def _prepare_worker(dry_run: bool) -> None:
    """Each pool process: compiled Triton (no interpreter), every launch a compile, all kept configs."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if dry_run:
        from bench.compile_sweep import H200

        driver.set_active(H200())
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    def every_kept_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        kept = self.prune_configs(kwargs)
        for config in kept[:1] if dry_run else kept:  # a dry run proves the machinery on one config
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run, Autotuner.run = compile_only, every_kept_config


def _run(variant: tuple[str, str, tuple], dry_run: bool) -> tuple[str, float, str]:
    """Compile one variant in this (pool) process; returns (description, seconds, error or "")."""
    import torch

    from waveclip_kernels import triton as T

    what, dtype_name, args = variant
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu" if dry_run else "cuda")
    start = time.perf_counter()
    try:
        if what == "block_causal":
            heads, blocks, d = args
            q = torch.empty(1, heads, sum(blocks), d, dtype=dtype, device=device)
            T.block_causal_attention(q, q, q, list(blocks), d**-0.5)
        elif what == "block_causal_grad":
            heads, blocks, d = args
            q = torch.empty(1, heads, sum(blocks), d, dtype=dtype, device=device)
            out, lse = T.block_causal_attention_forward(q, q, q, list(blocks), d**-0.5)
            T.block_causal_attention_backward(q, q, q, q, out, lse, list(blocks), d**-0.5)
        elif what == "kv_append":
            B, heads, n, lens, n_max, d, indexed = args
            b = min(B, 2)
            q = torch.empty(b, heads, n, d, dtype=dtype, device=device)
            cache = torch.empty(b + 1, heads, n_max, d, dtype=dtype, device=device)
            cache_lens = torch.full((b,), lens, dtype=torch.int32, device=device)
            index = torch.arange(b, 0, -1, device=device) if indexed else None
            splits = T.num_kv_splits(B * heads * -(-n // T.attention.SPLIT_BLOCK_M), n_max, device)
            T.attention_with_kv_append(q, q, q, cache, cache.clone(), cache_lens, index, d**-0.5, num_splits=splits)
        else:
            size, levels, grid = args
            x = torch.empty(1, 3, *size, dtype=dtype, device=device)
            T.wavelet_detokenize(T.wavelet_tokenize(x, levels, grid, "ycbcr", dtype), levels, grid, "ycbcr", size)
        error = ""
    except Exception as err:  # reported; the run that needs this variant will compile it itself
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return f"{what} {dtype_name} {args}", time.perf_counter() - start, error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dry-run", action="store_true", help="tiny variants, compiled for sm_90 without a GPU")
    args = parser.parse_args(argv)
    todo = variants(args.dry_run)
    start = time.perf_counter()
    print(f"warm-up: {len(todo)} kernel variants on {args.jobs} processes", flush=True)
    context = multiprocessing.get_context("spawn")  # no CUDA state shared with the parent
    failed = 0
    with futures.ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=_prepare_worker, initargs=(args.dry_run,)
    ) as pool:
        for name, seconds, error in pool.map(_run, todo, [args.dry_run] * len(todo)):
            failed += bool(error)
            print(f"  {seconds:6.1f} s  {name}" + (f"  FAILED: {error}" if error else ""), flush=True)
    print(f"warm-up done in {time.perf_counter() - start:.0f} s; {failed} variants failed to compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
