# Set-up and the two entry points of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Evaluated once (:=), so every step of `make demo` uses the same folder; `make demo RUN=DIR` to choose.
ifndef RUN
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data browser demo test test-all bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# The local CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist, where apt is available and the files are missing.
data:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		$(SUDO) apt-get install -y -q dataset-fashion-mnist || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }; \
	fi

# Headless Chromium for the report's browser test: Debian's chromium + chromium-driver, where apt is
# available and either is missing (the test skips without them, and fails under CI=true).
browser:
	@if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null; then \
		$(SUDO) apt-get install -y -q chromium chromium-driver || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }; \
	fi

demo: setup data
	$(BIN)/hvae train --epochs 20 --out $(RUN)
	$(BIN)/hvae eval $(RUN) --k 1000 --limit 2000
	$(BIN)/hvae sample $(RUN) --n 64 --out $(RUN)/samples.png
	$(BIN)/hvae reconstruct $(RUN) --n 32 --out $(RUN)/reconstructions.png
	$(BIN)/hvae interpolate $(RUN) --n 8 --out $(RUN)/interpolations.png
	@echo "demo run: $(RUN)"

test: setup data browser
	$(BIN)/python -m pytest -q

test-all: setup data browser
	$(BIN)/python -m pytest -q -m ""

# The benchmarks of BENCHMARKS.md (long: about 20 minutes on 2 cores).
bench: setup data
	$(BIN)/python benchmarks/throughput.py --lean --variant runtime.precision=bf16-mixed --variant runtime.compile=true
	$(BIN)/python benchmarks/conv_output_layer.py
	$(BIN)/python benchmarks/guard_sync.py
	$(BIN)/python benchmarks/eval_memory.py --k 5000 --images 100 1000
	$(BIN)/python benchmarks/vae_20_epochs.py --out runs/bench-vae20-$(shell date +%Y%m%d-%H%M%S)
