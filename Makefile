# vltune: `make demo` trains a tiny Qwen2.5-VL on synthetic VQA on the CPU; `make test` runs the suite.
# `make setup` builds .venv once; later runs see the stamp and return in seconds.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP  := $(VENV)/.vltune-installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first and pinned: with torch 2.13.0 (CPU) already installed, nothing later pulls CUDA wheels.
# DeepSpeed's sdist imports torch while building, so it builds against this venv (no isolation).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[torch,mindspore,data,dev]"
	$(PIP) install --no-build-isolation "deepspeed>=0.16,<0.20"
	# fla-core's Triton kernels, run by Triton's CPU interpreter in tests/unit/ops/test_fla_hopper.py only:
	# kept beside the venv (not in it) so that nothing else sees a Triton without a GPU.
	$(PIP) install --no-deps --target $(VENV)/fla-interpret "triton==3.6.0" "fla-core==0.6.0" "einops==0.8.2"
	$(PY) -c "import vltune, torch, transformers, mindspore, deepspeed, peft, numpy; assert numpy.__version__ < '2'"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vltune train demo
	$(PY) tools/demo_infer.py runs/demo

# Two workers, whole files each (module fixtures, e.g. a trained run shared by a file's tests, are built
# once): the suite is largely single-threaded Python and subprocess start-up, so 2 cores nearly halve it.
# --durations: CI's log names the 25 slowest tests (the suite's aim is ~30 min on 2 cores).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

clean:
	rm -rf runs .pytest_cache
