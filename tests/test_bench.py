"""bench/bench_engine.py's sibling-cost rows (issue 15; also run by `make gpu-check`): their tree, and their code path
at tiny sizes; bench/frozen_forward.py at a tiny size; bench/scale.py's data set and its table and verdicts (issue
25); bench/fashion_mnist.py's data set (issue 28); bench/prepare_memory.py's data set and measurement (issue 25)."""

import os
import random
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


def test_the_scale_bench_writes_a_user_image_tree_that_prepare_accepts(tmp_path):
    """bench/scale.py's data set at 30 species: irregular forks of 1 to 12 with monotypic taxa at every rank, the
    image tree and taxonomy.csv a user writes, accepted by the workflow's prepare step, each image showing its code."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    import scale
    from taxotrait.schema import defaults
    from taxotrait.steps.prepare import prepare

    sizes = scale.fork_sizes(10_000, random.Random(0))
    assert sum(sizes) == 10_000 and sizes[0] == 1 and sizes[1] >= 2 and set(sizes) == set(range(1, 13))

    info = scale.write_dataset(tmp_path, 30, (2, 1, 1), processes=2)
    settings = defaults()
    settings["data"].update(synthetic=None, images=str(tmp_path / "images"), taxonomy=str(tmp_path / "taxonomy.csv"))
    outputs = {key: tmp_path / f"{key}.parquet" for key in ("manifest", "classes", "rejects")}
    prepare({"taxonomy": settings["data"]["taxonomy"]}, outputs, settings)

    manifest, classes = pd.read_parquet(outputs["manifest"]), pd.read_parquet(outputs["classes"])
    assert len(pd.read_parquet(outputs["rejects"])) == 0
    assert manifest["split"].value_counts().to_dict() == {"train": 60, "val": 30, "test": 30} == {
        split: len(list((tmp_path / "images" / split).glob("*/*.png"))) for split in ("train", "val", "test")}
    assert classes.groupby("rank").size().to_dict() == info["taxa"] and info["taxa"]["species"] == 30
    children = classes[classes["rank"] != "order"].groupby("parent").size()
    assert children.max() <= 12 and children.nunique() >= 3 and (children == 1).sum() >= 3, children
    assert all(count >= 1 for count in info["monotypic"].values()) and info["taxa"]["order"] >= 2

    rows = scale.taxonomy(30)
    for names, code in (rows[0], rows[-1]):  # each rank's band (left half) has its position's colour, under noise
        image = np.asarray(Image.open(next((tmp_path / "images/train" / names[-1]).glob("*.png"))), float)
        bounds, margin = np.linspace(0, len(image), 5).astype(int), scale.SHIFT  # the bands, away from their edges
        for top, bottom, position in zip(bounds[:-1], bounds[1:], code):
            middle = image[top + margin:bottom - margin, margin:len(image) // 2 - margin]
            assert np.abs(middle.reshape(-1, 3).mean(0) - scale.PALETTE[position % 12]).max() < 20, (names, code)


SNAKEMAKE_LOG = """Building DAG of jobs...
Error in rule train:
    message: None
    jobid: 7
    input: r/classes.parquet
    output: r/species/model.pt
    log: {log} (check log file(s) for error details)
