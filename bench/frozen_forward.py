#!/usr/bin/env python
"""CPU cost of the frozen forwards over images (the token cache, faithfulness's perturbed images): 64 images at once,
pieces of `CPU_IMAGES_PER_FORWARD` one after the other on every thread, and the pieces side by side on one thread
each (what `taxotrait.devices.frozen_forward` does). Wall and CPU milliseconds per image, each strategy in turn, so
that a shared machine's drift falls on all of them; then the page faults of those forwards with and without the
workflow's allocator settings (`taxotrait.runner.ALLOCATOR_ENVIRONMENT`, each in a fresh process). In the precision
the workflow's `backbone.precision: auto` picks on this CPU, or `--precision fp32|bf16`.

    python bench/frozen_forward.py                          # the demo's backbone (random weights: the same time)
    python bench/frozen_forward.py --out bench/RESULTS.md   # ... and append a dated section
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_engine import machine, publish  # noqa: E402  (bench/, the script's folder, is on sys.path)
from taxotrait.backbone import create_backbone  # noqa: E402
from taxotrait.devices import CPU_IMAGES_PER_FORWARD, autocast, frozen_forward, resolve_precision  # noqa: E402
from taxotrait.runner import ALLOCATOR_ENVIRONMENT  # noqa: E402


def strategies(forward, images: torch.Tensor, threads: int, dtype: torch.dtype) -> dict:
    """name -> a function running `forward` over `images` that way, without gradient, computing in `dtype`."""
    cpu = torch.device("cpu")

    def whole(batch):
        with torch.no_grad(), autocast(cpu, dtype):
            return forward(batch)

    def on_every_thread(run_images):
        def run():
            torch.set_num_threads(threads)
            return run_images()
        return run

    pieces = images.split(CPU_IMAGES_PER_FORWARD)
    return {f"{len(images)} at once": on_every_thread(lambda: whole(images)),
            f"pieces of {CPU_IMAGES_PER_FORWARD}, one after the other": on_every_thread(lambda: [whole(p) for p in pieces]),
            f"pieces of {CPU_IMAGES_PER_FORWARD}, side by side (frozen_forward)":
                on_every_thread(lambda: frozen_forward(forward, images, cpu, dtype))}


def page_faults(args) -> int:
    """Minor page faults of two forwards (the side-by-side strategy, after one) in this process."""
    forward, images = build(args)
    run = list(strategies(forward, images, args.threads, precision(args)).values())[-1]
    run()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def precision(args) -> torch.dtype:
    """The compute dtype of `--precision` on the CPU, as `backbone.precision` resolves it."""
    return resolve_precision(args.precision, torch.device("cpu"))


def build(args):
    vit = create_backbone(args.backbone, weights="random", img_size=args.img_size).eval()
    return vit.forward_features, torch.randn(args.images, 3, args.img_size, args.img_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--precision", default="auto", help="auto | bf16 | fp32, as backbone.precision")
    parser.add_argument("--faults", action="store_true", help=argparse.SUPPRESS)  # the child of the fault count
    parser.add_argument("--out", help="append the section to this markdown file")
    args = parser.parse_args()
    if args.faults:
        print(page_faults(args))
        return
    forward, images = build(args)
    dtype = precision(args)
    runs = strategies(forward, images, args.threads, dtype)
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), os.times()
            run()
            after = os.times()
            times[name].append(((time.perf_counter() - wall) * 1000 / len(images),
                                (after.user + after.system - cpu.user - cpu.system) * 1000 / len(images)))
    plain = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT}
    faults = {label: int(subprocess.run([sys.executable, __file__, "--faults", "--images", str(args.images),
                                         "--threads", str(args.threads), "--precision", args.precision,
                                         "--backbone", args.backbone, "--img-size", str(args.img_size)],
                                        env=env, capture_output=True, text=True, check=True).stdout)
              for label, env in (("glibc's defaults", plain), ("the workflow's settings", {**plain, **ALLOCATOR_ENVIRONMENT}))}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Frozen forwards on the CPU, {stamp}", "",
             f"- machine: {machine('cpu')}",
             f"- command: `python bench/frozen_forward.py {' '.join(sys.argv[1:])}`",
             f"- `{args.backbone}` at {args.img_size} px, {args.images} images, {args.threads} threads, "
             f"{str(dtype).removeprefix('torch.')}, "
             f"median of {args.repeats} runs (each strategy in turn)", "",
             "| strategy | wall ms / image | CPU ms / image |", "|---|---|---|"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(v[0] for v in values):.1f} | "
                     f"{statistics.median(v[1] for v in values):.1f} |")
    lines += ["", "Page faults of two of those forwards (side by side, each in a fresh process): "
              + ", ".join(f"{label} {count:,}" for label, count in faults.items()) + ".", ""]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
