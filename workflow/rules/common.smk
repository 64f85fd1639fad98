# Configuration validation, paths and input functions shared by every step.
import json
from pathlib import Path

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

from taxotrait.runner import check_config

check_config(config)

RESULTS = f"{config['results']}/{config['dataset']}"
RANKS = config["ranks"]
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
SYNTHETIC = f"{RESULTS}/synthetic"

wildcard_constraints:
    rank="|".join(RANKS),


def params_json(*sections):
    """Config sections as one JSON string: a params value, so that changing them re-runs the rule."""
    return json.dumps({s: config.get(s) for s in sections}, sort_keys=True)


def dataset_inputs(wildcards=None):
    """Files that define the dataset: the synthetic manifest, or the user's manifest/taxonomy tables."""
    data = config["data"]
    if data.get("synthetic"):
        return {"manifest": f"{SYNTHETIC}/manifest.csv", "taxonomy": f"{SYNTHETIC}/taxonomy.csv"}
    inputs = {}
    if data.get("manifest"):
        inputs["manifest"] = data["manifest"]
    if data.get("taxonomy"):
        inputs["taxonomy"] = data["taxonomy"]
    return inputs


def backbone_weights():
    """The backbone weights file ([] when timm fetches them itself)."""
    weights = config["backbone"].get("weights")
    return [weights] if weights else []


def trained_model(wildcards):
    return f"{RESULTS}/{wildcards.rank}/model.pt"


def all_outputs():
    """Every product of the workflow for the configured dataset and ranks."""
    per_rank = ["metrics.parquet", "attention.h5", "heads.parquet", "traits.parquet", "figures"]
    outputs = [f"{RESULTS}/{rank}/{name}" for rank in RANKS for name in per_rank]
    outputs += [f"{RESULTS}/hierarchy_traits.parquet", f"{RESULTS}/figures/hierarchy", f"{RESULTS}/summary.md"]
    return outputs
