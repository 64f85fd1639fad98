"""The prepared GPU check (bench/gpu_check.py, `make gpu-check` / `make gpu-wheels`), on a CPU: which wheels it
fetches, how it reads the rule logs, and that without CUDA it says so and exits 0."""

import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from taxotrait.devices import resolve_device

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_the_wheels_are_what_the_workflow_needs_beyond_the_lent_machines_image():
    requirements = dict(line.split("==") for line in gpu_check.missing_requirements())
    assert {"snakemake", "snakemake-interface-common", "jsonschema", "rpds-py", "grad-cam", "ttach",
            "connection-pool"} <= set(requirements)
    # in the image: torch and the rest are the machine's own
    assert not set(requirements) & {"torch", "torchvision", "numpy", "pyyaml", "timm", "h5py", "pandas", "pillow",
                                    "opencv-python-headless", "scikit-learn", "scipy", "attrs", "wrapt"}
    for name, version in requirements.items():
        assert metadata.version(name) == version, name  # pinned to what the suite runs with


def test_the_rule_logs_say_where_each_step_ran(tmp_path):
    handler = logging.FileHandler(tmp_path / "train.order.log")
    logging.getLogger("taxotrait").addHandler(handler)
    logging.getLogger("taxotrait").setLevel(logging.INFO)
    try:
        resolve_device("cpu", "train.device")
    finally:
        logging.getLogger("taxotrait").removeHandler(handler)
        handler.close()
    (tmp_path / "extract_attention.species.log").write_text("INFO: train.device: cuda (NVIDIA H200)\nextracted\n")
    (tmp_path / "train_probes.log").write_text("INFO: evaluation.device: cuda:1 (NVIDIA H200)\n")
    devices = gpu_check.rule_devices(tmp_path)
    assert devices["train.order.log"] == ["cpu"]
    assert devices["extract_attention.species.log"] == devices["train_probes.log"] == ["cuda"]
    assert devices["mask_heads"] == []  # a GPU rule without a log
    assert set(devices) >= set(gpu_check.GPU_RULES) - {"train", "extract_attention", "train_probes"}


def test_without_cuda_the_check_says_so_and_exits_0():  # CUDA hidden: the same on a GPU machine
    results = (REPO / "bench" / "RESULTS.md").read_text()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0 and "no CUDA device on this machine" in done.stdout
    assert (REPO / "bench" / "RESULTS.md").read_text() == results  # nothing appended


def test_the_extraction_benchmark_runs_its_code_path(tmp_path):
    """`extraction_rates` as the GPU check calls it, at tiny sizes on the CPU."""
    import h5py
    import torch

    rates = gpu_check.extraction_rates(torch.device("cpu"), "vit_tiny_patch16_224", 32, 20, 8, 4, tmp_path / "a.h5")
    assert set(rates) == {"forward", "tokens", "extraction"} and all(r > 0 for r in rates.values())
    with h5py.File(tmp_path / "a.h5") as h5:
        assert h5["attention"].shape[:2] == (8, 4) and h5.attrs["device"] == "cpu"
