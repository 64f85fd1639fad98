"""The whole workflow on a tiny synthetic taxonomy, through Snakemake, with the real offline backbone."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RANKS = ["order", "family", "genus", "species"]
N_SPECIES, PER_SPECIES, N_TEST = 4, 12 + 3 + 4, 4


def snakemake(*args, cwd=REPO, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    snakemake("--configfile", "tests/data/tiny.yaml", "--config", f"results={out}")
    return out / "tiny"


def test_tables(results):
    manifest = pd.read_parquet(results / "manifest.parquet")
    assert list(manifest.columns[:7]) == ["image_id", "path", "split", *RANKS]
    assert len(manifest) == N_SPECIES * PER_SPECIES and manifest["image_id"].is_unique
    assert (manifest["split"].value_counts() == {"train": 48, "val": 12, "test": 16}).all()
    classes = pd.read_parquet(results / "classes.parquet")
    assert classes.groupby("rank").size().to_dict() == {"order": 2, "family": 2, "genus": 2, "species": 4}
    assert (classes["n_train"] > 0).all() and classes.dtypes["n_test"] == "int64"
    assert pd.read_parquet(results / "rejects.parquet").empty


@pytest.mark.parametrize("rank", RANKS)
def test_rank_outputs(results, rank):
    folder = results / rank
    payload = torch.load(folder / "model.pt", weights_only=True)
    assert payload["metadata"]["rank"] == rank and not any(k.startswith("backbone") for k in payload["state_dict"])
    log = pd.read_parquet(folder / "train_log.parquet")
    assert log["epoch"].tolist() == [1, 2, 3] and log["loss"].notna().all()
    metrics = pd.read_parquet(folder / "metrics.parquet")
    overall = metrics[metrics["taxon"] == "__all__"].set_index("split")
    assert overall.loc["test", "n_images"] == N_SPECIES * N_TEST and 0 <= overall.loc["test", "top1"] <= 1
    num_classes = {"order": 2, "family": 2, "genus": 2, "species": 4}[rank]
    with h5py.File(folder / "attention.h5") as h5:
        n = N_SPECIES * N_TEST
        assert h5["attention"].shape == (n, 3, 6, 8, 8) and h5["attention"].dtype == np.float16
        assert h5["logits"].shape == (n, num_classes) and h5["classes"].shape == (n, 3)
        assert h5.attrs["rank"] == rank and list(h5.attrs["grid"]) == [8, 8]
        assert list(h5.attrs["class_names"]) == sorted(pd.read_parquet(results / "manifest.parquet")[rank].unique())
        assert np.array_equal(h5["prediction"][:], h5["logits"][:].argmax(1))
        rows = h5["attention"][:, 0].astype(np.float64).sum(axis=(-1, -2))  # the patch share of each head's row
        assert ((rows > 0) & (rows <= 1.001)).all()
        correct = int((h5["label"][:] == h5["prediction"][:]).sum())
    heads = pd.read_parquet(folder / "heads.parquet")
    assert len(heads) == correct * 6 and heads["image_id"].nunique() == correct
    assert (heads.groupby("image_id")["is_trait_head"].sum() >= 1).all()
    assert heads.dtypes["removal_step"] == "int64" and heads["peak_x"].between(0, 1).all()
    traits = pd.read_parquet(folder / "traits.parquet")
    assert list(traits.columns) == ["rank", "taxon", "head", "n_images", "frequency", "mean_importance",
                                    "peak_x", "peak_y", "spread"]
    assert traits["frequency"].between(0, 1).all() and (traits["n_images"] >= 1).all()
    pngs = sorted((folder / "figures").glob("*.png"))
    assert pngs
    for png in pngs[:3]:
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        assert pixels.std() > 10  # not blank


def test_hierarchy_and_summary(results):
    hierarchy = pd.read_parquet(results / "hierarchy_traits.parquet")
    assert set(hierarchy["rank"]) <= set(RANKS) and hierarchy["species"].nunique() >= 1
    assert list((results / "figures" / "hierarchy").glob("*.png"))
    pointing = pd.read_parquet(results / "pointing_game.parquet").set_index(["rank", "mask"])
    # easy data: the order's top trait head lands on the body far more often than a random patch
    assert pointing.loc[("order", "order"), "hit_rate"] > pointing.loc[("order", "order"), "random_rate"] + 0.3
    assert "## Targets" in (results / "summary.md").read_text()


def test_rerun_does_nothing(results):
    out = snakemake("--configfile", "tests/data/tiny.yaml", "--config", f"results={results.parent}", "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_bad_config_stops_before_any_job(tmp_path):
    out = snakemake("--configfile", "tests/data/tiny.yaml", "--config", f"results={tmp_path}",
                    "train={epochs: 0}", "-n", check=False)
    assert out.returncode and "epochs" in out.stderr
    out = snakemake("--config", f"results={tmp_path}", "data={synthetic: null, manifest: nowhere.csv}", "-n", check=False)
    assert out.returncode and "data.manifest: nowhere.csv does not exist" in out.stderr


def test_inconsistent_taxonomy_stops_before_training(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,split,species\na.png,train,s1\na.png,test,s2\n")
    (tmp_path / "tax.csv").write_text("order,family,genus,species\nO,F1,G,s1\nO,F2,G,s2\n")
    out = snakemake("--config", f"results={tmp_path}/r", f"data={{synthetic: null, manifest: {tmp_path}/m.csv, "
                    f"taxonomy: {tmp_path}/tax.csv}}", check=False)
    assert out.returncode
    log = (tmp_path / "r" / "demo" / "logs" / "prepare.log").read_text()
    assert "tax.csv: genus 'G' has several parents at rank family" in log
    assert not (tmp_path / "r" / "demo" / "cache").exists()
