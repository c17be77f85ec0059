"""Compile every autotune config of every Triton kernel for sm_90 (H100/H200), without a GPU.

    python -m bench.compile_sweep                     # all dtypes, head dims 64/80/128, every core
    python -m bench.compile_sweep --jobs 2 --dtypes bf16 --head-dims 64 --csv out.csv

The interpreter accepts what a GPU rejects, so this compiles the kernels the way a GPU run would
(Triton's full pipeline down to an sm_90a cubin, with ptxas) under a stand-in driver that names an
sm_90 target (`H200` below), and reads each compile's resources: shared memory from the kernel's
metadata, registers and spills from ptxas's report (TRITON_DUMP_PTXAS_LOG=1).

What is compiled is found, not listed: each workload calls a launcher of `waveclip_kernels.triton`
on CPU tensors at model-like shapes; every autotuned launch compiles each of its autotuner's
`configs` (and any config its pruning makes up), marking which ones the kernel's own pruning keeps
for these arguments; every plain launch compiles the config it asks for. New configs and kernels
behind the workloads' launchers are picked up as they come; a kernel of the Triton backend that no
workload launches fails the sweep by name.

Rules (exit status 1 when one breaks):
  - a kept config needs at most SHARED_LIMIT bytes of shared memory (Hopper's per-block maximum);
  - a kept float16/bfloat16 config spills nothing (float32/float64 spills are reported);
  - every kept config compiles.
A config the pruning drops is listed (compiled and measured with --all-configs: a 128-row float64
tile takes minutes), never a failure. Workloads run in parallel
processes, each with its own fresh Triton cache (so ptxas runs and reports), and write one CSV row
per compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import io
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import time

SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (H100, H200)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
HEAD_DIMS = (64, 80, 128)
LOW_PRECISION = ("float16", "bfloat16")
FP32_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision
COLUMNS = (
    "kernel", "workload", "config", "kept", "dtype", "fp32_precision", "head_dim", "shared_bytes", "registers",
    "spill_stores", "spill_loads", "dot_precisions", "scale_type", "ttir_f32", "loads_without_other", "compile_s",
    "verdict", "note",
)  # fmt: skip
DEFAULT_CSV = pathlib.Path(__file__).resolve().parent / "results" / "compile" / "sm90.csv"
ROW_MARK = "@@sweep-row "


# ------------------------------------------------------------------------ workloads (one process)


def _workloads():
    """name -> (uses a head dim, fn(dtype, head_dim)): each calls launchers of the Triton backend."""
    import torch

    from waveclip_kernels import triton as T

    def block_causal(dtype, d):
        q = torch.empty(2, 12, 200, d, dtype=dtype)  # the 224 preset: 4 blocks of 50
        T.block_causal_attention(q, q, q, [50] * 4, d**-0.5)

    def block_causal_backward(dtype, d):  # delta preprocess, dK/dV, dQ
        q, lse = torch.empty(2, 12, 200, d, dtype=dtype), torch.empty(2, 12, 200, dtype=_acc(dtype))
        T.block_causal_attention_backward(q, q, q, q, q, lse, [50] * 4, d**-0.5)

    def kv_append(dtype, d):
        q, cache = torch.empty(2, 12, 50, d, dtype=dtype), torch.empty(2, 12, 256, d, dtype=dtype)
        T.attention_with_kv_append(q, q, q, cache, cache.clone(), torch.tensor([50, 100]), None, d**-0.5, num_splits=1)

    def kv_append_split(dtype, d):  # split-KV with a batch index: the partial-output branch and the combine
        q, cache = torch.empty(2, 12, 50, d, dtype=dtype), torch.empty(3, 12, 256, d, dtype=dtype)
        lens, index = torch.tensor([50, 100]), torch.tensor([2, 0])
        T.attention_with_kv_append(q, q, q, cache, cache.clone(), lens, index, d**-0.5, num_splits=4)

    def tokenizer(dtype, _):
        for size, grid in (((224, 224), (7, 7)), ((448, 448), (14, 14))):  # the two presets, L = 3
            x = torch.empty(2, 3, *size, dtype=dtype)
            tokens = T.wavelet_tokenize(x, 3, grid, "ycbcr", dtype)
            T.wavelet_detokenize(tokens, 3, grid, "ycbcr", size)

    return {
        "block_causal": (True, block_causal),
        "block_causal_backward": (True, block_causal_backward),
        "kv_append": (True, kv_append),
        "kv_append_split": (True, kv_append_split),
        "tokenizer": (False, tokenizer),
    }


def _acc(dtype):
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


class H200:
    """What Triton's launch path asks of a driver, answered for an sm_90 target (no GPU needed)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}

