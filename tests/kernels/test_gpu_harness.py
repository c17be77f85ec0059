"""The GPU harness: the GPU run collects without the optional packages; benchmarks keep every
finished row; the compile sweep's rules; the GPU script's time limits.

The GPU run must collect on a machine without the optional packages.
The GPU machine has its own torch and Triton but no open_clip, PyWavelets, ptwt, pytorch_wavelets,
fvcore or iopath. `pytest -m gpu tests/` imports every test module before it filters by marker, so
one module importing such a package at the top would stop the whole GPU run (exit 2). These tests
make those packages unimportable in a subprocess (a `sitecustomize` on PYTHONPATH installs a
meta-path finder that raises ModuleNotFoundError for them, as a missing package does) and check that
the GPU tests collect and that the benchmark modules import.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bench import common, compile_sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
ABSENT_ON_GPU_BOX = ("open_clip", "pywt", "ptwt", "pytorch_wavelets", "fvcore", "iopath")

BLOCKER = f"""
import sys

BLOCKED = {set(ABSENT_ON_GPU_BOX)!r}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (made unimportable)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
"""


def run_without_optional_packages(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` in the repository with the optional packages unimportable."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_blocker_makes_the_packages_unimportable(tmp_path):
    """The check below means something only if the blocker works."""
    probe = "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
    probe += "    except ModuleNotFoundError:\n        print('absent', m)\n"
    done = run_without_optional_packages(tmp_path, "-c", probe, *ABSENT_ON_GPU_BOX)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [w for m in ABSENT_ON_GPU_BOX for w in ("absent", m)]


def test_gpu_tests_collect_without_optional_packages(tmp_path):
    done = run_without_optional_packages(
        tmp_path, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/"
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "ERROR" not in output and "error" not in summary, output[-4000:]
    assert "tests/kernels/test_triton_gpu.py::" in done.stdout


def test_benchmarks_and_images_import_without_open_clip(tmp_path):
    modules = [
        "bench.bench_model",
        "bench.bench_gate",
        "bench.bench_tokenizer",
        "bench.bench_attention",
        "bench.bench_training",
    ]
    modules += ["bench.common", "bench.tables", "bench.gpu_warmup", "bench.compile_sweep", "waveclip.images"]
    done = run_without_optional_packages(tmp_path, "-c", "; ".join(f"import {m}" for m in modules))
    assert done.returncode == 0, done.stderr[-4000:]


def test_csv_rows_are_on_disk_as_they_come(tmp_path):
    """A benchmark stopped part way keeps every finished row (and new columns as they appear)."""
    rows = common.CsvRows(tmp_path / "x.csv", "cpu")
    rows.append({"case": "a", "ms": 1.5})
    assert [r["case"] for r in common.read_csv(tmp_path / "x.csv")] == ["a"]
    rows.extend([{"case": "b", "ms": 2.0, "note": "late column"}])
    on_disk = common.read_csv(tmp_path / "x.csv")
    assert [(r["case"], r["ms"], r["note"]) for r in on_disk] == [("a", "1.5", ""), ("b", "2", "late column")]
    assert on_disk[0]["device"] == common.device_name("cpu")
    assert not list(tmp_path.glob("*.partial"))


def _row(**kw):
    base = {"kernel": "k", "config": "c", "kept": True, "dtype": "bfloat16", "head_dim": 64, "shared_bytes": 1024}
    return compile_sweep.judge(base | {"spill_stores": 0, "spill_loads": 0} | kw)


def test_sweep_rules():
    limit = compile_sweep.SHARED_LIMIT
    assert _row()["verdict"] == "ok"
    assert _row(shared_bytes=limit)["verdict"] == "ok"
    assert _row(shared_bytes=limit + 1)["verdict"] == "FAIL"
    assert _row(shared_bytes=limit + 1, kept=False)["verdict"] == "pruned"
    assert _row(spill_stores=8)["verdict"] == "FAIL"
    assert _row(dtype="float16", spill_loads=8)["verdict"] == "FAIL"
    assert _row(dtype="float32", spill_stores=8, spill_loads=8)["verdict"] == "ok"  # fp32/fp64 spills: reported
    assert _row(verdict="error", note="ptxas failed")["verdict"] == "FAIL"


def test_sweep_finds_every_kernel_of_the_backend():
    kernels = compile_sweep.kernels_of_backend()
    assert {"_block_causal_fwd_kernel", "_attn_kv_append_kernel", "_combine_splits_kernel"} <= kernels
    assert {"_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"} <= kernels
    assert {"_tokenize_kernel", "_detokenize_kernel"} <= kernels
    assert "_attend_tile" not in kernels  # a @triton.jit helper, not a kernel


RECORD_LAUNCHES = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from bench import compile_sweep

launched = {}
JITFunction.run = lambda self, *a, **k: launched.setdefault(self.fn.__name__, set()).add(sys.argv[1])
Autotuner.run = lambda self, *a, **k: launched.setdefault("autotuned " + self.base_fn.__name__, set()).add(sys.argv[1])
for name, (_, workload) in compile_sweep._workloads().items():
    sys.argv[1] = name
    workload(torch.float32, 80)
print(json.dumps({k: sorted(v) for k, v in launched.items()}))
"""


def test_sweep_workloads_launch_every_kernel():
    """Every kernel of the Triton backend is launched by a workload of the sweep (launches recorded,
    nothing compiled), and the autotuned ones through their autotuner (so every config is swept)."""
    done = subprocess.run([sys.executable, "-c", RECORD_LAUNCHES, "-"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {name.removeprefix("autotuned ") for name in launched}
    assert compile_sweep.kernels_of_backend() <= kernels, sorted(compile_sweep.kernels_of_backend() - kernels)
    assert {f"autotuned {name}" for name in compile_sweep.ESTIMATED} <= set(launched)
    assert launched["autotuned _bwd_dq_kernel"] == launched["autotuned _bwd_dkdv_kernel"] == ["block_causal_backward"]
    assert launched["_combine_splits_kernel"] == ["kv_append_split"]


@pytest.mark.slow
def test_sweep_compiles_for_sm90_and_reports_resources(tmp_path):
    """One small workload end to end: rows for both tokenizer kernels at both presets, with resources."""
    out = tmp_path / "sweep.csv"
    cmd = [sys.executable, "-m", "bench.compile_sweep", "--workloads", "tokenizer", "--dtypes", "fp16"]
    done = subprocess.run([*cmd, "--jobs", "1", "--csv", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = common.read_csv(out)
    assert sorted(r["kernel"] for r in rows) == ["_detokenize_kernel"] * 2 + ["_tokenize_kernel"] * 2
    for r in rows:
        assert r["verdict"] == "ok" and int(r["registers"]) > 0 and int(r["shared_bytes"]) > 0
        assert r["spill_stores"] == "0" and r["dtype"] == "float16"
    assert "_tokenize_kernel" in done.stdout and "CSV:" in done.stdout


LIMIT = """
SECONDS_LEFT=$1; WANTED=$2; SCALE=1; BUDGET_S=$SECONDS_LEFT; START=$SECONDS
eval "$(sed -n '/^limit() {/,/^}/p' bench/gpu_check.sh)"
if t=$(limit "$WANTED"); then echo "limit $t"; else echo "none"; fi
"""


@pytest.mark.parametrize("left,wanted,expected", [(300, 60, "limit 60"), (40, 60, "limit 40"), (14, 60, "none")])
def test_gpu_check_limit_never_hands_timeout_a_zero(left, wanted, expected):
    done = subprocess.run(["bash", "-c", LIMIT, "-", str(left), str(wanted)], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == expected, done.stderr
