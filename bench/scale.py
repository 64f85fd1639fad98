#!/usr/bin/env python
"""Taxonomy scale (issue 25): the default workflow on a user's own image tree of 1,000 and of 10,000 species, rule
by rule: wall time, CPU time, peak memory and output size, the report's build time and size, how each grows with
the number of species, and a verdict against the goals.

    python bench/scale.py --cores 16 --out bench/RESULTS.md      # 1,000 and 10,000 species (`make bench-scale`)
    python bench/scale.py --species 60 200 --out /tmp/scale.md   # a quick check of the harness

Each size gets a fresh folder `<work>/species_<N>` (removed first): the data set as a user writes it
(`images/{train,val,test}/<species>/<n>.png` and `taxonomy.csv`; `write_dataset`), the config that points the
workflow at it (`config.yaml`: the default workflow, evaluation and report included, on the CPU with a random
ViT-S/14 at 56 px), the results, and Snakemake's own log (`snakemake.log`). Every rule writes a benchmark file; a
rule's output size is the sum of its outputs as `snakemake --summary` lists them. A failed job is named with its
log and the rest of the workflow goes on (`--keep-going`); what was measured is still tabulated and published, and
the script exits 1.

Goals: every job at most 4096 MB of peak memory (Snakemake's sampled max_rss); no rule's time growing more than
1.2 times the growth in species (12x from 1,000 to 10,000 species); the report at most 100 MB, built in at most
2 minutes.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from bench_engine import heading, publish  # bench/, the script's folder, is on sys.path
from demo_times import benchmark_jobs, children_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
RANKS = ("order", "family", "genus", "species")
PLURALS = {"order": "orders", "family": "families", "genus": "genera"}
SPLITS = ("train", "val", "test")
MAX_CHILDREN = 12  # children per fork below the root (the orders: as many as it takes)
MIN_SPECIES = 20  # the fewest with a fork at every rank (`fork_sizes`)
IMAGE_SIZES = (28, 32)  # pixels, smallest and largest, drawn per image
PALETTE = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue / 12, 0.9, 0.9)) for hue in range(12)]
NOISE, SHIFT = 24.0, 2  # Gaussian pixel noise (sd, of 255) and the largest shift of an image, in pixels
PEAK_MB_GOAL, GROWTH_GOAL, REPORT_MB_GOAL, REPORT_S_GOAL = 4096, 1.2, 100, 120


# ------------------------------------------------------------------------------------------------ the data set
def fork_sizes(count: int, rng: random.Random) -> list[int]:
    """How `count` taxa hang from their parents: the children of each parent, in order. The first parent has one
    child (a monotypic taxon at every rank), the second two or more (a fork), the others 1 to MAX_CHILDREN drawn
    uniformly (irregular forks), none more than a third of the taxa; so from MIN_SPECIES species on, every rank
    keeps two taxa or more and a fork, as `contrast: siblings` needs to train it."""
    largest = min(MAX_CHILDREN, max(2, (count - 1) // 3))
    sizes, left = [1], count - 1
    while left:
        sizes.append(min(rng.randint(2 if len(sizes) == 1 else 1, largest), left))
        left -= sizes[-1]
    return sizes


def taxonomy(species: int, seed: int = 0) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Per species: its names (order, family, genus, species) and its code, each taxon's position among its
    siblings (an order's among all orders). Built bottom-up by `fork_sizes`: species into genera, genera into
    families, families into orders."""
    rng = random.Random(seed)
    links, count = [], species  # links[level][taxon] = (parent, position among its siblings), finest level first
    for _ in RANKS[:-1]:
        sizes = fork_sizes(count, rng)
        links.append([(parent, position) for parent, size in enumerate(sizes) for position in range(size)])
        count = len(sizes)
    rows = []
    for index in range(species):
        indices, code = [index], []
        for link in links:
            parent, position = link[indices[-1]]
            indices.append(parent)
            code.append(position)
        code.append(indices[-1])
        _, genus, family, order = indices
        names = (f"Ordo {order:03d}", f"Familia {family:04d}", f"Genus {genus:05d}",
                 f"Genus {genus:05d} sp {code[0]:02d}")
        rows.append((names, tuple(reversed(code))))
    return rows


