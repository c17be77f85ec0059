"""Shared benchmark machinery: timing, the environment stamp, CSV output and PNG plots.

Timing on a GPU uses CUDA events around each call (optionally writing a buffer twice the size of
L2 between calls so that a memory-bound op cannot read its inputs from cache); on the CPU it is
the median of `time.perf_counter` intervals, with the process CPU time of each call alongside (on
a shared machine it moves less than wall time when other work competes for the cores). Both warm
up first and size the number of repetitions to a time budget, so slow baselines do not stall a run.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import math
import os
import pathlib
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
# The impls of waveclip_kernels that may run on each device type; the Triton interpreter is never timed.
CONCRETE_IMPLS = {"cpu": ("triton", "cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
TRITON_ON_CPU = "excluded on CPU: Triton runs there only under its interpreter, far too slow to time"
ENV_COLUMNS = ("device", "torch", "triton", "cuda", "python", "threads", "load1", "date", "commit")


@dataclass
class Timing:
    ms: float  # median wall time over the timed repetitions
    ms_min: float
    reps: int
    cpu_ms: float | None = None  # CPU only: median process CPU time per call (all threads), less load-sensitive


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A byte buffer twice the size of the device's L2 cache (256 MiB when the size is unknown)."""
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 128 * 2**20
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def time_fn(
    fn: Callable[[], object],
    device: str | torch.device,
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 200,
    budget_s: float = 1.0,
    flush_l2: bool = False,
) -> Timing:
    """Median wall time of `fn()` in milliseconds.

    Args:
        fn: the call to time; its inputs are prepared beforehand (nothing is built inside).
        device: where `fn` runs; "cuda" uses CUDA events, anything else `time.perf_counter`.
        warmup: untimed calls first (compilation, autotuning, allocator warm-up).
        min_reps, max_reps: bounds on the timed repetitions; between them the count fills `budget_s`.
        budget_s: time to spend on the timed repetitions (after one estimate call).
        flush_l2: GPU only: overwrite a 2x-L2 buffer before every call (memory-bound ops).

    Returns:
        Timing(median ms, min ms, repetitions, and on the CPU the median process CPU ms).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    estimate = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / estimate)))
    if cuda:
        flush = _l2_flush_buffer(device) if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            if flush is not None:
                flush.zero_()
            begin.record()
            fn()
            end.record()
        sync()
        times = [begin.elapsed_time(end) for begin, end in events]
        cpu_times = None
    else:
        times, cpu_times = [], []
        for _ in range(reps):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    cpu_ms = statistics.median(cpu_times) if cpu_times else None
    return Timing(ms=statistics.median(times), ms_min=min(times), reps=reps, cpu_ms=cpu_ms)


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    device: str | torch.device,
    *,
    warmup: int = 3,
    min_reps: int = 5,
    budget_s: float = 1.0,
) -> list[Timing]:
    """Timings of several calls made in turn, one call of each per round (synchronized on a GPU).

    On a machine shared with other work, load that comes and goes between separate timing loops moves
    their ratio; interleaving the calls exposes all of them to the same load, so their ratios are steadier.

    Args:
        fns: the calls, inputs prepared beforehand.
        device: where they run ("cuda" synchronizes around each call; timed with `time.perf_counter`).
        warmup: untimed rounds first.
        min_reps: fewest timed rounds (at most 200); between the two the count fills `budget_s`.
        budget_s: time to spend on the timed rounds, all calls together.

    Returns:
        One Timing per call, in order (median and min wall ms, rounds, median process CPU ms).
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(f: Callable[[], object]) -> tuple[float, float]:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        f()
        sync()
        return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3

    for _ in range(warmup):
        for f in fns:
            f()
    estimate = sum(once(f)[0] for f in fns)
    reps = int(min(200, max(min_reps, 1e3 * budget_s / max(estimate, 1e-3))))
    rounds = [[once(f) for f in fns] for _ in range(reps)]
    timings = []
    for i in range(len(fns)):
        wall = [r[i][0] for r in rounds]
        cpu = statistics.median(r[i][1] for r in rounds)
        timings.append(Timing(ms=statistics.median(wall), ms_min=min(wall), reps=reps, cpu_ms=cpu))
    return timings


def rates(ms: float, flops: float | None = None, nbytes: float | None = None) -> dict:
    """TFLOP/s and GB/s (1e9 bytes/s) of one call that took `ms` milliseconds."""
    out = {}
    if flops is not None:
        out["tflops"] = flops / (ms * 1e-3) / 1e12
    if nbytes is not None:
        out["gbps"] = nbytes / (ms * 1e-3) / 1e9
    return out


