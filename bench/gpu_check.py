#!/usr/bin/env python3
"""The prepared GPU check: one command for a lent CUDA machine (`make gpu-check`), and the wheels it needs
(`make gpu-wheels`).

    python bench/gpu_check.py wheels    # here (network): the wheels the lent machine lacks -> .gpu-wheels/, sized
    python3 bench/gpu_check.py [CHECK ...]  # there: install them, run every check (or those named, see CHECKS),
                                            # append a dated section to RESULTS.md

The lent machine has Python 3.12 with torch, timm, h5py, pandas, pyarrow, pillow, matplotlib, tqdm, safetensors,
opencv, scikit-learn, scipy, ... (bench/lent_machine_packages.txt), but no snakemake, jsonschema or grad-cam, and no
network; the working tree plus the carried wheels may be 64 MiB at most. `wheels` fetches the dependency closure of
snakemake, jsonschema and grad-cam less that image, at the versions installed here, as wheels for that interpreter;
the check installs them into a temporary folder and runs the workflow from src/ with the machine's own torch.
Without CUDA it says so and exits 0.

Checks (`CHECKS`, in order; each is one function of the deadline returning markdown, so a new measurement is one
more function and entry):

- workflow: tests/data/tiny.yaml end to end on the GPU with a randomly initialised backbone (`backbone.weights:
  random`), asserting from every GPU rule's log that it ran on CUDA (`taxotrait.devices.resolve_device` logs it);
- sibling cost (issue 15): bench/bench_engine.py's `scalable k=1 siblings` rows (contrast 'siblings' on a tree of 2-5
  species per genus, each image scored against its genus only) beside `scalable k=1 cached` / `batched` (every
  class scored), ViT-B/16 at C = 200, 2,000, 10,000, with the C=10000 / C=200 ratio (goal for the training step:
  at most 1.5x);
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
# The lent machine's interpreter (KINDS.md: Python 3.12.3, x86-64) and its image's packages; what the workflow needs
# beyond them is the dependency closure of ROOTS, at the versions `make install` put into .venv.
PYTHON_VERSION = "3.12"
MARKER_ENVIRONMENT = {"python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                      "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LENT_MACHINE_PACKAGES = REPO / "bench" / "lent_machine_packages.txt"
ROOTS = ("snakemake", "jsonschema", "grad-cam")
# Rules whose model runs on the resolved device (`taxotrait.devices`); each requests a GPU.
GPU_RULES = ("cache_tokens", "train", "evaluate", "extract_attention", "mask_heads", "train_probes", "saliency_maps",
             "faithfulness")
ENGINE_ROWS = ("naive-reference", "reference", "scalable k=1", "scalable k=1 cached", "scalable k=1 naive",
               "scalable k=1 batched")
SIBLING_ROWS = ("scalable k=1 cached", "scalable k=1 batched", "scalable k=1 siblings")
SIBLINGS = 10  # species per genus in the extraction benchmark


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ here: wheels
def travelling_bytes() -> int:
    """Bytes of what the device tool sends: tracked and untracked-not-ignored files of the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / name).lstat().st_size for name in listed if name and (REPO / name).exists())


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_requirements() -> list[str]:
    """`name==version` of every distribution that ROOTS need on the lent machine (their requirements for its
    interpreter, recursively) and its image lacks, pinned to the version installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    lines = LENT_MACHINE_PACKAGES.read_text().splitlines()
    image = {canonical(line.strip()) for line in lines if line.strip() and not line.startswith("#")}
    pins, todo = {}, list(ROOTS)
    while todo:
        name = canonical(todo.pop())
        if name in pins or name in image:
            continue
        distribution = metadata.distribution(name)
        pins[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(MARKER_ENVIRONMENT):
                todo.append(requirement.name)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def fetch_wheels() -> None:
    """Fill .gpu-wheels/ (git-ignored; carried to the lent machine) with `missing_requirements()` as wheels for its
    interpreter, and check the 64 MiB with the working tree."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    WHEELS.mkdir()
    pip = [sys.executable, "-m", "pip"]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for requirement in missing_requirements():
        fetched = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                                  PYTHON_VERSION, "--implementation", "cp", *platforms, "-d", str(WHEELS),
                                  requirement], capture_output=True, text=True)
        if fetched.returncode:  # no wheel published (e.g. connection-pool): build one, which must be pure Python
            before = set(WHEELS.glob("*.whl"))
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(WHEELS), requirement], check=True)
            built = set(WHEELS.glob("*.whl")) - before
            if not all(wheel.name.endswith("-none-any.whl") for wheel in built):
                raise SystemExit(f"{requirement}: no wheel for Python {PYTHON_VERSION} on x86-64 Linux "
                                 f"({fetched.stderr.strip()[-300:]}), and its source builds a compiled one")
    wheels = sorted(WHEELS.glob("*.whl"))
    size, tree = sum(p.stat().st_size for p in wheels), travelling_bytes()
    print(f"{len(wheels)} wheels in {WHEELS.relative_to(REPO)}: {mib(size)}; working tree {mib(tree)}; together "
          f"{mib(size + tree)} of the {TRAVEL_LIMIT_MIB} MiB a device call may carry")
    if size + tree > TRAVEL_LIMIT_MIB * 2**20:
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
    devices = rule_devices(logs)
    wrong = {name: found for name, found in devices.items() if not found or any(d != "cuda" for d in found)}
    if wrong:
        raise AssertionError(f"GPU rules whose log does not say they ran on CUDA only: {wrong}")
    gpu = re.search(r"device: cuda\S* \(([^)]*)\)", next(logs.glob("train.*log")).read_text())
    return (f"Tiny workflow (tests/data/tiny.yaml, random ViT-S/14 at 112 px) end to end in {seconds:.0f} s; "
            f"all {len(devices)} logs of the GPU rules ({', '.join(GPU_RULES)}) say CUDA"
            f"{f' ({gpu.group(1)})' if gpu else ''}.")


