#!/usr/bin/env python3
"""The prepared GPU check: one command for a lent CUDA machine (`make gpu-check`), and the wheels it needs
(`make gpu-wheels`).

    python bench/gpu_check.py wheels    # here (network): the wheels the lent machine lacks -> .gpu-wheels/, sized
    python3 bench/gpu_check.py          # there: install them, run every check, append a dated section to RESULTS.md

The lent machine has Python 3.12 with torch, timm, h5py, pandas, pyarrow, pillow, matplotlib, tqdm, safetensors,
opencv, scikit-learn and scipy, but no snakemake, jsonschema or grad-cam, and no network; the working tree plus the
carried wheels may be 64 MiB at most. The check installs the wheels into a temporary folder and runs the workflow
from src/ with the machine's own torch. Without CUDA it says so and exits 0.

Checks (`CHECKS`, in order; each is one function returning markdown, so a new measurement is one more entry):

- workflow: tests/data/tiny.yaml end to end on the GPU with a randomly initialised backbone (`backbone.weights:
  random`), asserting from every GPU rule's log that it ran on CUDA (`taxotrait.devices.resolve_device` logs it);
- engine: bench/bench_engine.py's ViT-B/16 rows at C = 200, 2,000, 10,000 (training step and greedy head masking,
  bf16, peak memory);
- extraction: attention extraction (`taxotrait.extract.extract_attention`, HDF5 included) in images/s against the
  plain frozen forward of the same backbone;
- data-parallel: NCCL training with 2 processes against 1 (only with 2+ GPUs).

The section goes to bench/RESULTS.md and, where the device tool's $OUT is set, to $OUT/gpu_check.md with the
workflow's logs ($OUT/gpu_check_logs.tar.gz), since only $OUT comes back from the lent machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".gpu-wheels"
SITE = Path(tempfile.gettempdir()) / "taxotrait-gpu-site"
WORK = Path(tempfile.gettempdir()) / "taxotrait-gpu-check"
TRAVEL_LIMIT_MIB = 64
DEADLINE_S = 8 * 60  # the whole check
# The lent machine's interpreter (KINDS.md: Python 3.12.3, x86-64), and what it lacks of the project's dependencies
# (snakemake 9, jsonschema, grad-cam and everything of theirs not in its image), pinned as in .venv.
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PURE_WHEELS = (
    "annotated-types==0.8.0", "argparse-dataclass==2.0.0", "conda-inject==1.3.2", "configargparse==1.9.0",
    "connection-pool==0.0.3", "docutils==0.22.4", "dpath==2.2.0", "fastjsonschema==2.22.3", "gitdb==4.0.12",
    "gitpython==3.2.1", "grad-cam==1.5.7", "humanfriendly==10.0", "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1", "jupyter-core==5.9.1", "nbformat==5.11.1", "platformdirs==4.14.9",
    "pulp==3.3.2", "pydantic==2.14.4", "referencing==0.37.0", "smart-open==7.7.1", "smmap==5.0.3",
    "snakemake==9.27.1", "snakemake-interface-common==1.23.0", "snakemake-interface-executor-plugins==9.4.0",
    "snakemake-interface-logger-plugins==2.1.0", "snakemake-interface-report-plugins==1.3.0",
    "snakemake-interface-scheduler-plugins==2.0.2", "snakemake-interface-storage-plugins==4.4.1",
    "sqlmodel==0.0.37", "tenacity==9.2.1", "throttler==1.2.3", "traitlets==5.16.1", "ttach==0.0.3",
    "typing-inspection==0.4.5", "tzdata==2026.6", "yte==1.9.4",
)
COMPILED_WHEELS = ("greenlet==3.5.6", "immutables==0.21", "pydantic-core==2.50.5", "rpds-py==2026.9.1",
                   "sqlalchemy==2.0.58")
# Rules whose model runs on the resolved device (`taxotrait.devices`); all but evaluate request a GPU.
GPU_RULES = ("cache_tokens", "train", "evaluate", "extract_attention", "mask_heads", "train_probes", "saliency_maps",
             "faithfulness")
ENGINE_ROWS = ("naive-reference", "reference", "scalable k=1", "scalable k=1 cached", "scalable k=1 naive",
               "scalable k=1 batched")


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ here: wheels
def travelling_bytes() -> int:
    """Bytes of what the device tool sends: tracked and untracked-not-ignored files of the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / name).lstat().st_size for name in listed if name and (REPO / name).exists())


