# One-command set-up: every target creates .venv, installs pinned deps and builds the
# extension first (idempotent: nothing is redone when nothing changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# ninja and the console scripts live in the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MAX_JOBS ?= 2
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: venv build test demo bench gpu-check clean

venv: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN) -r requirements-dev.txt
	touch $@

build: .stamp-build

.stamp-build: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import esper_fast; print('esper_fast kernels:', esper_fast.kernels_available())"
	touch $@

test: build
	$(PY) -m pytest tests -q

demo: build
	$(PY) -m esper_fast train --task cifar10 --device cpu --epochs 8 --out runs/demo --overwrite

bench: build
	$(PY) -m pytest benchmarks -o python_files="bench_*.py" --benchmark-only --benchmark-autosave \
		--benchmark-storage=benchmarks/.results --benchmark-compare --benchmark-group-by=group -q

# Runs on the GPU machine with its own python3 and torch (no .venv there); see
# benchmarks/gpu_check.sh. GPU_CHECK_DRY_RUN=1 rehearses it here with the venv's build.
gpu-check: $(if $(filter 1,$(GPU_CHECK_DRY_RUN)),build)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info esper_fast/_C*.so .stamp-build
