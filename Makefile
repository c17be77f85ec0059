# Every target creates the virtual environment (.venv) first when it is missing or stale.
PY      := .venv/bin/python
STAMP   := .venv/.installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu) setup.py pyproject.toml requirements.txt requirements-nodeps.txt

.PHONY: setup run test test-fast lint format bench cuda-check compile-sweep gpu-check-dry mutate clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	MAX_JOBS=2 WAVECLIP_CUDA=0 $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)    ## the main job: tokenize, reconstruct and classify the sample photographs
	$(PY) -m waveclip_cli.demo --out outputs

test: $(STAMP)   ## the whole test suite (CPU only; Triton under its interpreter)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

bench: $(STAMP)  ## CPU microbenchmarks and end-to-end figures into bench/results/
	$(PY) -m waveclip bench --device cpu --threads 1 --out bench/results/cpu

cuda-check: $(STAMP)  ## compile (not run) the CUDA sources so a CUDA compile error fails CI
	bash bench/cuda_compile_check.sh

mutate: $(STAMP)  ## mutation testing ([tool.mutmut] in pyproject.toml) against the fast tests; not part of CI
	$(PY) -m pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
	rm -rf mutants
	OMP_NUM_THREADS=1 PYTHONPATH= .venv/bin/mutmut run --max-children 2
	.venv/bin/mutmut results

compile-sweep: $(STAMP)  ## every autotune config of every Triton kernel compiled for sm_90 (no GPU): resources, limits
	$(PY) -m bench.compile_sweep --csv bench/results/compile/sm90.csv

gpu-check-dry: $(STAMP)  ## every phase of bench/gpu_check.sh on the CPU (interpreter, tiny shapes), and its file rules
	GPU_CHECK_DRY_RUN=1 PYTHON=$(PY) bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info waveclip_kernels/_C*.so outputs mutants