def fetch_wheels() -> None:
    """Fill .gpu-wheels/ (git-ignored; carried to the lent machine) and check the 64 MiB with the working tree."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir()
    pip = [sys.executable, "-m", "pip"]
    # pure-Python: any py3 wheel, built here from the source archive where there is none (connection-pool)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(WHEELS), *PURE_WHEELS], check=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                    "--implementation", "cp", *platforms, "-d", str(WHEELS), *COMPILED_WHEELS], check=True)
    wheels = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    tree = travelling_bytes()
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels in {WHEELS.relative_to(REPO)}: {mib(wheels)}; working tree "
          f"{mib(tree)}; together {mib(wheels + tree)} of the {TRAVEL_LIMIT_MIB} MiB a device call may carry")
    if wheels + tree > TRAVEL_LIMIT_MIB * 2**20:
        raise SystemExit(f"over {TRAVEL_LIMIT_MIB} MiB: the device tool would refuse the call")


# ------------------------------------------------------------------------------------------------ there: checks
def install_wheels() -> None:
    """Install .gpu-wheels/ into a temporary folder put on the path (the machine's torch stays in use)."""
    if not any(WHEELS.glob("*.whl")):
        raise SystemExit(f"no wheels in {WHEELS}: run `make gpu-wheels` on a machine with network access and carry "
                         f"{WHEELS.name}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, sorted(WHEELS.glob("*.whl")))],
                   check=True)
    paths = [str(REPO / "src"), str(SITE)]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sys.path[:0] = paths


def workflow_check(deadline: float) -> str:
    """The tiny workflow on the GPU; every GPU rule's log must say it ran on CUDA."""
    import yaml

    results = WORK / "results"
    shutil.rmtree(results, ignore_errors=True)
    override = WORK / "gpu.yaml"
    override.write_text(yaml.safe_dump({"results": str(results), "backbone": {"weights": "random"},
                                        "resources": {"gpu": 1}}))
    command = [sys.executable, "-m", "snakemake", "--cores", str(min(16, os.cpu_count() or 1)), "--configfile",
               str(REPO / "tests/data/tiny.yaml"), str(override), "--forceall"]
    started = time.perf_counter()
    logs = results / "tiny" / "logs"
    logs.mkdir(parents=True)
    with open(logs / "snakemake.txt", "w") as output:
        done = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                              timeout=max(60.0, deadline - time.perf_counter()))
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = (logs / "snakemake.txt").read_text()[-3000:]
        raise RuntimeError(f"snakemake exited with {done.returncode} after {seconds:.0f} s:\n{tail}")
    devices, missing = {}, []
    for rule in GPU_RULES:
        files = sorted(logs.glob(f"{rule}.*log")) or sorted(logs.glob(f"{rule}.log"))
        if not files:
            missing.append(rule)
        for log in files:
            found = set(re.findall(r"device: (\S+)", log.read_text()))
            devices[log.name] = found
    wrong = {name: sorted(found) for name, found in devices.items() if not found or any(
        not d.startswith("cuda") for d in found)}
    if missing or wrong:
        raise AssertionError(f"rules not on CUDA: {wrong}; rules without a log: {missing}")
    gpu = re.search(r"device: cuda\S* \(([^)]*)\)", next(logs.glob("train.*log")).read_text())
    return (f"Tiny workflow (tests/data/tiny.yaml, random ViT-S/14 at 112 px) end to end in {seconds:.0f} s; "
            f"all {len(devices)} logs of the GPU rules ({', '.join(GPU_RULES)}) say CUDA"
            f"{f' ({gpu.group(1)})' if gpu else ''}.")


def engine_check(deadline: float) -> str:
    """bench_engine.py's ViT-B/16 rows (the CUDA defaults) at C = 200, 2,000, 10,000."""
    command = [sys.executable, str(REPO / "bench/bench_engine.py"), "--device", "cuda", "--classes", "200", "2000",
               "10000", "--budget-s", "15", "--repeats", "2", "--rows", *ENGINE_ROWS]
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True,
                          timeout=max(60.0, deadline - time.perf_counter()))
    table = done.stdout[done.stdout.index("- machine:"):] if "- machine:" in done.stdout else done.stdout
    return "Engine benchmark (`" + " ".join(["bench/bench_engine.py", *command[2:]]) + "`):\n\n" + table.strip()