def first_line(err: BaseException | str, limit: int = 160) -> str:
    """The first line of an error message, shortened, for a CSV cell."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quiet_call(fn: Callable[[], object]) -> tuple[object, list[str]]:
    """Call `fn`, returning its result and the warning messages it raised (for refusal reasons)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def impl_providers(op: str, device: torch.device, call: Callable[[str], object]) -> list[dict]:
    """One provider per impl of `op` for this device: {provider, backend, fn} or a status saying why not.

    `call(impl)` runs the op with that impl on the benchmark's inputs.
    """
    import waveclip_kernels as wk

    out = []
    for impl in CONCRETE_IMPLS.get(device.type, ("reference",)):
        name = f"waveclip:{impl}"
        if impl == "triton" and device.type == "cpu":
            out.append({"provider": name, "backend": impl, "status": "skipped", "note": TRITON_ON_CPU})
            continue
        try:
            wk.resolve_impl(impl, op, device)
        except RuntimeError as err:
            out.append({"provider": name, "backend": impl, "status": "unavailable", "note": str(err)})
            continue
        out.append({"provider": name, "backend": impl, "fn": functools.partial(call, impl)})
    return out


# ------------------------------------------------------------------------------ environment


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


@functools.cache
def git_commit() -> str:
    """Short commit of the working tree, with "+dirty" when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT, capture_output=True)
        return commit + ("+dirty" if dirty.returncode else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str | torch.device) -> dict:
    """The stamp every CSV row carries: device, versions, date and commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load1": f"{os.getloadavg()[0]:.2f}",  # 1-minute load average when the CSV was written (shared machines)
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }


# ------------------------------------------------------------------------------------ output


def _cell(value) -> object:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return value


def write_csv(
    path: str | pathlib.Path, rows: list[dict], device: str | torch.device, env: dict | None = None
) -> pathlib.Path:
    """Write `rows` to `path`, each stamped with `environment(device)` (or `env`); columns: stamp, then
    row keys. The file is replaced whole (written beside it, then renamed), never left half written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device) if env is None else env
    columns = list(ENV_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(value) for key, value in {**env, **row}.items()})
    os.replace(partial, path)
    return path


class CsvRows(list):
    """A list of result rows that keeps `path` up to date: every append rewrites the CSV, so a run
    stopped part way (a timeout) leaves every row finished so far on disk."""

    def __init__(self, path: str | pathlib.Path, device: str | torch.device):
        super().__init__()
        self.path, self.device, self._env = pathlib.Path(path), device, environment(device)

    def append(self, row: dict) -> None:
        super().append(row)
        write_csv(self.path, self, self.device, self._env)

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.append(row)


def read_csv(path: str | pathlib.Path) -> list[dict]:
    with pathlib.Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: Iterable[dict], columns: list[str]) -> str:
    """A plain fixed-width text table for the terminal."""
    cells = [[str(_cell(row.get(col, ""))) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def plot_cases(
    path: str | pathlib.Path, rows: list[dict], title: str, value: str = "ms", case: str = "case"
) -> pathlib.Path | None:
    """One horizontal bar panel per case (shape), a bar per provider that ran (ours in orange); None if none ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r.get("status") == "ok" and r.get(value) not in (None, "")]
    cases = list(dict.fromkeys(r[case] for r in ran))
    if not cases:
        return None
    heights = [len([r for r in ran if r[case] == c]) for c in cases]
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, 0.9 + 0.32 * sum(heights) + 0.6 * len(cases)), squeeze=False)
    for ax, c in zip(axes[:, 0], cases):
        sub = [r for r in ran if r[case] == c]
        labels = [f"{r['provider']} [{r['backend']}]" for r in sub]
        values = [float(r[value]) for r in sub]
        colors = ["tab:orange" if r["provider"].startswith("waveclip") else "tab:blue" for r in sub]
        ax.barh(range(len(sub)), values, color=colors)
        ax.set_yticks(range(len(sub)), labels, fontsize=8)
        ax.invert_yaxis()
        if max(values) > 50 * min(values):
            ax.set_xscale("log")
        ax.set_title(c, fontsize=9)
        ax.set_xlabel(value, fontsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PRECISIONS = ("fp32", "amp_bf16")  # amp_bf16: torch.autocast to bfloat16, as open_clip's `--precision amp_bf16`


def default_precision(device: str | torch.device) -> str:
    """How the end-to-end benchmarks run a model: bf16 autocast on CUDA (open_clip's `--precision
    amp`), fp32 on the CPU (no bf16 units on the CPUs these run on)."""
    return "amp_bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device: str | torch.device, precision: str):
    """The context a model runs in for `precision` (one of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
