# Configuration validation, paths and input functions shared by every step.
from pathlib import Path

from snakemake.logging import logger

from taxotrait.config import check_config, faithfulness_ranks, rank_train_settings, ranks_to_train, validate_config
from taxotrait.runner import stopping_at_start, tune_allocator
from taxotrait.schema import with_defaults
from taxotrait.steps import rule_settings

# A data or config error (taxotrait.errors.InputError) met at start-up, or while Snakemake plans the jobs in the
# functions below (decorated with @planning), stops the run before any job with its message alone, no stack frames.
planning = stopping_at_start(logger.error)

# every key against the schema (an unknown key, a wrong type or range: ConfigError naming the key), then the rest;
# ranks with a single taxon are dropped (a warning names them), a single species stops: the message alone is shown
# every key the config files leave out takes its schema default (the one place defaults live)
with stopping_at_start(logger.error):
    validate_config(with_defaults(config), Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
    check_config(config)
    config["ranks"] = ranks_to_train(config, warn=workflow.is_main_process)

tune_allocator()  # glibc's allocator settings for every job (taxotrait.runner.ALLOCATOR_ENVIRONMENT)

RESULTS = f"{config['results']}/{config['dataset']}"
RANKS = config["ranks"]
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
SYNTHETIC = f"{RESULTS}/synthetic"


wildcard_constraints:
    rank="|".join(RANKS),


# what every step that opens images reads: PIL's decompression-bomb limit (taxotrait.runner.apply_image_limit)
IMAGE_LIMIT = "data.max_image_pixels"


def settings(*keys):
    """A rule's `params: settings`: the config keys its step reads (a section, or a dotted key of one) and their
    values, the only settings the step receives (taxotrait.steps): changing one re-runs the rule, and nothing else
    does. Under a {rank} wildcard, `train` is that rank's (its rank_overrides applied)."""
    return planning(lambda wildcards: rule_settings(config, keys, wildcards.get("rank")))


@planning
def synthetic_threads():
    """Processes rendering the demo: one per 1,000 images (about 15 s of rendering each), at least two (the
    demo's); Snakemake caps them at --cores. The output does not depend on them."""
    synthetic = config["data"]["synthetic"]
    species = (
        synthetic["n_orders"]
        * synthetic["families_per_order"]
        * synthetic["genera_per_family"]
        * synthetic["species_per_genus"]
    )
    images = species * (synthetic["n_train"] + synthetic["n_val"] + synthetic["n_test"])
    return max(2, images // 1000)


@planning
def dataset_inputs(wildcards=None):
    """Files that define the dataset: the synthetic manifest, or the user's manifest/taxonomy tables."""
    data = config["data"]
    if data.get("synthetic"):
        return {"manifest": f"{SYNTHETIC}/manifest.csv", "taxonomy": f"{SYNTHETIC}/taxonomy.csv"}
    inputs = {}
    if data.get("manifest"):
        inputs["manifest"] = data["manifest"]
    for key in ("taxonomy", "tree"):
        if data.get(key):
            inputs[key] = data[key]
    return inputs


@planning
def images_fingerprint(wildcards=None):
    """The user's images as listed (paths, sizes, modification times): a params value, so that adding, removing or
    replacing an image re-runs prepare (the demo's images are made by the workflow: none)."""
    if config["data"].get("synthetic"):
        return ""
    from taxotrait.dataset import dataset_fingerprint

    return dataset_fingerprint(config["data"])


@planning
def backbone_weights():
    """The backbone weights file ([] when timm fetches them itself, or for random weights)."""
    weights = config["backbone"].get("weights")
    return [weights] if weights and weights != "random" else []


@planning
def trained_model(wildcards):
    return f"{RESULTS}/{wildcards.rank}/model.pt"


@planning
def train_settings(wildcards):
    """What a rank's training reads: backbone, model, contrast, cache and the rank's train settings (its rank_overrides
    applied; with the training images streamed, their transform too), so that changing one rank's override re-trains that rank only. Not the number of data-parallel
    processes, which is the rule's `processes` resource (`train_processes`)."""
    keys = [f"train.{key}" for key in config["train"] if key != "processes"]
    images = ["augment", IMAGE_LIMIT] if not config["cache"]["train_tokens"] else []  # streamed: the images' transform
    return rule_settings(config, ["backbone", "model", "contrast", "cache", *keys, *images], wildcards.rank)


@planning
def train_tokens(wildcards=None):
    """The token cache of the training images, none with `cache.train_tokens` false (the model steps that train then
    run the frozen forward over the images each epoch)."""
    return {"train_tokens": f"{RESULTS}/cache/train.tokens.npy"} if config["cache"]["train_tokens"] else {}


@planning
def train_processes(wildcards):
    """The rank's train.processes (0: one per GPU of the job): how the job runs, not what it computes."""
    return rank_train_settings(config, wildcards.rank)["processes"] or 0


@planning
def faithfulness_threads(wildcards):
    """Two threads for a rank whose insertion and deletion are computed (evaluation.faithfulness.finest_ranks), one
    for the others (their counterfactual test alone), which then run beside other jobs."""
    finest = config["evaluation"]["faithfulness"]["finest_ranks"]
    return 2 if wildcards.rank in faithfulness_ranks(RANKS, finest) else 1


@planning
def part_annotation_inputs(wildcards=None):
    """The CUB-style part annotation files of `evaluation.parts` (none when unset)."""
    folder = config["evaluation"]["parts"]
    if not folder:
        return {}
    from taxotrait.groundtruth import part_annotation_files

    return {key: str(path) for key, path in part_annotation_files(folder).items()}


@planning
def all_outputs():
    """Every product of the workflow for the configured dataset and ranks."""
    per_rank = ["metrics.parquet", "attention.h5", "heads.parquet", "traits.parquet", "figures"]
    outputs = [f"{RESULTS}/{rank}/{name}" for rank in RANKS for name in per_rank]
    outputs += [
        f"{RESULTS}/hierarchy_traits.parquet",
        f"{RESULTS}/figures/hierarchy",
        f"{RESULTS}/summary.md",
        f"{RESULTS}/key.parquet",
        f"{RESULTS}/key.md",
        f"{RESULTS}/key.html",
        f"{RESULTS}/figures/key",
    ]
    if config["evaluation"]["enabled"]:
        outputs += [f"{RESULTS}/faithfulness.parquet", f"{RESULTS}/localization.parquet", f"{RESULTS}/evaluation.md"]
    return outputs
