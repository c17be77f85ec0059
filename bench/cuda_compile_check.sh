#!/usr/bin/env bash
# Compile (not run) the CUDA build of the extension, so that a CUDA compile error fails CI on a
# machine without a GPU. Builds every source (csrc/*.cpp with WAVECLIP_WITH_CUDA defined and
# csrc/*.cu, sm_90) into a temporary folder with the same flags as `setup.py`, then imports the
# result in a fresh interpreter to catch unresolved symbols. The CPU-only extension built in place
# (waveclip_kernels/_C*.so, the one the tests load) is left untouched.
#
# Environment: PYTHON (default .venv/bin/python), CUDA_HOME (default /usr/local/cuda),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export WAVECLIP_CUDA=1

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda_compile_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
    exit 1
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "cuda_compile_check: $PYTHON has a CPU-only torch; a CUDA build needs a CUDA torch" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/waveclip-cuda-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
"$PYTHON" setup.py --quiet build_ext --build-temp "$work/temp" --build-lib "$work/lib"
so=$(find "$work/lib" -name '_C*.so' | head -n 1)
if [ -z "$so" ]; then
    echo "cuda_compile_check: the build produced no extension" >&2
    exit 1
fi
# Importing resolves every symbol; it touches no GPU.
"$PYTHON" - "$so" <<'EOF'
import importlib.util
import sys

import torch  # noqa: F401  (libc10 before the extension)

spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.has_cuda(), "the CUDA build reports has_cuda() == False"
EOF
echo "cuda_compile_check: CUDA sources compiled, linked and imported in $(($(date +%s) - start)) s"
