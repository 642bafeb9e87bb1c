# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Each creates the virtual environment on first use, every version from constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test test-gpu bench venv clean constraints

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt setuptools
	$(PIP) install -q -c constraints.txt -e '.[train,bench,test,trackers]'
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt deepspeed
	touch $(STAMP)

# The main job: the built-in StepGRPO run (tiny Qwen2-VL, synthetic task, CPU).
run: $(STAMP)
	$(PY) train.py

# Unit tests on CPU; Triton kernels run through the interpreter (TRITON_INTERPRET=1 is set
# by the tests that need it). GPU tests skip without a GPU.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q tests

# On a GPU machine: the GPU tests and the kernel benchmark.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

# The loss kernels' suite (pytest-benchmark; on a CPU only its small cases run, the GPU ones
# skip), saved under .benchmarks/ for --benchmark-compare; then the end-to-end scripts. trl
# (the bench extra) is the end-to-end baseline of bench_trainer.py.
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-autosave
	$(PY) benchmarks/bench_packing.py --out benchmarks/results/packing_efficiency.md
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_trl_loss.py

# Rewrite constraints.txt with the newest releases (torch held); then `make clean test`
# must pass before the new pins are committed.
constraints:
	python3 tools/refresh_constraints.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
