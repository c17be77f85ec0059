#!/usr/bin/env bash
# The one script a machine with an NVIDIA GPU runs (written for one H200, sm_90), offline:
#
#     bash bench/gpu_check.sh                       # results in bench/results/gpu (or OUT=dir)
#     WHEELS=.whl bash bench/gpu_check.sh           # first install the wheels carried in .whl
#     GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh   # every phase on the CPU (CI runs this)
#
# Phases, each under `timeout`, the whole run within BUDGET_S (default 290 s; dry run 1200 s, each phase
# given 4 times as long, for a shared CPU) from a cold Triton cache:
#   1. environment: nvidia-smi, python / torch / Triton / CUDA versions
#   2. dependencies: wheels from WHEELS (pip --no-index, into a private folder on PYTHONPATH); pip from
#      a registry only when one answers; never torch, torchvision or triton
#   3. build the C++/CUDA extension in place against this python's torch, while bench.gpu_warmup
#      compiles every Triton kernel variant of the tests and benchmarks on all cores (Triton's cache)
#   4. parity: the GPU tests, named by file, compiled Triton (TRITON_INTERPRET=0) -> parity.xml
#   5. benchmarks (tokenizer, attention; model and gate where open_clip imports; the training step),
#      each CSV written row by row; the model in bf16 autocast on CUDA; then every kernel's error
#      against PyTorch's own
#
# $OUT receives at most 8 files, none deeper than 2 folders: gpu_check.log, parity.xml,
# README_tables.md and results.tar.gz (the CSVs, PNGs and the warm-up log), refreshed after each phase.
# Dry run: the interpreter runs the grid-order tests (tiny shapes), the warm-up compiles a few tiny
# variants for sm_90 without a GPU, the benchmarks run quick on the CPU, and the file rules are checked.
#
# Exit status: 0 all passed; 1 the build or the parity tests failed (or none ran), or $OUT breaks the
# file rules; 3 only the benchmarks or their error check failed. Environment: PYTHON (default python3,
# or .venv/bin/python when it suits), OUT, WHEELS, BUDGET_S, TORCH_CUDA_ARCH_LIST (default 9.0), JOBS.
set -u -o pipefail

cd "$(dirname "$0")/.."
REPO="$PWD"
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [[ "$DRY" == 1 ]]; then OUT="${OUT:-$(mktemp -d -t gpu_check_dry.XXXXXX)}"; else OUT="${OUT:-bench/results/gpu}"; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d -t gpu_check.XXXXXX)"   # everything but the four files of $OUT
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

START=$SECONDS
# A dry run shares a CPU with other work: its phases get SCALE times the time and a larger budget.
if [[ "$DRY" == 1 ]]; then SCALE=4; BUDGET_S="${BUDGET_S:-1200}"; else SCALE=1; BUDGET_S="${BUDGET_S:-290}"; fi
JOBS="${JOBS:-$(nproc)}"
STATUS=0
BENCH_OK=1

