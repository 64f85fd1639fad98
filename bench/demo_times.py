#!/usr/bin/env python
"""The demo's wall time and where it goes: `snakemake --cores N` on the embedded demo into a fresh results folder,
timed end to end, then every rule's benchmark files (`<results>/<dataset>/benchmarks/*.tsv`) summed per rule.

    python bench/demo_times.py                          # run the demo, print the table
    python bench/demo_times.py --out bench/RESULTS.md   # ... and append it as a dated section
    python bench/demo_times.py --compare OLD_RESULTS    # a column per folder: an earlier run's benchmarks beside
    python bench/demo_times.py --tabulate RESULTS       # no run: the table of a finished run's benchmarks

The backbone file must exist first (`snakemake --cores 2 resources/backbones/...`, as `make demo` does; about 15 s
once per clone); the goal (issue 15) is 6 minutes of wall time for the workflow and its report on a 2-core machine. A shared machine shows in the load average: it is printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_engine import heading, publish  # bench/, the script's folder, is on sys.path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 360


def benchmark_jobs(benchmarks: Path) -> dict[str, list[dict[str, float | None]]]:
    """Per rule, one record per job from Snakemake's benchmark files (`<rule>.<wildcards>.tsv` or `<rule>.tsv`, the
    last row of each): its numeric columns (`s`, `cpu_time`, `max_rss` in MB, ...), None where Snakemake wrote NA (a
    job too short to be sampled)."""
    jobs: dict[str, list[dict[str, float | None]]] = {}
    for path in sorted(benchmarks.glob("*.tsv")):
        with path.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if rows:
            record = {column: _number(text) for column, text in rows[-1].items() if column != "h:m:s"}
            jobs.setdefault(path.name.split(".")[0], []).append(record)
    return jobs


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # NA
        return None


def rule_times(benchmarks: Path) -> dict[str, tuple[int, float, float]]:
    """Per rule: (jobs, wall seconds summed, CPU seconds summed; NA counts 0) from `benchmark_jobs`."""
    return {rule: (len(jobs), sum(job["s"] for job in jobs), sum(job["cpu_time"] or 0.0 for job in jobs))
            for rule, jobs in benchmark_jobs(benchmarks).items()}


def table(columns: dict[str, dict[str, tuple[int, float, float]]]) -> str:
    """Markdown: one row per rule (the slowest first, by the last column), per column 'wall s / CPU s (jobs)'."""
    last = list(columns.values())[-1]
    rules = sorted({r for c in columns.values() for r in c}, key=lambda r: -last.get(r, (0, 0.0, 0.0))[1])
    lines = ["| rule | " + " | ".join(f"{name}: wall s · CPU s (jobs)" for name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for rule in rules:
        cells = [f"{c[rule][1]:.1f} · {c[rule][2]:.1f} ({c[rule][0]})" if rule in c else "–" for c in columns.values()]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    sums = [f"{sum(v[1] for v in c.values()):.0f} · {sum(v[2] for v in c.values()):.0f} "
            f"({sum(v[0] for v in c.values())})" for c in columns.values()]
    lines.append("| **all jobs** | " + " | ".join(sums) + " |")
    return "\n".join(lines)


def run_demo(results: Path, cores: int) -> tuple[float, float, float]:
    """Wall seconds of the demo workflow into `results` (the backbone already converted), then of its report
    (`--report`), as `make demo` runs them; and the CPU seconds (user + system) of all the workflow's processes, as
    the kernel counts them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", str(cores), "--config",
               f"results={results}", "--quiet", "rules"]
    times = []
    for extra in ([], ["--report", str(results / "report.html")]):
        started, cpu = time.monotonic(), children_cpu_seconds()
        subprocess.run(command + extra, cwd=REPO, env=env, check=True)
        times.append((time.monotonic() - started, children_cpu_seconds() - cpu))
    return times[0][0], times[1][0], times[0][1]


def children_cpu_seconds() -> float:
    """User + system seconds of this process's finished children and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="results folders (<results>/<dataset>) of earlier runs, shown before this one")
    parser.add_argument("--tabulate", type=Path, help="no run: tabulate this finished run's folder")
    parser.add_argument("--out", type=Path, help="append the section to this markdown file")
    args = parser.parse_args()

    columns = {folder.name if len(args.compare) == 1 else str(folder): rule_times(folder / "benchmarks")
               for folder in args.compare}
    load_before = os.getloadavg()
    if args.tabulate:
        columns[str(args.tabulate)] = rule_times(args.tabulate / "benchmarks")
        wall = None
    else:
        results = Path(tempfile.mkdtemp(prefix="demo-times-"))
        wall, report, cpu = run_demo(results, args.cores)
        columns["this run"] = rule_times(results / "demo" / "benchmarks")
    lines = heading("Demo wall time", "demo_times.py", f"; load average at the start {load_before[0]:.2f}")
    if wall is not None:
        total = wall + report
        verdict = "met" if total <= GOAL_S else f"missed by {total - GOAL_S:.0f} s"
        lines.append(f"- `snakemake --cores {args.cores}` on the demo (backbone converted): {wall:.0f} s, then "
                     f"`--report` {report:.0f} s: **{total:.0f} s** of wall time (goal {GOAL_S} s: {verdict}); "
                     f"the workflow's processes took {cpu:.0f} CPU s (the kernel's count; the table's CPU column is "
                     f"Snakemake's sampling of each job)")
    lines += ["", table(columns), ""]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