def extraction_check(deadline: float) -> str:
    """Attention extraction's images/s (from cached tokens on the host, HDF5 written) against the plain frozen
    forward's (images on the GPU, bf16), ViT-B/16 at 224 px."""
    import torch

    from taxotrait.backbone import create_backbone
    from taxotrait.devices import mixed_precision
    from taxotrait.extract import extract_attention, sibling_classes
    from taxotrait.model import PromptCAM, PromptConfig

    device, images, batch = torch.device("cuda"), 512, 64
    vit = create_backbone("vit_base_patch16_224.dino", "random", 224)
    lines = ["| C | plain frozen forward (img/s) | frozen tokens (img/s) | extraction from cached tokens (img/s) | "
             "extraction / forward |", "|---|---|---|---|---|"]
    for classes in (200, 2000):
        model = PromptCAM(vit, [f"c{i}" for i in range(classes)], PromptConfig("scalable", 1)).to(device).eval()
        x = torch.randn(batch, 3, 224, 224, device=device)

        def rate(function, n_batches: int) -> float:
            function()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n_batches):
                function()
            torch.cuda.synchronize()
            return n_batches * batch / (time.perf_counter() - start)

        with torch.no_grad(), mixed_precision(device):
            forward = rate(lambda: vit.forward_features(x), images // batch)
            tokens_rate = rate(lambda: model.frozen_tokens(x), images // batch)
            tokens = model.frozen_tokens(x).to(torch.float16).cpu()
        labels = torch.randint(classes, (images,))
        batches = [([f"i{j}" for j in range(s, s + batch)], tokens, labels[s:s + batch]) for s in range(0, images, batch)]
        extra = sibling_classes([f"p{i // 10}" for i in range(classes)], 2)
        out = WORK / "extraction.h5"
        torch.cuda.synchronize()
        start = time.perf_counter()
        extract_attention(model, batches, images, out, "bench", extra, progress=False)
        extraction = images / (time.perf_counter() - start)
        lines.append(f"| {classes} | {forward:.0f} | {tokens_rate:.0f} | {extraction:.0f} | {extraction / forward:.2f} |")
        if time.perf_counter() > deadline:
            break
    return ("Attention extraction, ViT-B/16 at 224 px, random weights, batch 64, 512 images, bf16 (extraction: "
            "true, predicted and 2 sibling maps per image, gzip HDF5 written):\n\n" + "\n".join(lines))


def data_parallel_check(deadline: float) -> str:
    """NCCL data-parallel training (2 processes) of the tiny workflow's species rank against its 1-GPU model."""
    import torch
    import yaml

    if torch.cuda.device_count() < 2:
        return f"NCCL data-parallel training: not run ({torch.cuda.device_count()} GPU; it needs 2 or more)."
    from taxotrait import workflow

    results = WORK / "results" / "tiny"
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for extra in (REPO / "tests/data/tiny.yaml", WORK / "gpu.yaml"):
        for key, value in yaml.safe_load(extra.read_text()).items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
    config["train"]["processes"] = 2
    inputs = {"manifest": results / "manifest.parquet", "classes": results / "classes.parquet",
              "train_tokens": results / "cache/train.tokens.npy", "eval_tokens": results / "cache/eval.tokens.npy"}
    outputs = {"model": WORK / "ddp/model.pt", "log_table": WORK / "ddp/train_log.parquet"}
    started = time.perf_counter()
    workflow.train_rank("species", {k: str(v) for k, v in inputs.items()}, {k: str(v) for k, v in outputs.items()},
                        config, gpus=2, log_file=str(WORK / "ddp/train.log"))
    seconds = time.perf_counter() - started
    one = torch.load(results / "species/model.pt", weights_only=True)["state_dict"]
    two = torch.load(outputs["model"], weights_only=True)["state_dict"]
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    return (f"NCCL data-parallel training, 2 processes, tiny species rank: {seconds:.0f} s, largest parameter "
            f"difference from the 1-GPU model {gap:.2e} (bf16 autocast on both).")


# name: function(deadline) -> markdown; run in this order while time is left
CHECKS = {
    "workflow": workflow_check,
    "engine": engine_check,
    "extraction": extraction_check,
    "data-parallel": data_parallel_check,
}


def machine() -> str:
    import torch

    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return (f"{os.cpu_count()} CPU cores; GPU: {gpus}; Python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def run_checks() -> int:
    started = time.perf_counter()
    deadline = started + DEADLINE_S
    WORK.mkdir(parents=True, exist_ok=True)
    install_wheels()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {date}, GPU check (`make gpu-check`)", "", f"- machine: {machine()}",
             f"- command: `make gpu-check` (`python3 bench/gpu_check.py`), wheels from `make gpu-wheels`"]
    failed = []
    for name, check in CHECKS.items():
        if time.perf_counter() > deadline:
            lines += ["", f"**{name}: not run** (the {DEADLINE_S // 60}-minute budget was spent)."]
            continue
        t0 = time.perf_counter()
        print(f"[{t0 - started:5.0f} s] {name} ...", flush=True)
        try:
            text = check(deadline)
        except Exception as err:  # one failed check does not lose the others' results
            traceback.print_exc()
            failed.append(name)
            text = f"**{name}: FAILED** ({type(err).__name__}: {str(err)[:300]})"
        lines += ["", text, f"({name}: {time.perf_counter() - t0:.0f} s)"]
    lines += ["", f"Whole check: {time.perf_counter() - started:.0f} s."]
    section = "\n".join(lines) + "\n"
    print(section)
    with open(REPO / "bench/RESULTS.md", "a") as results:
        results.write("\n" + section)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.md").write_text(section)
        logs = WORK / "results" / "tiny" / "logs"
        if logs.is_dir():
            with tarfile.open(Path(out, "gpu_check_logs.tar.gz"), "w:gz") as tar:
                tar.add(logs, arcname="logs")
    return 1 if failed else 0


def main() -> int:
    if sys.argv[1:] == ["wheels"]:
        fetch_wheels()
        return 0
    if sys.argv[1:]:
        raise SystemExit(__doc__)
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not importable with this Python, so no CUDA: nothing to check here "
              "(run `make gpu-check` on a machine with a CUDA GPU).")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine: nothing to check here. On a machine with a CUDA GPU, "
              "`make gpu-check` runs the tiny workflow on it, the engine benchmark and the extraction benchmark, and "
              "appends the results to bench/RESULTS.md.")
        return 0
    return run_checks()


if __name__ == "__main__":
    sys.exit(main())
