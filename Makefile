# The README's commands. Each target builds .venv from scratch when it is missing.
#   make demo   run the main job: the offline RLHF demo (pretrain, reward model, PPO; 3 seeds, runs/demo)
#   make test   ruff, C++ unit tests (ctest), the pytest suite
#   make bench  every microbenchmark on this machine
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch to build against; this machine's pip index carries 2.14.1 (CUDA build).
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
PIP := $(PY) -m pip install --disable-pip-version-check -q
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: all demo test pytest cpp-test lint bench info clean

all: test

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) setuptools wheel ninja pybind11 numpy "pytest>=8" pytest-timeout "hypothesis>=6" expecttest matplotlib ruff
	$(PIP) "trl>=1.10,<1.13"  # the `peers` extra: python_tests/test_integrations_trl.py
	# verl for python_tests/test_integrations_verl.py: its full install pulls vLLM-era pins,
	# so verl itself without dependencies, plus what its core_algos imports (docs/integrations.md)
	$(PIP) --no-deps verl==0.9.1 tensordict==0.15.3 pyvers
	$(PIP) "ray>=2.41" omegaconf codetiming cloudpickle orjson
	touch $@

# Editable install: the compiled rlhf_ext/_C*.so lands in the source tree, so
# the tests import what was just built.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PIP) --no-build-isolation --no-deps -e .
	touch $@

info: $(VENV)/.installed
	$(PY) -m rlhf_ext info

cpp-test:
	cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cpp -j $(MAX_JOBS) > /dev/null
	ctest --test-dir build/cpp --output-on-failure

pytest: $(VENV)/.installed
	$(PY) -m pytest python_tests -q

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check rlhf_ext bench python_tests tools setup.py
	$(VENV)/bin/ruff format --check rlhf_ext bench python_tests tools setup.py

test: lint cpp-test info pytest

demo: $(VENV)/.installed
	$(PY) -m rlhf_ext demo --output-dir runs/demo

bench: $(VENV)/.installed
	$(PY) -m bench all

clean:
	rm -rf build $(VENV) rlhf_ext/_C*.so *.egg-info
