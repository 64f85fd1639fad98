#!/usr/bin/env python
"""The key on real images without ground truth (issue 28): FashionMNIST as a two-rank "taxonomy" through the
default workflow, and whether the key forms: at every fork, each child's best entry, present or absent, with its
separation and interval.

    python bench/fashion_mnist.py --out bench/RESULTS.md     # Debian's dataset-fashion-mnist (apt-get install it)

The data set is written as a user writes theirs (`<work>/images/{train,val,test}/<item>/<n>.png`, 28 x 28 grayscale,
and `taxonomy.csv`: category -> item, `TAXONOMY`), the first `--images` images of each item and split (val from
the training file's tail), then the default workflow runs on it (DINOv2 ViT-S/14 at 224 px, `contrast: siblings`)
up to the key and the summary; the evaluation is left out (`--evaluation` keeps it).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from bench_engine import heading, publish  # bench/, the script's folder, is on sys.path

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path("/usr/share/datasets/fashion-mnist")
ITEMS = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
TAXONOMY = {"Tops": ["T-shirt_top", "Pullover", "Coat", "Shirt", "Dress"], "Footwear": ["Sandal", "Sneaker", "Ankle_boot"],
            "Trousers_and_bags": ["Trouser", "Bag"]}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as an array: images [n, 28, 28] uint8 or labels [n]."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=dims, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_dataset(work: Path, per_split: tuple[int, int, int], evaluation: bool) -> Path:
    """The image tree and taxonomy.csv under `work`; returns the config file that points the workflow at them (with
    the evaluation or without)."""
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} not found: apt-get install dataset-fashion-mnist")
    train_x, train_y = read_idx(SOURCE / "train-images-idx3-ubyte.gz"), read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"), read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    n_train, n_val, n_test = per_split
    for label, item in enumerate(ITEMS):
        train = np.flatnonzero(train_y == label)
        chosen = {"train": train_x[train[:n_train]], "val": train_x[train[-n_val:]],
                  "test": test_x[np.flatnonzero(test_y == label)[:n_test]]}
        for split, images in chosen.items():
            folder = work / "images" / split / item
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(images):
                Image.fromarray(pixels).save(folder / f"{i}.png")
    with open(work / "taxonomy.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "item"])
        writer.writerows((category, item) for category, items in TAXONOMY.items() for item in items)
    config = {"dataset": "fashion_mnist", "ranks": ["category", "item"],
              "data": {"synthetic": None, "images": str(work / "images"), "taxonomy": str(work / "taxonomy.csv")},
              "evaluation": {"enabled": evaluation}}
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work / "config.yaml"


def run_workflow(config: Path, results: Path, cores: int) -> float:
    """The workflow up to the key and the summary (the evaluation too where the config enables it); returns its wall
    seconds."""
    targets = [str(results / "fashion_mnist" / name) for name in ("key.md", "summary.md")]
    command = [sys.executable, "-m", "snakemake", *targets, "--cores", str(cores), "--configfile", str(config),
               "--config", f"results={results}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (results.parent / "snakemake.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"the workflow failed: {results.parent / 'snakemake.log'}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def key_report(results: Path) -> list[str]:
    """Markdown lines: per fork, each child's best entry; the counts of children with an entry and of couplets."""
    from taxotrait.traits import image_region

    key = pd.read_parquet(results / "key.parquet")
    classes = pd.read_parquet(results / "classes.parquet")
    lines = ["| fork | child | best entry | where it fires (on the images with the trait) | separation [95 %] |",
             "|---|---|---|---|---|"]
    best = key[key["entry"] == 1].set_index("taxon")
    for (rank, parent), group in classes.groupby(["rank", classes["parent"].fillna("")], sort=False):
        for taxon in group.sort_values("class_index")["taxon"]:
            if taxon not in best.index:
                lines.append(f"| {parent or '(root)'} | {taxon} | none | | |")
                continue
            row = best.loc[taxon]
            whose = "" if row["prompt"] == taxon else f" of {row['prompt']}"
            lines.append(f"| {parent or '(root)'} | {taxon} | {row['evidence']}: head {row['head']}{whose} | "
                         f"{image_region(row['peak_x'], row['peak_y'])}, spread {row['spread']:.2f} | "
                         f"{row['separation']:.2f} [{row['separation_low']:.2f}, {row['separation_high']:.2f}] |")
    forks = classes.groupby(["rank", classes["parent"].fillna("")]).size()
    with_entry = best.index.nunique()
    lines += ["", f"- {with_entry} of {len(classes)} taxa have a key entry ({int((forks > 1).sum())} forks); "
              f"entries per taxon: {key.groupby('taxon').size().median():.0f} (median); "
              f"present {int((best['evidence'] == 'present').sum())}, absent {int((best['evidence'] == 'absent').sum())}"
              " among the best entries"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "fashion_mnist")
    parser.add_argument("--images", type=int, nargs=3, default=(80, 10, 20), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--evaluation", action="store_true")
    parser.add_argument("--out", type=Path, help="append the section to this markdown file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    config = write_dataset(args.work, tuple(args.images), args.evaluation)
    wall = run_workflow(config, args.work / "results", args.cores)
    results = args.work / "results" / "fashion_mnist"
    summary = (results / "summary.md").read_text().split("\n## ")[0].splitlines()[2:]
    section = [*heading("FashionMNIST key", "fashion_mnist.py"),
               f"- data: Debian's dataset-fashion-mnist, {args.images[0]} / {args.images[1]} / {args.images[2]} "
               f"images per item (train / val / test), ranks category ({len(TAXONOMY)}) -> item ({len(ITEMS)}); "
               f"default workflow, evaluation {'on' if args.evaluation else 'off'}: {wall:.0f} s of wall time", "",
               *summary, "", *key_report(results), ""]
    publish("\n".join(section), args.out)


if __name__ == "__main__":
    main()