Shutting down, this might take some time.
"""


def write_benchmarks(folder, jobs):
    folder.mkdir(parents=True)
    for name, (seconds, rss, cpu) in jobs.items():
        (folder / f"{name}.tsv").write_text(
            "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
            f"{seconds}\t0:00:01\t{rss}\tNA\tNA\tNA\tNA\tNA\tNA\t{cpu}\n")


def test_the_scale_bench_tabulates_benchmarks_and_gives_each_goal_its_verdict(tmp_path):
    """Two sizes' fake benchmark files and outputs: per rule time, peak and output bytes, their growth, the goals
    missed with their numbers, and a failed job named with its log's last line."""
    import argparse

    import scale
    from demo_times import benchmark_jobs

    write_benchmarks(tmp_path / "small", {"train.genus": (5, 300, 4), "train.species": (10, 500, 9),
                                          "key": (1.0, "NA", "NA")})
    write_benchmarks(tmp_path / "large", {"train.genus": (50, 900, 40), "train.species": (100, 5000, 90),
                                          "key": (20.0, 200, 19)})
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures/a.png").write_bytes(b"x" * 3000)
    (tmp_path / "key.md").write_bytes(b"x" * 1000)
    summary = ("Building DAG of jobs...\noutput_file\tdate\trule\tlog-file(s)\tstatus\tplan\n"
               "figures\t-\tfigures\t-\tok\tno update\nkey.md\t-\tkey\t-\tok\tno update\n"
               "missing.md\t-\tkey\t-\tmissing\tupdate pending\n")
    outputs = scale.output_bytes(summary, tmp_path)
    assert outputs == {"figures": 3000, "key": 1000}
    small = scale.SizeRun(1000, "small data", scale.rule_costs(benchmark_jobs(tmp_path / "small"), outputs),
                          wall_s=20, cpu_s=15, report_s=30, report_bytes=5 * 2**20)
    large = scale.SizeRun(10_000, "large data", scale.rule_costs(benchmark_jobs(tmp_path / "large"), outputs),
                          wall_s=200, cpu_s=150)
    failed_log = tmp_path / "train.species.log"
    failed_log.write_text("loading\nMemoryError: out of memory\n\n")
    failed = scale.failed_jobs(SNAKEMAKE_LOG.format(log=failed_log))
    assert failed == [("train", str(failed_log))] and scale.last_line(failed[0][1]) == "MemoryError: out of memory"
    large.failures.append(f"rule train (log: {failed_log}): {scale.last_line(str(failed_log))}")

    train = small.costs["train"]
    assert (train.jobs, train.wall_s, train.cpu_s, train.peak_mb) == (2, 15.0, 13.0, 500.0)
    key = small.costs["key"]
    assert key.peak_mb is None and key.cpu_s == 0 and key.output_bytes == 1000  # NA: not sampled
    args = argparse.Namespace(cores=2, epochs=2, work=tmp_path)
    text = scale.section([small, large], args)
    assert "| train | 15.0 · 13.0 · 500 · 0.0 (2) | 150.0 · 130.0 · 5000 · 0.0 (2) | 10.0x · 10.0x · – |" in text
    assert "| key | 1.0 · 0.0 · – · 0.0 (1) | 20.0 · 19.0 · 200 · 0.0 (1) | 20.0x · – · 1.0x |" in text
    assert "- peak memory of every job at most 4096 MB: **MISSED**: train at 10,000 species: 5,000 MB" in text
    assert ("growing at most 12.0x from 1,000 to 10,000 species (1.2x the growth in species): **MISSED**: "
            "key 20.0x\n") in text
    assert "at 1,000 species: 5.0 MB in 30 s: met" in text
    assert "at 10,000 species: not built (a failure above)" in text
    assert f"- **FAILED** at 10,000 species: rule train (log: {failed_log}): MemoryError: out of memory" in text


def test_the_fashion_mnist_bench_writes_an_image_tree_and_a_taxonomy(tmp_path, monkeypatch):
    """bench/fashion_mnist.py on IDX files written here as Debian's package lays them out (gzipped, big-endian
    header): every item's images in its split folders, pixel for pixel, and the category -> item table."""
    import gzip

    import numpy as np
    import pandas as pd
    import yaml
    from PIL import Image

    import fashion_mnist

    rng = np.random.default_rng(0)
    for name, count in (("train", 60), ("t10k", 30)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        header = np.array([0x801, count], dtype=">u4").tobytes()
        (tmp_path / f"{name}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
        header = np.array([0x803, count, 28, 28], dtype=">u4").tobytes()
        (tmp_path / f"{name}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        if name == "train":
            train_images = images
    monkeypatch.setattr(fashion_mnist, "SOURCE", tmp_path)
    config = yaml.safe_load(fashion_mnist.write_dataset(tmp_path / "work", (4, 1, 2), False).read_text())
    assert config["ranks"] == ["category", "item"] and config["evaluation"] == {"enabled": False}
    root = Path(config["data"]["images"])
    for split, count in (("train", 4), ("val", 1), ("test", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(fashion_mnist.ITEMS)
        assert all(len(list((root / split / item).glob("*.png"))) == count for item in fashion_mnist.ITEMS)
    # the second T-shirt of the training file (label 0: rows 0, 10, ...) is train/T-shirt_top/1.png
    np.testing.assert_array_equal(np.asarray(Image.open(root / "train" / "T-shirt_top" / "1.png")), train_images[10])
    taxonomy = pd.read_csv(config["data"]["taxonomy"])
    assert sorted(taxonomy["item"]) == sorted(fashion_mnist.ITEMS) and taxonomy["category"].nunique() == 3


def test_the_prepare_memory_bench_measures_both_layouts_of_its_data_set(tmp_path):
    """bench/prepare_memory.py's data set (a fixed number of species, hard-linked images) as an image tree and as a
    manifest: the prepare step takes the same images from both, and a fresh process reports its peak memory."""
    import pandas as pd

    import prepare_memory

    prepare_memory.write_dataset(tmp_path, 48, 6)
    assert len(list((tmp_path / "images").rglob("*.png"))) == 48 and (tmp_path / "sources" / "63.png").exists()
    imports = prepare_memory.measure(tmp_path, "", REPO / "src", 1)
    tables = {}
    for layout in ("tree", "manifest"):
        result = prepare_memory.measure(tmp_path, layout, REPO / "src", 2)
        assert result["peak_mb"] > imports["peak_mb"] > 50 and result["seconds"] > 0
        tables[layout] = pd.read_parquet(tmp_path / layout / "manifest.parquet")
    assert tables["tree"]["split"].value_counts().to_dict() == {"train": 24, "val": 12, "test": 12}
    assert sorted(tables["tree"]["path"]) == sorted(tables["manifest"]["path"])
    assert tables["tree"]["genus"].nunique() == 1 and tables["tree"]["species"].nunique() == 6
