# The README's commands. Each target builds .venv from scratch when it is missing.
#   make demo   run the main job: the offline RLHF demo (pretrain, reward model, PPO and GRPO;
#               3 seeds, runs/demo); installs only what the demo needs
#   make test   ruff, C++ unit tests (ctest), the pytest suite
#   make bench  every microbenchmark on this machine
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch to build against; this machine's pip index carries 2.14.1 (CUDA build).
TORCH_SPEC ?= torch==2.14.1
# Parallel compile jobs: every core (CI has 2).
MAX_JOBS ?= $(shell nproc 2> /dev/null || echo 2)
PIP := $(PY) -m pip install --disable-pip-version-check -q
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

# Recipes run in bash with pipefail: the build's output goes through a filter.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# The demo builds the CUDA kernels only where a GPU is visible, when asked
# (RLHF_EXT_CUDA=1), or when they are built already; `make test` always compiles them
# (when torch has CUDA and nvcc is found), as CI must.
GPU_VISIBLE := $(shell nvidia-smi -L > /dev/null 2>&1 && echo 1)
DEMO_EXT := $(if $(or $(GPU_VISIBLE),$(filter 1,$(RLHF_EXT_CUDA)),$(wildcard $(VENV)/.ext-full)),full,cpu)

.PHONY: all demo test pytest cpp-test lint bench info clean

all: test

# What the build and the demo need: torch, the build tools, matplotlib for the plots.
$(VENV)/.deps-build: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_SPEC) and the build tools into $(VENV)"
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) setuptools wheel ninja pybind11 numpy matplotlib
	touch $@

# The test stack on top: pytest, ruff, and the peers the integration tests run against.
$(VENV)/.deps-test: $(VENV)/.deps-build
	@echo "installing the test stack (pytest, ruff, trl, peft, tensorboard, verl, ray) into $(VENV)"
	$(PIP) "pytest>=8" pytest-timeout "hypothesis>=6" expecttest ruff
	$(PIP) "trl>=1.16,<1.17"  # the `peers` extra: python_tests/test_integrations_trl*.py
	# TRL 1.12.0's wheel, downloaded, not installed: the PPO-era targets are tested against it
	$(PY) -m pip download --disable-pip-version-check -q --no-deps trl==1.12.0 -d $(VENV)/peer-wheels
	# OpenRLHF 0.11.2's wheel, not installed (it needs flash-attn): its code is cut from it
	$(PY) -m pip download --disable-pip-version-check -q --no-deps openrlhf==0.11.2 -d $(VENV)/peer-wheels
	# verl 0.9.1's source archive, for its own unit tests (python_tests/test_peer_own_tests.py)
	$(PY) -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: verl==0.9.1 \
	    -d $(VENV)/peer-wheels
	$(PIP) "peft>=0.13" tensorboard  # the `lora` and `tensorboard` extras (trainer tests)
	# verl for python_tests/test_integrations_verl.py: its full install pulls vLLM-era pins,
	# so verl itself without dependencies, plus what its core_algos imports
	# (docs/integrations.md). verl goes last: pip then has no resolver complaint to print.
	$(PIP) "ray>=2.41" omegaconf codetiming cloudpickle orjson tensordict==0.15.3 pyvers
	$(PIP) --no-deps verl==0.9.1
	touch $@

# Editable install: the compiled rlhf_ext/_C*.so lands in the source tree, so the tests
# import what was just built. Two variants: "full" (CUDA kernels too, when torch has CUDA
# and nvcc is found) and "cpu" (RLHF_EXT_CUDA=0). One line per compiled file; the whole
# build log is kept in build/build-<variant>.log and its tail printed on failure.
$(VENV)/.ext-full: CUDA_FLAG :=
$(VENV)/.ext-cpu: CUDA_FLAG := RLHF_EXT_CUDA=0
$(VENV)/.ext-%: $(VENV)/.deps-build $(SOURCES)
	@mkdir -p build
	@echo "building rlhf_ext ($*: $(if $(CUDA_FLAG),C++ CPU kernels only,C++ and CUDA kernels)), MAX_JOBS=$(MAX_JOBS); log in build/build-$*.log"
	@start=$$(date +%s); \
	$(CUDA_FLAG) MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --disable-pip-version-check -v \
	    --no-build-isolation --no-deps -e . 2>&1 | $(PY) tools/build_progress.py build/build-$*.log \
	  || { tail -n 40 build/build-$*.log; echo "build failed: see build/build-$*.log"; exit 1; }; \
	echo "built in $$(( $$(date +%s) - start )) s"
	rm -f $(VENV)/.ext-full $(VENV)/.ext-cpu
	touch $@

info: $(VENV)/.ext-full
	$(PY) -m rlhf_ext info

cpp-test:
	cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cpp -j $(MAX_JOBS) > /dev/null
	ctest --test-dir build/cpp --output-on-failure

pytest: $(VENV)/.ext-full $(VENV)/.deps-test
	$(PY) -m pytest python_tests -q

lint: $(VENV)/.deps-test
	$(VENV)/bin/ruff check rlhf_ext bench python_tests tools setup.py
	$(VENV)/bin/ruff format --check rlhf_ext bench python_tests tools setup.py

test: lint cpp-test info pytest

demo: $(VENV)/.ext-$(DEMO_EXT)
	@start=$$(date +%s); $(PY) -m rlhf_ext demo --output-dir runs/demo; \
	echo "make demo: the demo ran in $$(( $$(date +%s) - start )) s"

# The developer's run: appends to the committed bench/results/<device>.csv (a user's run
# writes ./bench-results/ unless told otherwise).
bench: $(VENV)/.ext-full
	$(PY) -m bench all --results-dir bench/results

clean:
	rm -rf build $(VENV) rlhf_ext/_C*.so *.egg-info
