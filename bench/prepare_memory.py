#!/usr/bin/env python
"""The prepare step's memory against the number of images (issue 25): `taxotrait.dataset.prepare_files` on an image
tree and on a CSV manifest of N images of a fixed number of species, each in a fresh process, its peak memory and
wall time, and how the peak grows per image.

    python bench/prepare_memory.py --out bench/RESULTS.md                      # 20,000, 200,000 and 1,000,000 images
    python bench/prepare_memory.py --images 2000 20000 --compare 79201dc      # also the code of an older commit

The data set (`write_dataset`, under `<work>/images_<N>`, removed first): `--species` species (N / species images
each: a quarter for val, a quarter for test, the rest for train) in genera of 10, families of 10 genera and orders of
10 families, as `images/<split>/<species>/<n>.png` plus taxonomy.csv, and manifest.csv listing the same files. The
images are hard links to 64 small PNGs (the step decodes every one of them; the disk holds 64). `--compare REV` runs the same measurements with the package of
commit REV (`git archive`), e.g. the last one before the streamed prepare step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench_engine import heading, publish  # bench/, the script's folder, is on sys.path

REPO = Path(__file__).resolve().parents[1]
RANKS = ["order", "family", "genus", "species"]
# The main process's peak resident memory is VmHWM (ru_maxrss would count the forking parent's from before exec).
MEASURE = """
import json, re, sys, time
from taxotrait.dataset import prepare_files
data, inputs, outputs, workers = json.loads(sys.argv[1])
start = time.perf_counter()
if data:
    prepare_files(inputs, outputs, data, {ranks}, workers=workers)
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_mb": peak / 1024}}))
""".format(ranks=RANKS)


def write_dataset(folder: Path, images: int, species: int) -> None:
    """`images` images (hard links to 64 PNGs) of `species` species as an image tree, taxonomy.csv and
    manifest.csv."""
    shutil.rmtree(folder, ignore_errors=True)
    sources = folder / "sources"
    sources.mkdir(parents=True)
    rng = np.random.default_rng(0)
    originals = []
    for i in range(64):
        originals.append(sources / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(originals[-1])
    with open(folder / "taxonomy.csv", "w", newline="") as taxonomy, \
            open(folder / "manifest.csv", "w", newline="") as manifest:
        taxa, listing = csv.writer(taxonomy), csv.writer(manifest)
        taxa.writerow(RANKS)
        listing.writerow(["path", "split", "species"])
        each = images // species
        for s in range(species):
            taxa.writerow([f"Order {s // 1000}", f"Family {s // 100}", f"Genus {s // 10}", f"Species {s}"])
            for split, count in (("train", each - 2 * (each // 4)), ("val", each // 4), ("test", each // 4)):
                folder_of = folder / "images" / split / f"Species {s}"
                folder_of.mkdir(parents=True)
                for n in range(count):
                    os.link(originals[(s + n) % 64], folder_of / f"{n}.png")
                    listing.writerow([f"images/{split}/Species {s}/{n}.png", split, f"Species {s}"])


def measure(folder: Path, layout: str, src: Path, workers: int) -> dict:
    """prepare_files on the `layout` ('tree' or 'manifest') of the data set in `folder`, in a fresh process running
    the package at `src` (no layout: the process's memory after the imports alone)."""
    data = {"max_reject_fraction": 0.01, **({"images": str(folder / "images")} if layout == "tree" else {})}
    inputs = {"taxonomy": str(folder / "taxonomy.csv"), **({"manifest": str(folder / "manifest.csv")}
                                                           if layout == "manifest" else {})}
    outputs = {name: str(folder / layout / f"{name}.parquet") for name in ("manifest", "classes", "rejects")}
    argument = json.dumps([data if layout else {}, inputs, outputs, workers])
    result = subprocess.run([sys.executable, "-c", MEASURE, argument], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(src)})
    if result.returncode:
        raise SystemExit(f"prepare failed ({layout}, {folder}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def package_of(revision: str, into: Path) -> Path:
    """The src/ folder of commit `revision`, exported under `into`."""
    archive = subprocess.run(["git", "archive", revision, "src"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--species", type=int, default=5_000, help="species, whatever the number of images")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (the rule's threads)")
    parser.add_argument("--compare", metavar="REV", help="also measure the package of this commit")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "prepare-memory")
    parser.add_argument("--out", help="append the section to this file (bench/RESULTS.md)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        codes = {head.stdout.strip() or "this checkout": REPO / "src"}
        if args.compare:
            codes[args.compare] = package_of(args.compare, Path(tmp))
        imports = {code: measure(args.work, "", src, args.workers)["peak_mb"] for code, src in codes.items()}
        rows = {}
        for images in sorted(args.images):
            folder = args.work / f"images_{images}"
            write_dataset(folder, images, args.species)
            for layout in ("tree", "manifest"):
                for code, src in codes.items():
                    rows[code, layout, images] = measure(folder, layout, src, args.workers)
                    print(code, layout, images, rows[code, layout, images], flush=True)
            shutil.rmtree(folder)
    lines = heading("Prepare memory", "prepare_memory.py") + [
        f"- data: N images of {args.species:,} species (N / {args.species:,} each: a quarter val, a quarter test),"
        f" genera of 10 species, families of 10 genera, orders of 10 families; 32 px PNG (hard links to 64 files);"
        f" the image tree with taxonomy.csv, and a"
        f" manifest.csv of the same files; {args.workers} decoding workers",
        "- cells: wall s · peak MB of the step's process (VmHWM; its decoding workers hold one task of images each);"
        " growth: that peak from the smallest to the largest N, per added image",
        f"- memory after the imports alone: " + ", ".join(f"{code} {mb:.0f} MB" for code, mb in imports.items()), "",
        "| code | layout | " + " | ".join(f"{n:,} images" for n in sorted(args.images)) + " | growth per image |",
        "|---|---|" + "---|" * (len(args.images) + 1)]
    small, large = min(args.images), max(args.images)
    for code in codes:
        for layout in ("tree", "manifest"):
            cells = [rows[code, layout, n] for n in sorted(args.images)]
            growth = (rows[code, layout, large]["peak_mb"] - rows[code, layout, small]["peak_mb"]) * 1024 ** 2 / (
                large - small) if large > small else float("nan")
            lines.append(f"| {code} | {layout} | " + " | ".join(
                f"{c['seconds']:.0f} · {c['peak_mb']:.0f}" for c in cells)
                + f" | {growth:.0f} bytes |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