def rule_devices(logs: Path) -> dict[str, list[str]]:
    """{log file: the device types its '<key>: <device>' lines name} of every GPU rule's log in `logs` (a rule
    without a log: its name and [])."""
    devices = {}
    for rule in GPU_RULES:
        files = sorted(logs.glob(f"{rule}.*log")) + sorted(logs.glob(f"{rule}.log"))
        if not files:
            devices[rule] = []
        for log in files:
            found = re.findall(r"\bdevice: ([a-z]+)", log.read_text())
            devices[log.name] = sorted(set(found))
    return devices


def bench_rows(title: str, rows: tuple[str, ...], repeats: int, deadline: float) -> str:
    """bench_engine.py's `rows` with the CUDA defaults (ViT-B/16, bf16) at C = 200, 2,000, 10,000, as markdown."""
    command = [sys.executable, str(REPO / "bench/bench_engine.py"), "--device", "cuda", "--classes", "200", "2000",
               "10000", "--budget-s", "15", "--repeats", str(repeats), "--rows", *rows]
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True,
                          timeout=max(60.0, deadline - time.perf_counter()))
    table = done.stdout[done.stdout.index("- machine:"):] if "- machine:" in done.stdout else done.stdout
    return f"{title} (`" + " ".join(["bench/bench_engine.py", *command[2:]]) + "`):\n\n" + table.strip()


def sibling_cost_check(deadline: float) -> str:
    """Training and masking at sibling cost against every class scored (issue 15), median of 10 runs."""
    return bench_rows("Sibling cost", SIBLING_ROWS, 10, deadline)


def engine_check(deadline: float) -> str:
    """bench_engine.py's ViT-B/16 rows (the CUDA defaults) at C = 200, 2,000, 10,000."""
    return bench_rows("Engine benchmark", ENGINE_ROWS, 2, deadline)