# constexprs that follow from the inputs (dtype, head dim), not from the config
_DERIVED = ("HEAD_DIM", "D_PAD", "UPCAST", "ACC", "COMPUTE", "DOT_PRECISION")


def _label(meta: dict, constexprs: set[str]) -> str:
    """A launch's config as text: its tile constexprs, then warps and stages."""
    parts = [f"{k}={v}" for k, v in meta.items() if k in constexprs and k not in _DERIVED]
    return " ".join([*parts, f"warps={meta.get('num_warps', 4)}", f"stages={meta.get('num_stages', 3)}"])


def _ttir_facts(kernel) -> dict:
    """What the Triton IR says: dot input precisions (IEEE is not printed), the scale argument's type,
    whether f32 appears anywhere (it must not in a float64 kernel: a Python float argument is typed
    fp32), and masked loads without `other=` (their masked-off lanes are undefined on a GPU)."""
    ttir = kernel.asm["ttir"]
    loads = [line.split("tt.load", 1)[1].split(" : ")[0] for line in ttir.splitlines() if "tt.load" in line]
    return {
        "dot_precisions": " ".join(sorted(set(re.findall(r"inputPrecision = (\w+)", ttir)))),
        "scale_type": str(kernel.src.signature.get("scale_ptr", "")),
        "ttir_f32": "f32" in ttir,
        "loads_without_other": sum(1 for operands in loads if len(operands.split(",")) == 2),
    }


def _emit(row: dict) -> None:
    print(ROW_MARK + json.dumps(row), flush=True)


def _largest(configs: list, kernel: str, dtype, head_dim: int) -> list:
    """The one config of `configs` with the largest shared-memory estimate (attention kernels)."""
    from waveclip_kernels.triton import attention as A

    family = ESTIMATED[kernel]
    return [
        max(
            configs,
            key=lambda c: A.shared_memory_estimate(
                family, dtype, head_dim, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
            ),
        )
    ]


# autotuned kernels -> their family in `attention.shared_memory_estimate`
ESTIMATED = {
    "_block_causal_fwd_kernel": "forward",
    "_attn_kv_append_kernel": "kv_append",
    "_bwd_dq_kernel": "backward_dq",
    "_bwd_dkdv_kernel": "backward_dkdv",
}