phase() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
# limit WANTED: prints the seconds a phase may take (WANTED times SCALE, capped by what is left of the
# budget, at least 15) and succeeds; fails, printing nothing, when under 15 s are left. Never prints
# 0: `timeout 0` means no limit at all.
limit() {
    local left=$((BUDGET_S - (SECONDS - START))) wanted=$(($1 * SCALE))
    ((left >= 15)) || return 1
    if ((wanted < left)); then echo "$wanted"; else echo "$left"; fi
}
# pack: refresh $OUT/results.tar.gz from the work folder (called after every phase, so a run stopped
# from outside keeps what was finished)
pack() {
    [[ -f "$RESULTS/README_tables.md" ]] && cp "$RESULTS/README_tables.md" "$OUT/README_tables.md"
    tar -czf "$OUT/results.tar.gz.partial" -C "$WORK" results && mv "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
}

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ "$DRY" == 1 && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi
PY="$(command -v "$PY")" || { echo "FAIL: no python at ${PYTHON:-python3}"; exit 1; }
[[ "$PY" == /* ]] || PY="$PWD/$PY"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

phase "environment (dry run: $DRY, budget ${BUDGET_S} s, $JOBS cores, out $OUT)"
if [[ "$DRY" == 1 ]]; then echo "dry run: no GPU used"; else nvidia-smi -L || echo "nvidia-smi failed"; fi
"$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
if [[ "$DRY" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "FAIL: this python's torch sees no CUDA device; set PYTHON to one that does"
    exit 1
fi

phase "dependencies (never torch, torchvision or triton)"
if [[ -n "${WHEELS:-}" ]]; then
    echo "installing the wheels in $WHEELS (no index, no dependencies) into $WORK/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$WORK/site" "$WHEELS"/*.whl; then
        export PYTHONPATH="$WORK/site:$PYTHONPATH"
    else
        echo "WARNING: the wheels in $WHEELS did not install"
    fi
fi
mapfile -t MISSING < <("$PY" - <<'EOF'
import importlib.util
needed = {"open_clip": "open_clip_torch", "ftfy": "ftfy", "pywt": "PyWavelets", "fvcore": "fvcore",
          "iopath": "iopath", "pytest": "pytest", "numpy": "numpy", "matplotlib": "matplotlib"}
for module, package in needed.items():
    if importlib.util.find_spec(module) is None:
        print(package)
EOF
)
if ((${#MISSING[@]} == 0)); then
    echo "all present"
elif [[ "$DRY" != 1 ]] && "$PY" -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=3)" 2>/dev/null \
        && t=$(limit 60); then
    echo "missing: ${MISSING[*]}; a registry answers: pip install (torch, torchvision, triton kept)"
    "$PY" - >"$WORK/constraints.txt" <<'EOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
    timeout "$t" "$PY" -m pip install -q --disable-pip-version-check -c "$WORK/constraints.txt" "${MISSING[@]}" \
        || echo "WARNING: pip could not install every missing package"
else
    echo "missing: ${MISSING[*]} (no registry, no pip): the tests and benchmarks that need them skip"
fi
if "$PY" -c "import open_clip" 2>/dev/null; then OPEN_CLIP=1; else OPEN_CLIP=0; echo "open_clip does not import: no model or gate benchmark"; fi

phase "build the extension in place, while the Triton kernels compile in parallel"
WARMUP_ARGS=(--jobs "$JOBS")
[[ "$DRY" == 1 ]] && WARMUP_ARGS+=(--dry-run)
WARMUP_PID=""
if t=$(limit 150); then
    (cd "$REPO" && timeout "$t" "$PY" -m bench.gpu_warmup "${WARMUP_ARGS[@]}" >"$RESULTS/warmup.log" 2>&1) &
    WARMUP_PID=$!
fi
if [[ "$DRY" == 1 ]]; then
    if "$PY" -c "import torch; from waveclip_kernels import extension; import sys; sys.exit(isinstance(extension.load(), ImportError))"; then
        echo "dry run: the CPU extension loads; not rebuilt"
    else
        if ! t=$(limit 200) || ! MAX_JOBS=2 WAVECLIP_CUDA=0 timeout "$t" "$PY" setup.py -q build_ext --inplace; then
            echo "FAIL: the CPU build of the extension failed"
            STATUS=1
        fi
    fi
else
    # CUDA_HOME: as set, else the toolkit holding nvcc when it has the headers, else /usr/local/cuda.
    if [[ -z "${CUDA_HOME:-}" ]]; then
        CUDA_HOME=/usr/local/cuda
        if command -v nvcc >/dev/null; then
            from_nvcc="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
            [[ -f "$from_nvcc/include/cuda_runtime.h" ]] && CUDA_HOME="$from_nvcc"
        fi
    fi
    export CUDA_HOME TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$JOBS"
    echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    if ! t=$(limit 150) || ! WAVECLIP_CUDA=1 timeout "$t" "$PY" setup.py -q build_ext --inplace >"$RESULTS/build.log" 2>&1; then
        tail -n 30 "$RESULTS/build.log"
        echo "FAIL: the CUDA build of the extension failed"
        STATUS=1
    fi
fi
"$PY" - <<'EOF'
import torch
import waveclip_kernels as wk
from waveclip_kernels import extension
ext = extension.load()
print("extension:", "not loadable: %s" % ext if isinstance(ext, ImportError) else "loaded, has_cuda=%s" % ext.has_cuda())
device = "cuda" if torch.cuda.is_available() else "cpu"
for op, impls in wk.available_impls(device).items():
    print(f"  {op} ({device}): {impls}")
EOF
if [[ -n "$WARMUP_PID" ]]; then
    wait "$WARMUP_PID" || echo "WARNING: the warm-up stopped early (exit $?): the tests compile what it missed"
fi
tail -n 1 "$RESULTS/warmup.log" 2>/dev/null
pack

phase "parity tests"
if [[ "$DRY" == 1 ]]; then
    export TRITON_INTERPRET=1
    PARITY_FILES=(tests/kernels/test_triton_grid_order.py tests/kernels/test_triton_gpu.py
                  tests/kernels/test_attention_grad_gpu.py)
    MARK=()
else
    export TRITON_INTERPRET=0
    PARITY_FILES=(tests/kernels/test_triton_gpu.py tests/kernels/test_attention_grad_gpu.py
                  tests/kernels/test_extension.py)
    MARK=(-m gpu)
fi
# tests/conftest.py must keep an explicit TRITON_INTERPRET (it only sets a default).
SEEN="$(cd tests && "$PY" -c "import os, conftest; print(os.environ.get('TRITON_INTERPRET'))" 2>&1 | tail -n 1)"
if [[ "$SEEN" != "$TRITON_INTERPRET" ]]; then
    echo "FAIL: tests/conftest.py changes TRITON_INTERPRET=$TRITON_INTERPRET to $SEEN"
    STATUS=1
fi
XDIST=()
if [[ "$DRY" != 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi   # leftover compiles in parallel
rc=124
if t=$(limit 90); then
    timeout "$t" "$PY" -m pytest -q -o addopts="" -p no:cacheprovider "${MARK[@]}" "${XDIST[@]}" "${PARITY_FILES[@]}" \
        --durations=10 --junitxml="$OUT/parity.xml"
    rc=$?
fi
RAN="$("$PY" - "$OUT/parity.xml" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot().iter("testsuite")
print(sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites))
EOF
)"
echo "tests that ran (not skipped): ${RAN:-unknown}"
if [[ $rc == 0 && "${RAN:-0}" == 0 ]]; then rc=5; fi
case $rc in
    0) echo "parity: passed" ;;
    5) echo "FAIL: no parity test ran (none selected, or every one skipped)"; STATUS=1 ;;
    124) echo "FAIL: the parity tests ran out of time"; STATUS=1 ;;
    *) echo "FAIL: parity tests failed (pytest exit $rc)"; STATUS=1 ;;
esac
pack

if [[ "$DRY" == 1 ]]; then
    unset TRITON_INTERPRET
    BENCH=(--device cpu --quick --threads 1)
    TRAINING=(--device cpu --quick --threads 1)
else
    BENCH=(--device cuda)
    TRAINING=(--device cuda --budget-s 0.5)
fi
OPS=(tokenizer attention)
((OPEN_CLIP)) && OPS+=(model gate)
phase "benchmarks (${OPS[*]} training) -> $RESULTS"
for op in "${OPS[@]}"; do
    if ! t=$(limit 60); then echo "SKIPPED $op: the time budget is spent"; BENCH_OK=0; continue; fi
    echo "--- $op (timeout ${t}s)"
    timeout "$t" "$PY" -m waveclip bench "${BENCH[@]}" --op "$op" --out "$RESULTS" || { echo "FAILED: bench $op"; BENCH_OK=0; }
    pack
done
if t=$(limit 120); then   # forward + backward: the fused kernels against SDPA and FlexAttention
    echo "--- training (timeout ${t}s)"
    timeout "$t" "$PY" -m bench.bench_training "${TRAINING[@]}" --out "$RESULTS" || { echo "FAILED: bench training"; BENCH_OK=0; }
    pack
else
    echo "SKIPPED training: the time budget is spent"
    BENCH_OK=0
fi
"$PY" -m bench.tables "$RESULTS" --check-errors || { echo "FAILED: a kernel's error exceeds 2x PyTorch's own"; BENCH_OK=0; }
pack

phase "files in $OUT"
ls -l "$OUT"
BAD="$(find "$OUT" -mindepth 4; find "$OUT" -mindepth 1 \( -name '*[!A-Za-z0-9._-]*' -o ! -type f ! -type d \))"
NFILES="$(find "$OUT" -type f | wc -l)"
if ((NFILES > 8)) || [[ -n "$BAD" ]]; then
    echo "FAIL: $OUT breaks the file rules (at most 8 files, 2 folders deep, names of letters, digits, . _ -): $NFILES files ${BAD}"
    STATUS=1
else
    echo "file rules: $NFILES files, none deeper than 2 folders"
fi
rm -rf "$WORK"

phase "done in $((SECONDS - START)) s"
if ((STATUS == 0 && BENCH_OK == 0)); then STATUS=3; fi
echo "exit status $STATUS (0 ok, 1 build/parity/file rules failed, 3 benchmarks failed)"
exit $STATUS