def extraction_rates(device, backbone: str, img_size: int, classes: int, images: int, batch: int,
                     out_path: Path) -> dict[str, float]:
    """Images/s of the plain frozen forward of `backbone` (images on `device`, `mixed_precision`), of the frozen
    tokens entering the last block, and of attention extraction from those tokens cached on the host
    (`taxotrait.extract.extract_attention`: true, predicted and 2 sibling maps per image, gzip HDF5 written)."""
    import torch

    from taxotrait.backbone import create_backbone
    from taxotrait.devices import mixed_precision
    from taxotrait.extract import extract_attention, sibling_classes
    from taxotrait.model import PromptCAM, PromptConfig

    vit = create_backbone(backbone, "random", img_size)
    parents = [f"p{i // SIBLINGS}" for i in range(classes)]  # contrast 'siblings', the workflow's default
    model = PromptCAM(vit, [f"c{i}" for i in range(classes)], PromptConfig("scalable", 1),
                      class_parents=parents).to(device).eval()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def rate(function) -> float:
        function()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(images // batch):
            function()
        sync()
        return images // batch * batch / (time.perf_counter() - start)

    with torch.no_grad(), mixed_precision(device):
        forward = rate(lambda: vit.forward_features(x))
        tokens = rate(lambda: model.frozen_tokens(x))
        cached = model.frozen_tokens(x).to(torch.float16).cpu()
    labels = torch.randint(classes, (images // batch * batch,))
    batches = [([f"i{s + j}" for j in range(batch)], cached, labels[s:s + batch]) for s in range(0, len(labels), batch)]
    extra = sibling_classes(parents, 2)
    extract_attention(model, batches[:2], 2 * batch, out_path, "bench", extra, progress=False)  # warm-up
    sync()
    start = time.perf_counter()
    extract_attention(model, batches, len(labels), out_path, "bench", extra, progress=False)
    return {"forward": forward, "tokens": tokens, "extraction": len(labels) / (time.perf_counter() - start)}


def extraction_check(deadline: float) -> str:
    """Attention extraction's images/s against the plain frozen forward's, ViT-B/16 at 224 px on the GPU."""
    import torch

    lines = ["| C | plain frozen forward (img/s) | frozen tokens (img/s) | extraction from cached tokens (img/s) | "
             "extraction / forward |", "|---|---|---|---|---|"]
    ratios = {}
    for classes in (200, 2000, 10000):
        r = extraction_rates(torch.device("cuda"), "vit_base_patch16_224.dino", 224, classes, 2048, 64,
                             WORK / "extraction.h5")
        ratios[classes] = r["extraction"] / r["forward"]
        lines.append(f"| {classes} | {r['forward']:.0f} | {r['tokens']:.0f} | {r['extraction']:.0f} | "
                     f"{ratios[classes]:.2f} |")
        if time.perf_counter() > deadline:
            break
    worst = min(ratios.values())
    verdict = f"goal extraction >= 0.8 of the frozen forward's images/s: {'met' if worst >= 0.8 else 'MISSED'} " \
              f"(lowest {worst:.2f})"
    return ("Attention extraction (`extraction_rates`), ViT-B/16 at 224 px, random weights, batch 64, 2,048 images, "
            f"bf16, contrast 'siblings' ({SIBLINGS} species per genus); extraction from tokens cached on the host, as "
            f"the workflow runs it, HDF5 written ({os.cpu_count()} CPUs compress):\n\n" + "\n".join(lines)
            + f"\n\n- {verdict}")


def data_parallel_check(deadline: float) -> str:
    """NCCL data-parallel training (2 processes) of the tiny workflow's species rank against its 1-GPU model."""
    import torch
    import yaml

    if torch.cuda.device_count() < 2:
        return f"NCCL data-parallel training: not run ({torch.cuda.device_count()} GPU; it needs 2 or more)."
    from taxotrait.steps.train import train

    results = WORK / "results" / "tiny"
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for extra in (REPO / "tests/data/tiny.yaml", WORK / "gpu.yaml"):
        for key, value in yaml.safe_load(extra.read_text()).items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
    inputs = {"manifest": results / "manifest.parquet", "classes": results / "classes.parquet",
              "train_tokens": results / "cache/train.tokens.npy", "eval_tokens": results / "cache/eval.tokens.npy"}
    outputs = {"model": WORK / "ddp/model.pt", "log_table": WORK / "ddp/train_log.parquet"}
    started = time.perf_counter()
    train("species", {k: str(v) for k, v in inputs.items()}, {k: str(v) for k, v in outputs.items()}, config,
          processes=2, gpus=2, log_file=str(WORK / "ddp/train.log"))
    seconds = time.perf_counter() - started
    one = torch.load(results / "species/model.pt", weights_only=True)["state_dict"]
    two = torch.load(outputs["model"], weights_only=True)["state_dict"]
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    return (f"NCCL data-parallel training, 2 processes, tiny species rank: {seconds:.0f} s, largest parameter "
            f"difference from the 1-GPU model {gap:.2e} (bf16 autocast on both).")


# name: function(deadline) -> markdown; run in this order while time is left
CHECKS = {
    "workflow": workflow_check,
    "sibling-cost": sibling_cost_check,
    "engine": engine_check,
    "extraction": extraction_check,
    "data-parallel": data_parallel_check,
}


def machine() -> str:
    import torch

    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return (f"{os.cpu_count()} CPU cores; GPU: {gpus}; Python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def run_checks(names: list[str]) -> int:
    """Run the CHECKS named (all when none) and append their section to bench/RESULTS.md."""
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
        if names and name not in names:
            continue
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
    unknown = sorted(set(sys.argv[1:]) - set(CHECKS))
    if unknown:
        raise SystemExit(f"unknown checks {unknown} (known: {', '.join(CHECKS)})\n\n{__doc__}")
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not importable with this Python, so no CUDA: nothing to check here "
              "(run `make gpu-check` on a machine with a CUDA GPU).")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine: nothing to check here. On a machine with a CUDA GPU, "
              "`make gpu-check` runs the tiny workflow on it, the sibling-cost, engine and extraction benchmarks, and "
              "appends the results to bench/RESULTS.md.")
        return 0
    return run_checks(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