def run_workload(
    name: str, dtype_name: str, head_dim: int | None, pick: str = "kept", precisions: list[str] | None = None
) -> None:
    """Compile every launch of one workload; print one marked JSON row per config (this process).
    `pick`: "kept" compiles the configs the pruning keeps and lists the others, "all" compiles those
    too, "largest" compiles only the kept config with the largest shared-memory estimate. float32
    runs under each of `precisions` (torch float32 matmul precisions; default all three)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import torch
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    driver.set_active(H200())
    base = {"workload": name, "dtype": dtype_name, "head_dim": head_dim if head_dim is not None else ""}
    launch, current, seen = JITFunction.run, {}, set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        constexprs = {self.arg_names[i] for i in self.constexprs}
        row = dict(base, kernel=self.fn.__name__, config=_label(kwargs, constexprs), kept=True, note="")
        row.update(current)
        log, start = io.StringIO(), time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # a config that does not compile is a row, not the end of the sweep
            row.update(verdict="error", note=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
            _emit(row)
            return None
        if not log.getvalue().strip() and (row["kernel"], row["config"]) in seen:
            return kernel  # the same binary again (another fp32 matmul precision that changes nothing)
        seen.add((row["kernel"], row["config"]))
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["shared_bytes"] = kernel.metadata.shared
        row.update(_ttir_facts(kernel))
        for key, pattern in _PTXAS.items():
            found = pattern.findall(log.getvalue())
            row[key] = max(map(int, found)) if found else ""
        _emit(row)
        return kernel

    def every_config(self, *args, **kwargs):
        """Each config of the autotuner, and which of them its pruning keeps for these arguments."""
        self.nargs = dict(zip(self.arg_names, args))
        try:
            kept = {str(c): c for c in self.prune_configs(kwargs)}
        except Exception as err:
            name = self.base_fn.__name__
            _emit(dict(base, kernel=name, config="(pruning)", kept=True, verdict="error", note=f"{err}"))
            kept = {}
        candidates = {str(c): c for c in self.configs}
        candidates.update(kept)  # a pruning function may make up configs of its own
        if pick == "largest" and kept:
            kept = {str(c): c for c in _largest(list(kept.values()), self.base_fn.__name__, dtype, head_dim)}
            candidates = dict(kept)
        for text, config in candidates.items():
            if text not in kept and pick != "all":
                label = _label({**config.kwargs, **config.all_kwargs()}, set(config.kwargs))
                _emit(dict(base, kernel=self.base_fn.__name__, config=label, kept=False, note="not compiled"))
                continue
            label = _label({**config.kwargs, **config.all_kwargs()}, set(config.kwargs))
            current.update(kept=text in kept, config=label)
            try:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                current.clear()
        self.nargs = None

    JITFunction.run, Autotuner.run = compile_only, every_config
    # float32 runs under each of torch's float32 matmul precisions (the attention dots follow it);
    # a precision that yields the same binary adds no row.
    dtype = getattr(torch, dtype_name)
    for precision in (precisions or FP32_PRECISIONS) if dtype_name == "float32" else ("highest",):
        torch.set_float32_matmul_precision(precision)
        base["fp32_precision"] = precision if dtype_name == "float32" else ""
        _workloads()[name][1](dtype, head_dim)


def kernels_of_backend() -> set[str]:
    """Names of every @triton.jit kernel (a function named *_kernel) of `waveclip_kernels.triton`."""
    import importlib
    import pkgutil

    import waveclip_kernels.triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {n for n, obj in vars(module).items() if n.endswith("_kernel") and hasattr(obj, "fn")}
    return names


# ------------------------------------------------------------------------------ the sweep (parent)


def _tasks(dtypes: list[str], head_dims: list[int], only: list[str] | None) -> list[tuple[str, str, int | None]]:
    os.environ.pop("TRITON_INTERPRET", None)
    tasks = []
    for name, (uses_head_dim, _) in _workloads().items():
        if only and name not in only:
            continue
        for dtype in dtypes:
            for d in head_dims if uses_head_dim else [None]:
                tasks.append((name, dtype, d))
    # slowest first (float64/float32, large head dims), so the pool does not end on one long task
    rank = {"float64": 0, "float32": 1, "bfloat16": 2, "float16": 3}
    return sorted(tasks, key=lambda t: (rank[t[1]], -(t[2] or 0)))


def _run_task(task, cache_root: str, timeout_s: float, pick: str, precisions) -> list[dict]:
    name, dtype, d = task
    env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(dir=cache_root))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "bench.compile_sweep", "--one", json.dumps([*task, pick, precisions])]
    base = {"workload": name, "dtype": dtype, "head_dim": d if d is not None else ""}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        rows = [json.loads(line[len(ROW_MARK) :]) for line in out.splitlines() if line.startswith(ROW_MARK)]
        note = f"timed out after {timeout_s:.0f} s"
        return [*rows, dict(base, kernel="?", config="?", kept=True, verdict="error", note=note)]
    rows = [json.loads(line[len(ROW_MARK) :]) for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
        note = f"workload failed: {tail[0][:300]}"
        rows.append(dict(base, kernel="?", config="?", kept=True, verdict="error", note=note))
    return rows


def judge(row: dict) -> dict:
    """Set the row's verdict: ok, FAIL (a rule above broken by a kept config), or pruned."""
    kept = row.get("kept") in (True, "True")
    problems = []
    if row.get("verdict") == "error":
        problems.append(row.get("note", "did not compile"))
    else:
        shared = int(row.get("shared_bytes") or 0)
        if shared > SHARED_LIMIT:
            problems.append(f"shared {shared} B > {SHARED_LIMIT} B")
        spills = int(row.get("spill_stores") or 0) + int(row.get("spill_loads") or 0)
        if spills and row["dtype"] in LOW_PRECISION:
            stores, loads = row.get("spill_stores"), row.get("spill_loads")
            problems.append(f"{row['dtype']} spills {stores} B stores / {loads} B loads")
    if not kept:
        row["verdict"] = "pruned"
        if problems:
            row["note"] = "; ".join(problems)
    elif problems:
        row["verdict"] = "FAIL"
        row["note"] = "; ".join(problems)
    else:
        row["verdict"] = "ok"
    return row


