#!/usr/bin/env bash
# The one script a machine with an NVIDIA GPU runs (written for one H200, sm_90):
#
#     bash bench/gpu_check.sh                 # results and log in bench/results/gpu
#     OUT=/some/dir bash bench/gpu_check.sh   # or in $OUT
#
# Phases, each under `timeout`, the whole run within 8 minutes:
#   1. environment: nvidia-smi, python / torch / Triton / CUDA versions
#   2. dependencies: pip-installs the non-torch packages that are missing (never torch or torchvision:
#      the machine's own torch stays; a constraints file pins it and torchvision)
#   3. build: the C++/CUDA extension against this torch (CUDA_HOME from nvcc, TORCH_CUDA_ARCH_LIST)
#   4. parity: `pytest -m gpu` over tests/ with TRITON_INTERPRET=0 (Triton compiles for the GPU)
#   5. benchmarks: `waveclip bench --device cuda --op all` -> CSV + PNG + README_tables.md in $OUT,
#      then every kernel's error checked against PyTorch's own error on the same inputs
#
# Exit status: 0 all passed; 1 the build or the GPU parity tests failed (or none ran); 3 only the
# benchmarks or their error check failed. Environment: PYTHON (default: python3, or .venv/bin/python
# when it sees a GPU), OUT, TORCH_CUDA_ARCH_LIST (default 9.0), BUDGET_S (default 470).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

START=$SECONDS
BUDGET_S="${BUDGET_S:-470}"
STATUS=0

phase() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
# limit WANTED: seconds a phase may take, capped by what is left of the budget (0: none left).
limit() {
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 15)); then echo 0; elif (($1 < left)); then echo "$1"; else echo "$left"; fi
}

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi
PY="$(command -v "$PY")" || { echo "FAIL: no python at ${PYTHON:-python3}"; exit 1; }
[[ "$PY" == /* ]] || PY="$PWD/$PY"

phase "environment"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except ImportError as err:
    print("torch is not importable:", err)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "FAIL: this python's torch sees no CUDA device; set PYTHON to one that does"
    exit 1
fi

phase "dependencies (never torch/torchvision)"
# The pip packages that provide what the tests and benchmarks import, one per line when missing.
mapfile -t MISSING < <("$PY" - <<'EOF'
import importlib.util
needed = {
    "numpy": "numpy", "open_clip": "open_clip_torch", "pywt": "PyWavelets", "ptwt": "ptwt",
    "pytorch_wavelets": "pytorch_wavelets", "pkg_resources": "setuptools<81", "fvcore": "fvcore",
    "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis",
    "safetensors": "safetensors", "skimage": "scikit-image", "matplotlib": "matplotlib", "tqdm": "tqdm",
    "PIL": "pillow", "ninja": "ninja", "pybind11": "pybind11",
}
for module, package in needed.items():
    if importlib.util.find_spec(module) is None:
        print(package)
EOF
)
if ((${#MISSING[@]})); then
    echo "missing: ${MISSING[*]}"
    CONSTRAINTS="$(mktemp)"
    "$PY" - >"$CONSTRAINTS" <<'EOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
    echo "constraints (kept as installed): $(tr '\n' ' ' <"$CONSTRAINTS")"
    timeout "$(limit 150)" "$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "${MISSING[@]}" \
        || echo "WARNING: pip could not install every missing package (offline?); tests that need them will fail or skip"
    rm -f "$CONSTRAINTS"
else
    echo "all present"
fi
"$PY" -c "import torchvision" 2>/dev/null || echo "note: torchvision is absent: open_clip (teacher, model and gate benchmarks) will not import"

phase "build the extension with CUDA"
# CUDA_HOME: as set, else the toolkit holding nvcc when it has the headers, else /usr/local/cuda.
if [[ -z "${CUDA_HOME:-}" ]]; then
    CUDA_HOME=/usr/local/cuda
    if command -v nvcc >/dev/null; then
        from_nvcc="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
        [[ -f "$from_nvcc/include/cuda_runtime.h" ]] && CUDA_HOME="$from_nvcc"
    fi
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
if ! WAVECLIP_CUDA=1 timeout "$(limit 240)" "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation -e .; then
    echo "FAIL: the CUDA build of the extension failed"
    STATUS=1
fi
"$PY" - <<'EOF'
import torch
import waveclip_kernels as wk
from waveclip_kernels import extension
ext = extension.load()
print("extension:", "not loadable: %s" % ext if isinstance(ext, ImportError) else "loaded, has_cuda=%s" % ext.has_cuda())
for op, impls in wk.available_impls("cuda").items():
    print(f"  {op}: {impls}")
EOF

phase "GPU parity tests (TRITON_INTERPRET=0)"
export TRITON_INTERPRET=0
# tests/conftest.py must keep an explicit TRITON_INTERPRET=0 (it only sets a default of 1).
SEEN="$(cd tests && "$PY" -c "import os, conftest; print(os.environ.get('TRITON_INTERPRET'))" 2>&1 | tail -n 1)"
echo "TRITON_INTERPRET after importing tests/conftest.py: $SEEN"
if [[ "$SEEN" != "0" ]]; then
    echo "FAIL: tests/conftest.py overrides TRITON_INTERPRET=0: the Triton tests would run in the interpreter"
    STATUS=1
fi
timeout "$(limit 180)" "$PY" -m pytest -q -o addopts="" -p no:cacheprovider -m gpu tests/ --durations=10 \
    --junitxml="$OUT/parity.xml"
rc=$?
RAN="$("$PY" - "$OUT/parity.xml" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot().iter("testsuite")
print(sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites))
EOF
)"
echo "GPU tests that ran (not skipped): ${RAN:-unknown}"
if [[ $rc == 0 && "${RAN:-0}" == 0 ]]; then rc=5; fi
case $rc in
    0) echo "parity: passed" ;;
    5) echo "FAIL: no GPU parity test ran (-m gpu selected nothing, or every one skipped)"; STATUS=1 ;;
    124) echo "FAIL: the parity tests ran out of time"; STATUS=1 ;;
    *) echo "FAIL: GPU parity tests failed (pytest exit $rc)"; STATUS=1 ;;
esac

phase "benchmarks on cuda -> $OUT"
BENCH_OK=1
for op in tokenizer attention model gate; do
    t="$(limit 150)"
    if [[ "$t" == 0 ]]; then echo "SKIPPED $op: the time budget is spent"; BENCH_OK=0; continue; fi
    echo "--- $op (timeout ${t}s)"
    timeout "$t" "$PY" -m waveclip bench --device cuda --op "$op" --out "$OUT" || { echo "FAILED: bench $op"; BENCH_OK=0; }
done
"$PY" -m bench.tables "$OUT" --check-errors || { echo "FAILED: a kernel's error exceeds 2x PyTorch's own"; BENCH_OK=0; }

phase "done in $((SECONDS - START)) s"
ls -l "$OUT"
if ((STATUS == 0 && BENCH_OK == 0)); then STATUS=3; fi
echo "exit status $STATUS (0 ok, 1 build/parity failed, 3 benchmarks failed)"
exit $STATUS
