# Two entry points: `make demo` and `make test`. Both create or reuse .venv from the pinned
# locks: requirements/runtime.lock (what the CLI needs) and requirements/dev.lock (pytest, ruff).
# Regenerate them with scripts/lock (docs/install-lock.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
BACKEND ?= torch
BACKENDS ?= torch tensorflow jax
DEMO_DIR ?= demo-data
DEMO_RUN ?= runs/demo-$(BACKEND)
LOCKS := requirements/runtime.lock requirements/dev.lock
# The locks pin PyPI's torch 2.14.1 and torchvision 0.29.1 (the CUDA build on Linux; it runs on
# a CPU too, and .venv takes about 7.7 GB with its nvidia-* and triton packages). TORCH_INDEX is
# only for a CPU lock you regenerated yourself with the same index (docs/install-lock.md):
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/lock
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu
# With the committed locks it saves nothing (the nvidia-* pins are installed anyway). Empty by
# default: pip uses only its configured indexes.
TORCH_INDEX ?=

.PHONY: venv demo test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(LOCKS)
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH (set PYTHON=...)"; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is older than Python 3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
		-r requirements/runtime.lock -r requirements/dev.lock
	touch $@

demo: venv
	$(PY) cli.py make-demo-data $(DEMO_DIR) --train-per-class 80 --test-per-class 20 --replace
	KERAS_BACKEND=$(BACKEND) $(PY) cli.py train --data-dir $(DEMO_DIR) --image-size 64 \
		--batch-size 16 --epochs 8 --lr 5e-4 --bn-momentum 0.9 --crop-scale 0.6,1 \
		--weights none --out $(DEMO_RUN) --verbose 2

test: venv
	PY=$(PY) BACKENDS="$(BACKENDS)" scripts/test-backends $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