def _table(rows: list[dict]) -> str:
    cols = ("kernel", "workload", "config", "dtype", "fp32_precision", "head_dim", "kept", "shared_bytes",
            "registers", "spill_stores", "spill_loads", "compile_s", "verdict")  # fmt: skip
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def compile_rows(tasks, jobs: int = 1, pick: str = "kept", precisions=None, timeout_s: float = 1500):
    """Compile `tasks` ((workload, dtype name, head dim or None) each) for sm_90 in `jobs` parallel
    processes, each with a fresh Triton cache; yields the judged rows as workloads finish. `pick` and
    `precisions` as in `run_workload`."""
    # each thread of the pool waits on one subprocess
    with tempfile.TemporaryDirectory(prefix="triton-sweep-") as cache_root, futures.ThreadPoolExecutor(jobs) as pool:
        pending = [pool.submit(_run_task, t, cache_root, timeout_s, pick, precisions) for t in tasks]
        for done in futures.as_completed(pending):
            yield from map(judge, done.result())


def sweep(
    dtypes, head_dims, jobs: int, csv_path: pathlib.Path, only=None, timeout_s: float = 1500, pick: str = "kept"
) -> int:
    """Run the sweep; print the table; write the CSV row by row; return the exit status."""
    tasks = _tasks(dtypes, head_dims, only)
    start = time.perf_counter()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"compile sweep for sm_90: {len(tasks)} workloads on {jobs} processes -> {csv_path}", flush=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in compile_rows(tasks, jobs, pick, timeout_s=timeout_s):
            rows.append(row)
            writer.writerow(row)
            f.flush()
            mark = "  <-- " + row["note"] if row["verdict"] in ("FAIL", "error") else ""
            print(f"  {row['kernel']:26} {row['dtype']:9} d={row['head_dim']!s:4} {row['config']:55} "
                  f"{row['verdict']}{mark}", flush=True)  # fmt: skip
    order = {n: i for i, n in enumerate(_workloads())}
    rows.sort(key=lambda r: (order.get(r["workload"], 99), r["kernel"], r["dtype"], str(r["head_dim"]), r["config"]))
    with csv_path.open("w", newline="") as f:  # the same rows, sorted
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print()
    print(_table(rows))
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    missing = sorted(kernels_of_backend() - {r["kernel"] for r in rows}) if not only else []
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
    print(f"\n{len(rows)} rows in {wall:.0f} s wall, {cpu:.0f} s CPU on {jobs} processes; CSV: {csv_path}")
    for r in failed:
        print(f"FAIL {r['kernel']} [{r['config']}] {r['dtype']} head dim {r['head_dim'] or '-'}: {r['note']}")
    for name in missing:
        print(f"FAIL {name}: no workload of bench/compile_sweep.py launches this kernel")
    if not rows:
        print("FAIL: nothing was compiled")
    return 1 if failed or missing or not rows else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    parser.add_argument("--workloads", nargs="+", default=None, help="only these workloads (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--csv", type=pathlib.Path, default=DEFAULT_CSV)
    parser.add_argument("--timeout", type=float, default=1500, help="seconds one workload may take")
    parser.add_argument(
        "--all-configs", action="store_true", help="compile the configs the pruning drops too (fp64: minutes each)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: compile one [workload, dtype, head_dim]
    args = parser.parse_args(argv)
    if args.one:
        run_workload(*json.loads(args.one))
        return 0
    dtypes = [DTYPES[d] for d in args.dtypes]
    pick = "all" if args.all_configs else "kept"
    return sweep(dtypes, args.head_dims, max(1, args.jobs), args.csv, args.workloads, args.timeout, pick)


if __name__ == "__main__":
    sys.exit(main())