def species_image(code: tuple[int, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size RGB image of the species of `code`: a band per rank, top to bottom, whose left half has the
    colour PALETTE[position % 12] and right half PALETTE[position // 12 % 12], so that siblings differ in their own
    rank's band and each species in the whole; Gaussian noise and a shift of up to SHIFT pixels on top."""
    image = np.empty((size, size, 3), np.float32)
    bounds = np.linspace(0, size, len(code) + 1).astype(int)
    for top, bottom, position in zip(bounds[:-1], bounds[1:], code):
        image[top:bottom, : size // 2] = PALETTE[position % 12]
        image[top:bottom, size // 2:] = PALETTE[position // 12 % 12]
    image += rng.normal(0.0, NOISE, image.shape).astype(np.float32)
    image = np.roll(image, tuple(rng.integers(-SHIFT, SHIFT + 1, 2)), axis=(0, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_species(job: tuple) -> None:
    """Write one species' images, `<root>/<split>/<species>/<n>.png` (a fast, unoptimised PNG each)."""
    root, name, code, seed, index, per_split = job
    rng, number = np.random.default_rng([seed, index]), 0
    for split, count in zip(SPLITS, per_split):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            size = int(rng.integers(IMAGE_SIZES[0], IMAGE_SIZES[1] + 1))
            Image.fromarray(species_image(code, size, rng)).save(folder / f"{number}.png", compress_level=1)
            number += 1


def write_dataset(folder: Path, species: int, per_split: tuple[int, int, int], seed: int = 0,
                  processes: int = 1) -> dict:
    """A user's data set of `species` species in `folder`: the image tree `images/` (`per_split` images per species
    in train, val and test) and `taxonomy.csv` (order,family,genus,species). Returns what it wrote: taxa and
    monotypic taxa (one child) per rank, images, seconds."""
    started = time.monotonic()
    rows = taxonomy(species, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "taxonomy.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RANKS)
        writer.writerows(names for names, _ in rows)
    jobs = [(folder / "images", names[-1], code, seed, index, per_split) for index, (names, code) in enumerate(rows)]
    with ProcessPoolExecutor(processes) as pool, tqdm(total=species, desc="images", unit="species") as bar:
        for _ in pool.map(write_species, jobs, chunksize=max(1, species // (8 * processes))):
            bar.update()
    children = [{} for _ in RANKS[:-1]]  # per rank above species: taxon -> its children
    for names, _ in rows:
        for level, (parent, child) in enumerate(zip(names, names[1:])):
            children[level].setdefault(parent, set()).add(child)
    return {"taxa": {rank: len({names[level] for names, _ in rows}) for level, rank in enumerate(RANKS)},
            "monotypic": {rank: sum(len(c) == 1 for c in kids.values()) for rank, kids in zip(RANKS, children)},
            "images": species * sum(per_split), "per_split": per_split, "seconds": time.monotonic() - started}


def describe_dataset(species: int, info: dict) -> str:
    """One line: the taxa per rank, the monotypic ones, the images and how long they took to write."""
    taxa = ", ".join(f"{info['taxa'][rank]:,} {PLURALS[rank]}" for rank in RANKS[:-1])
    monotypic = ", ".join(f"{info['monotypic'][rank]:,} {PLURALS[rank]}" for rank in RANKS[:-1])
    split = ", ".join(f"{count} {name}" for name, count in zip(SPLITS, info["per_split"]))
    return (f"{species:,} species in {taxa} (taxa with one child: {monotypic}); {info['images']:,} images ({split} per "
            f"species, {IMAGE_SIZES[0]}-{IMAGE_SIZES[1]} px PNG), written in {info['seconds']:.0f} s")


def write_config(folder: Path, species: int, epochs: int) -> Path:
    """`folder`/config.yaml: the config a user writes for the image tree and taxonomy.csv in `folder` (`data:
    {synthetic: null, images, taxonomy}`), on the CPU with a random ViT-S/14 at 56 px, `epochs` epochs; everything
    else the defaults."""
    config = {"dataset": f"scale_{species}", "results": str(folder / "results"),
              "data": {"synthetic": None, "images": str(folder / "images"), "taxonomy": str(folder / "taxonomy.csv")},
              "backbone": {"weights": "random", "img_size": 56}, "augment": {"resize": 64},
              "train": {"epochs": epochs, "device": "cpu"}, "evaluation": {"device": "cpu"}, "resources": {"gpu": 0}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class RuleCost:
    """One rule's jobs summed: wall and CPU seconds, the largest peak memory of a job (MB; None when no job was
    sampled), and the bytes of its outputs."""
    jobs: int
    wall_s: float
    cpu_s: float
    peak_mb: float | None
    output_bytes: int


@dataclass
class SizeRun:
    """What one size measured (None: not measured, as after a failure)."""
    species: int
    dataset: str
    costs: dict[str, RuleCost]
    wall_s: float | None = None
    cpu_s: float | None = None
    report_s: float | None = None
    report_bytes: int | None = None
    failures: list[str] = field(default_factory=list)


def path_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder; 0 when missing."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def output_bytes(summary: str, cwd: Path = REPO) -> dict[str, int]:
    """Per rule, the bytes of its outputs listed by `snakemake --summary` (tab-separated: output_file, date, rule,
    ...; relative paths are relative to `cwd`, where Snakemake ran)."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    header = lines[start].split("\t")
    totals: dict[str, int] = {}
    for line in lines[start + 1:]:
        cells = line.split("\t")
        if len(cells) == len(header):
            row = dict(zip(header, cells))
            totals[row["rule"]] = totals.get(row["rule"], 0) + path_bytes(cwd / row["output_file"])
    return totals


def rule_costs(jobs: dict[str, list[dict]], outputs: dict[str, int]) -> dict[str, RuleCost]:
    """Per benchmarked rule (`demo_times.benchmark_jobs`), its RuleCost; `outputs`: its output bytes."""
    costs = {}
    for rule, records in jobs.items():
        peaks = [record["max_rss"] for record in records if record.get("max_rss") is not None]
        costs[rule] = RuleCost(len(records), sum(record["s"] for record in records),
                               sum(record.get("cpu_time") or 0.0 for record in records),
                               max(peaks) if peaks else None, outputs.get(rule, 0))
    return costs


def failed_jobs(log: str) -> list[tuple[str, str]]:
    """(rule, its log file(s)) of every job a Snakemake log reports as failed ('Error in rule ...:')."""
    failed = []
    for block in re.split(r"^(?=Error in rule )", log, flags=re.M)[1:]:
        rule = re.match(r"Error in rule (\S+?):", block)
        logs = re.search(r"^\s+log: (.+?) \(check log", block, flags=re.M)
        if rule:
            failed.append((rule.group(1), logs.group(1) if logs else "no log"))
    return failed


def last_line(path: str) -> str:
    """The last non-empty line of a text file (its error, for a failed job's log); '' when unreadable."""
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


def snakemake(config: Path, cores: int, *extra: str, **run) -> subprocess.CompletedProcess:
    """`snakemake --cores N --configfile=<config> ...` in the repository, on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", str(cores), f"--configfile={config}"]
    return subprocess.run(command + list(extra), cwd=REPO, env=env, text=True, **run)


def run_size(species: int, args: argparse.Namespace) -> SizeRun:
    """Write the data set of `species` species into a fresh `<work>/species_<N>`, run the workflow on it, then its
    report (when the workflow succeeded), and measure every rule."""
    folder = args.work.resolve() / f"species_{species}"
    shutil.rmtree(folder, ignore_errors=True)
    print(f"[{species} species] writing the data set into {folder}", file=sys.stderr)
    info = write_dataset(folder, species, tuple(args.images), args.seed, args.cores)
    config = write_config(folder, species, args.epochs)
    log_path = folder / "snakemake.log"
    run = SizeRun(species, describe_dataset(species, info), {})
    print(f"[{species} species] running the workflow (log: {log_path})", file=sys.stderr)
    with log_path.open("w") as log:
        started, cpu = time.monotonic(), children_cpu_seconds()
        done = snakemake(config, args.cores, "--keep-going", stdout=log, stderr=subprocess.STDOUT)
        run.wall_s, run.cpu_s = time.monotonic() - started, children_cpu_seconds() - cpu
        if done.returncode == 0:
            report = folder / "report.html"
            started = time.monotonic()
            built = snakemake(config, args.cores, "--report", str(report), stdout=log, stderr=subprocess.STDOUT)
            if built.returncode == 0:
                run.report_s, run.report_bytes = time.monotonic() - started, path_bytes(report)
            else:
                run.failures.append(f"`--report` (log: {log_path}): {last_line(str(log_path))}")
    jobs = [f"rule {rule} (log: {logs}): {last_line(logs.split(', ')[0])}"
            for rule, logs in failed_jobs(log_path.read_text(errors="replace"))]
    if done.returncode and not jobs:  # no job to blame: Snakemake's own error (its log's last line)
        jobs = [f"snakemake exited {done.returncode} (log: {log_path}): {last_line(str(log_path))}"]
    run.failures = jobs + run.failures
    summary = snakemake(config, args.cores, "--summary", capture_output=True)
    outputs = output_bytes(summary.stdout) if summary.returncode == 0 else {}
    run.costs = rule_costs(benchmark_jobs(folder / "results" / f"scale_{species}" / "benchmarks"), outputs)
    for failure in run.failures:
        print(f"[{species} species] FAILED: {failure}", file=sys.stderr)
    return run


# ------------------------------------------------------------------------------------------------ the section
def ratio(large: float | None, small: float | None) -> float | None:
    return large / small if large is not None and small else None


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}x"


def total(costs: dict[str, RuleCost]) -> RuleCost:
    """All the jobs of a run: times and outputs summed, the largest peak of a job."""
    peaks = [cost.peak_mb for cost in costs.values() if cost.peak_mb is not None]
    return RuleCost(sum(cost.jobs for cost in costs.values()), sum(cost.wall_s for cost in costs.values()),
                    sum(cost.cpu_s for cost in costs.values()), max(peaks, default=None),
                    sum(cost.output_bytes for cost in costs.values()))


def cell(cost: RuleCost | None) -> str:
    if cost is None:
        return "–"
    peak = "–" if cost.peak_mb is None else f"{cost.peak_mb:.0f}"
    return f"{cost.wall_s:.1f} · {cost.cpu_s:.1f} · {peak} · {cost.output_bytes / 2**20:.1f} ({cost.jobs})"


def table(runs: list[SizeRun]) -> str:
    """Markdown: a row per rule (the slowest at the largest size first), per size 'wall s · CPU s · peak MB ·
    output MB (jobs)', then the growth from the smallest size to the largest of wall time, peak and output."""
    last = runs[-1].costs
    rules = sorted({rule for run in runs for rule in run.costs}, key=lambda r: -last[r].wall_s if r in last else 0)
    rows = {rule: [run.costs.get(rule) for run in runs] for rule in rules}
    rows["**all jobs** (peak: the largest)"] = [total(run.costs) for run in runs]
    growth = len(runs) > 1
    header = [f"{run.species:,} species: wall s · CPU s · peak MB · output MB (jobs)" for run in runs]
    if growth:
        header.append(f"growth {runs[0].species:,} → {runs[-1].species:,}: wall · peak · output")
    lines = ["| rule | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for rule, costs in rows.items():
        cells = [cell(cost) for cost in costs]
        if growth:
            cells.append(" · ".join(times(ratio(getattr(costs[-1], key, None), getattr(costs[0], key, None)))
                                    for key in ("wall_s", "peak_mb", "output_bytes")))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(runs: list[SizeRun]) -> list[str]:
    """The goals, each met or MISSED with its numbers: peak memory per job, growth of each rule's time from the
    smallest size to the largest, the report's size and build time at each size."""
    peaks = sorted(((cost.peak_mb, rule, run.species) for run in runs for rule, cost in run.costs.items()
                    if cost.peak_mb is not None), reverse=True)
    over = [f"{rule} at {species:,} species: {mb:,.0f} MB" for mb, rule, species in peaks if mb > PEAK_MB_GOAL]
    lines = [f"- peak memory of every job at most {PEAK_MB_GOAL} MB: "
             + (f"**MISSED**: {'; '.join(over)}" if over else
                f"met (the largest: {peaks[0][1]} at {peaks[0][2]:,} species, {peaks[0][0]:,.0f} MB)" if peaks else
                "not measured")]
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        allowed = GROWTH_GOAL * large.species / small.species
        growth = sorted(((large.costs[r].wall_s / small.costs[r].wall_s, r) for r in small.costs.keys() & large.costs
                         if small.costs[r].wall_s > 0), reverse=True)
        fast = [f"{rule} {value:.1f}x" for value, rule in growth if value > allowed]
        unmeasured = sorted(small.costs.keys() ^ large.costs.keys())
        line = (f"- time of every rule growing at most {allowed:.1f}x from {small.species:,} to {large.species:,} "
                f"species ({GROWTH_GOAL}x the growth in species): "
                + (f"**MISSED**: {', '.join(fast)}" if fast else
                   f"met (the largest: {growth[0][1]} {growth[0][0]:.1f}x)" if growth else "not measured"))
        lines.append(line + (f"; not measured at both sizes: {', '.join(unmeasured)}" if unmeasured else ""))
    for run in runs:
        goal = f"- report at most {REPORT_MB_GOAL} MB built in at most {REPORT_S_GOAL} s, at {run.species:,} species: "
        if run.report_s is None:
            lines.append(goal + "not built (a failure above)")
            continue
        megabytes = run.report_bytes / 2**20
        met = megabytes <= REPORT_MB_GOAL and run.report_s <= REPORT_S_GOAL
        lines.append(goal + f"{megabytes:.1f} MB in {run.report_s:.0f} s: " + ("met" if met else "**MISSED**"))
    return lines


def section(runs: list[SizeRun], args: argparse.Namespace) -> str:
    """The dated markdown section: machine, command, settings, data sets, wall times, failures, table, verdicts."""
    lines = heading("Taxonomy scale", "scale.py")
    lines.append(f"- settings: the default workflow (evaluation and report included) on a user's image tree "
                 f"(`bench/scale.py`'s `write_dataset`), on the CPU, `--cores {args.cores}`, random ViT-S/14 at 56 "
                 f"px, {args.epochs} epoch(s); results under {args.work.resolve()}/species_<N>; table cells: "
                 "Snakemake's benchmark of each job (wall and CPU seconds summed over the rule's jobs, peak memory: "
                 "the largest sampled max_rss of a job) and the size of the rule's outputs (`snakemake --summary`)")
    for run in runs:
        lines.append(f"- data: {run.dataset}")
        if run.wall_s is not None:
            report = ("" if run.report_s is None else
                      f", then `--report` {run.report_s:.0f} s ({run.report_bytes / 2**20:.1f} MB)")
            lines.append(f"- workflow at {run.species:,} species: {run.wall_s:.0f} s of wall time{report}; its "
                         f"processes took {run.cpu_s:.0f} CPU s (the kernel's count)")
        lines += [f"- **FAILED** at {run.species:,} species: {failure}" for failure in run.failures]
    lines += ["", table(runs), "", *verdicts(runs), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--species", type=int, nargs="+", default=[1000, 10000], help="sizes, in species")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "build/bench-scale",
                        help="folder of the data sets and results (species_<N> in it is replaced)")
    parser.add_argument("--images", type=int, nargs=3, default=[2, 1, 1], metavar=("TRAIN", "VAL", "TEST"),
                        help="images per species in each split")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the section to this markdown file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    if min(args.species) < MIN_SPECIES:
        parser.error(f"--species: every size needs at least {MIN_SPECIES} species (a fork at every rank)")
    runs = [run_size(species, args) for species in sorted(set(args.species))]
    publish(section(runs, args), args.out)
    sys.exit(1 if any(run.failures for run in runs) else 0)


if __name__ == "__main__":
    main()
