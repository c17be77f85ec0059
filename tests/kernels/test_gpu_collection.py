"""The GPU run must collect on a machine without the optional packages.

The GPU machine has its own torch and Triton but no open_clip, PyWavelets, ptwt, pytorch_wavelets,
fvcore or iopath. `pytest -m gpu tests/` imports every test module before it filters by marker, so
one module importing such a package at the top would stop the whole GPU run (exit 2). These tests
make those packages unimportable in a subprocess (a `sitecustomize` on PYTHONPATH installs a
meta-path finder that raises ModuleNotFoundError for them, as a missing package does) and check that
the GPU tests collect and that the benchmark modules import.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

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
    modules = ["bench.bench_model", "bench.bench_gate", "bench.bench_tokenizer", "bench.bench_attention"]
    modules += ["bench.common", "bench.tables", "bench.gpu_warmup", "bench.compile_sweep", "waveclip.images"]
    done = run_without_optional_packages(tmp_path, "-c", "; ".join(f"import {m}" for m in modules))
    assert done.returncode == 0, done.stderr[-4000:]
