"""bench/bench_engine.py's sibling-cost rows (issue 15; also run by `make gpu-check`): their tree, and their code path
at tiny sizes; bench/frozen_forward.py at a tiny size."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_engine  # noqa: E402


def test_the_siblings_rows_tree_has_2_to_5_species_per_genus():
    for classes in (2, 7, 200, 10_000):
        parents = bench_engine.genus_tree(classes)
        sizes = Counter(parents).values()
        assert len(parents) == classes and min(sizes) >= 2 and max(sizes) <= 5
        assert bench_engine.genus_tree(classes) == parents  # seeded
    assert len(set(Counter(bench_engine.genus_tree(10_000)).values())) == 4  # every size from 2 to 5 occurs


def test_the_siblings_rows_run_and_report_their_cost_ratio():
    done = subprocess.run([sys.executable, str(REPO / "bench/bench_engine.py"), "--quick", "--device", "cpu",
                           "--rows", "scalable k=1 siblings"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| scalable k=1 siblings |")]
    assert len(rows) == 2 and not any("failed" in row or "skipped" in row for row in rows), done.stdout
    assert "- sibling cost, train: C=50 takes" in done.stdout and "- sibling cost, mask: C=50 takes" in done.stdout


def test_the_frozen_forward_bench_times_each_strategy_and_counts_page_faults(tmp_path):
    out = tmp_path / "results.md"
    done = subprocess.run([sys.executable, str(REPO / "bench/frozen_forward.py"), "--images", "20", "--img-size", "56",
                           "--repeats", "1", "--precision", "fp32", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 20 at once |") or line.startswith("| pieces of")]
    assert len(rows) == 3 and all(float(row.split("|")[2]) > 0 for row in rows), text
    assert "glibc's defaults" in text and "the workflow's settings" in text and "20 images, 2 threads, float32," in text


def test_the_demo_times_bench_counts_the_cpu_seconds_of_descendant_processes():
    import demo_times

    before = demo_times.children_cpu_seconds()
    busy = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"],
                   check=True)
    assert demo_times.children_cpu_seconds() - before >= 0.4
