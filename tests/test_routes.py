"""The tiny configs of `.test/`, one per input route (image tree + taxonomy table, CSV manifest, image tree + Newick
tree), through Snakemake: the prepare step for real, then a dry run of the whole workflow."""

import re

import pandas as pd
import pytest

from test_slurm import planned_jobs
from test_workflow import REPO, snakemake

ROUTES = {"image_tree": "test_image_tree", "manifest": "test_manifest", "newick": "test_newick"}  # folder: dataset
RANKS = ["order", "genus", "species"]
SPLITS = {"train": 2, "val": 1, "test": 1}  # images per species of .test/data/images
# every rule of the workflow, with its jobs for 3 ranks, once prepare has run
JOBS = {"cache_tokens": 2, "train": 3, "train_probes": 1, "evaluate": 1, "extract_attention": 3, "mask_heads": 3,
        "hierarchy_traits": 1, "saliency_maps": 3, "summary": 1, "traits": 3, "faithfulness": 3, "figures": 3,
        "hierarchy_figures": 1, "key": 1, "localization": 3, "evaluation_summary": 1, "key_figure": 1, "all": 1}


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    """Each route's prepared tables and the job counts of its dry run."""
    out = tmp_path_factory.mktemp("routes")
    prepared = {}
    for route, dataset in ROUTES.items():
        config = f".test/{route}/config.yaml"
        tables = [str(out / dataset / f"{name}.parquet") for name in ("manifest", "classes", "rejects")]
        snakemake(*tables, "--configfile", config, "--config", f"results={out}")  # targets before --configfile
        prepared[route] = {name: pd.read_parquet(path) for name, path in zip(("manifest", "classes", "rejects"), tables)}
        prepared[route]["dry_run"] = snakemake("--configfile", config, "--config", f"results={out}", "-n").stdout
        prepared[route]["jobs"] = planned_jobs(prepared[route]["dry_run"])
    return prepared


def in_repo(path):
    """An image path of a prepared manifest (relative to the working directory, the repository) as a path under it."""
    return (REPO / path).resolve().relative_to(REPO.resolve())


@pytest.mark.parametrize("route", ROUTES)
def test_prepare_takes_every_shipped_image_with_its_taxonomy(routes, route):
    manifest, classes = routes[route]["manifest"], routes[route]["classes"]
    taxonomy = pd.read_csv(REPO / ".test/data/taxonomy.csv")
    images = sorted(in_repo(p) for p in (REPO / ".test/data/images").glob("*/*/*.png"))
    assert len(images) == len(taxonomy) * sum(SPLITS.values()) and routes[route]["rejects"].empty
    assert sorted(in_repo(p) for p in manifest["path"]) == images
    assert list(manifest.columns[:6]) == ["image_id", "path", "split", *RANKS]
    assert manifest["split"].value_counts().to_dict() == {s: n * len(taxonomy) for s, n in SPLITS.items()}
    lineages = manifest[RANKS].drop_duplicates().sort_values("species").reset_index(drop=True)
    pd.testing.assert_frame_equal(lineages, taxonomy.sort_values("species").reset_index(drop=True))
    assert classes.groupby("rank", sort=False).size().to_dict() == {"order": 2, "genus": 3, "species": 6}
    species = classes[classes["rank"] == "species"]
    assert species["taxon"].tolist() == taxonomy["species"].tolist()
    assert (species[[f"n_{s}" for s in SPLITS]] == list(SPLITS.values())).all().all()
    order = classes[classes["rank"] == "order"].set_index("taxon")
    assert order["n_train"].to_dict() == {"Ordo A": 8, "Ordo B": 4} and (order["parent"] == "").all()
    assert classes.loc[classes["rank"] == "genus", "parent"].tolist() == ["Ordo A", "Ordo A", "Ordo B"]


def test_the_three_routes_prepare_the_same_dataset(routes):
    tables = {route: t["manifest"].assign(path=t["manifest"]["path"].map(in_repo))
              .sort_values("image_id").reset_index(drop=True) for route, t in routes.items()}
    assert tables["manifest"]["collector"].isin(["field", "museum"]).all()  # the manifest's extra column is kept
    for route in ("manifest", "newick"):
        pd.testing.assert_frame_equal(tables[route][tables["image_tree"].columns], tables["image_tree"])
        pd.testing.assert_frame_equal(routes[route]["classes"], routes["image_tree"]["classes"])


@pytest.mark.parametrize("route", ROUTES)
def test_every_rule_resolves_after_prepare(routes, route):
    assert routes[route]["jobs"] == JOBS  # prepare is done: not among them


@pytest.mark.parametrize("route", ROUTES)
def test_faithfulness_takes_two_threads_only_where_it_computes_insertion_and_deletion(routes, route):
    """The finest rank (evaluation.faithfulness.finest_ranks: 1) runs insertion and deletion on both cores; the
    other ranks' jobs (their counterfactual test alone) take one, so they run beside other jobs."""
    jobs = re.findall(r"^rule faithfulness:\n((?:    .*\n)+)", routes[route]["dry_run"], re.M)
    threads = {re.search(r"wildcards: rank=(\w+)", job)[1]: int((re.search(r"threads: (\d+)", job) or [0, 1])[1])
               for job in jobs}
    assert threads == {"order": 1, "genus": 1, "species": 2}


def test_streaming_the_training_images_plans_no_training_token_cache(routes, tmp_path):
    """cache.train_tokens false: one cache_tokens job (eval), and train and train_probes read no train.tokens.npy."""
    stream = tmp_path / "stream.yaml"
    stream.write_text("cache: {train_tokens: false}\n")
    out = tmp_path / "results"
    dry_run = snakemake("--configfile", ".test/image_tree/config.yaml", str(stream), "--config", f"results={out}",
                        "-n").stdout
    assert planned_jobs(dry_run)["cache_tokens"] == 1 and "train.tokens.npy" not in dry_run
    assert planned_jobs(dry_run)["train"] == JOBS["train"] and planned_jobs(dry_run)["train_probes"] == 1
